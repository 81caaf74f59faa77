"""The placement plan against meta-device copies of the real models (accelerate's
`init_empty_weights`: every module and shape, no weights, no memory): the device map covers every
tensor, each module's size agrees with accelerate's `compute_module_sizes` within 1%, and no GPU
is over its budget when charged accelerate's sizes. Seconds, no downloads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from pipeline.core.gpus import load_catalog
from pipeline.sizing.placement import Node, module_list, plan_calibration

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
CASES = [  # config, GPU kind, node size, GPUs the plan must use
    ("recipes/llama-3-1-8b-instruct/config.json", "h200", 8, 1),
    ("recipes/llama-3-3-70b-instruct/config.json", "h200", 8, 1),
    ("recipes/llama-3-3-70b-instruct/config.json", "h100", 8, 2),
    ("tests/data/configs/llama-3.1-405b-instruct.json", "h200", 8, 6),
    ("tests/data/configs/mixtral-8x22b-instruct-v0.1.json", "h200", 8, 2),
    ("recipes/smollm2-135m-instruct/config.json", "h200", 8, 1),  # tied embeddings
]


def meta_model(config: dict):
    import torch
    import transformers
    from accelerate import init_empty_weights

    hf_config = transformers.AutoConfig.for_model(**config)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    # from_pretrained ties lm_head to embed_tokens when tie_word_embeddings; from_config on the
    # meta device leaves two tensors (transformers 5.14), so tie them as the loaded model is.
    model.tie_weights()
    return model


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{Path(c[0]).stem if 'tests' in c[0] else c[0].split('/')[1]}-{c[1]}")
def case(request):
    path, gpu, count, gpus = request.param
    config = json.loads((ROOT / path).read_text())
    return config, gpu, count, gpus, meta_model(config)


def test_device_map_covers_every_tensor(case):
    from accelerate.utils.modeling import check_device_map

    config, gpu, count, gpus, model = case
    plan = plan_calibration(config, "fp8", CATALOG[gpu], Node(gpu, count), 1, 512)
    assert plan.gpus == gpus
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a device-map key naming no module is a warning in accelerate
        check_device_map(model, plan.device_map)  # raises if a tensor is on no device
    assert set(plan.device_map) <= set(dict(model.named_modules()))


def test_module_sizes_agree_with_accelerate(case):
    import torch
    from accelerate.utils import compute_module_sizes

    config, *_, model = case
    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    ours = module_list(config, 1, 512)
    for module in ours:
        assert module.weight_bytes == pytest.approx(sizes[module.name], rel=0.01, abs=512), module.name
    assert sum(m.weight_bytes for m in ours) == pytest.approx(sizes[""], rel=0.01)


def test_no_gpu_over_budget_with_accelerates_sizes(case):
    import torch
    from accelerate.utils import compute_module_sizes

    config, gpu, count, _, model = case
    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    plan = plan_calibration(config, "fp8", CATALOG[gpu], Node(gpu, count), 1, 512)
    for load in plan.loads:
        measured = sum(sizes[name] for name in load["modules"])
        overhead = load["total_bytes"] - load["weight_bytes"]  # context, quantizer state, transients
        assert measured + overhead <= CATALOG[gpu].memory_bytes
        assert plan.max_memory()[load["gpu"]] == load["total_bytes"]
