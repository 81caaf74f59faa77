"""Calibration placement (pipeline/sizing/placement.py) on the real configs: the plans `forge plan` shows for
Llama-3.1-8B, Llama-3.3-70B, Llama-3.1-405B and Mixtral-8x22B, each checked against arithmetic
written out here by hand, and the refusals. Pure arithmetic: no torch, milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.core.errors import RecipeError
from pipeline.core.gpus import load_catalog
from pipeline.sizing.placement import Node, module_list, plan_calibration

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "llama-3.1-8b": ROOT / "recipes/llama-3-1-8b-instruct/config.json",
    "llama-3.3-70b": ROOT / "recipes/llama-3-3-70b-instruct/config.json",
    "llama-3.1-405b": ROOT / "tests/data/configs/llama-3.1-405b-instruct.json",
    "mixtral-8x22b": ROOT / "tests/data/configs/mixtral-8x22b-instruct-v0.1.json",
}
CATALOG = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
GIB = 1 << 30  # CUDA context charged per GPU (sizing.RUNTIME_OVERHEAD_BYTES)
# Memory as the driver reports it (pipeline/core/data/gpus.yaml: nvidia-smi totals, MiB x 2^20).
H200 = 143_771 * 2**20  # 150.75e9 bytes
H100 = 81_559 * 2**20  # 85.52e9 bytes


def config(name: str) -> dict:
    return json.loads(CONFIGS[name].read_text())


def plan(name: str, gpu: str = "h200", count: int = 8, fmt: str = "fp8", **kw):
    return plan_calibration(config(name), fmt, CATALOG[gpu], Node(gpu, count, **kw), 1, 512, CATALOG)


def test_llama_8b_calibrates_on_one_h200():
    # embed_tokens and lm_head: 128256 x 4096 BF16 each; a layer: q,o 4096x4096, k,v 4096x1024,
    # gate/up/down 3 x 4096x14336, two norms of 4096.
    embed = 128256 * 4096 * 2
    layer = (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336 + 2 * 4096) * 2
    weights = 2 * embed + 32 * layer + 4096 * 2 + 128 * 2  # + final norm + rotary inv_freq buffers
    assert weights == 16_060_522_752
    # The biggest transient is lm_head's: BF16 logits of 1 x 512 tokens + the fp32 copy and
    # log-softmax of the perplexity (8 bytes); export's FP8 packing of gate_proj (3 B/elem) is smaller.
    logits = 512 * 128256 * 2 + 512 * 128256 * 8
    assert logits > 14336 * 4096 * 3
    quantizers = 32 * 16 * 4  # 7 Linears x (input + weight) + K + V, one fp32 amax each
    p = plan("llama-3.1-8b")
    assert p.gpus == 1 and p.offload_bytes == 0 and p.weights_bytes == weights
    assert p.per_gpu_bytes == [weights + GIB + quantizers + logits] == [17_790_937_344]
    assert CATALOG["h200"].memory_bytes == H200
    assert p.headroom_bytes == [H200 - 17_790_937_344]  # 133.0 GB
    assert set(p.device_map.values()) == {0}


def test_llama_70b_fits_one_h200_with_7_9_gb_headroom():
    embed = 128256 * 8192 * 2
    layer = (8192 * (8192 + 1024 + 1024 + 8192) + 3 * 8192 * 28672 + 2 * 8192) * 2
    assert layer == 1_711_308_800
    weights = 2 * embed + 80 * layer + 8192 * 2 + 128 * 2
    assert weights == 141_107_413_248  # 141.1 GB (131.4 GiB) of BF16
    p = plan("llama-3.3-70b")
    assert p.gpus == 1
    # The biggest transient: FP8 packing of one 28672 x 8192 MLP weight (3 B/elem), above lm_head's
    # 512-token logits (512 x 128256 x 10 B).
    export = 28672 * 8192 * 3
    assert export > 512 * 128256 * 10
    total = weights + GIB + 80 * 16 * 4 + export
    assert p.per_gpu_bytes == [total] == [142_885_803_264]
    assert p.headroom_bytes == [H200 - total]  # stated headroom: 7.87 GB (the issue: "under 9 GiB")
    assert set(p.device_map.values()) == {0}


def test_llama_70b_on_h100s_takes_two_balanced_40_40_with_13_gb_headroom():
    embed = 128256 * 8192 * 2
    layer = 1_711_308_800
    export = 28672 * 8192 * 3
    p = plan("llama-3.3-70b", gpu="h100")
    gpu0 = embed + 128 * 2 + 40 * layer + GIB + 40 * 16 * 4 + export
    assert p.gpus == 2 and p.per_gpu_bytes[0] == gpu0 == 72_332_086_016
    assert p.loads[0]["modules"][-1] == "model.layers.39" and p.loads[1]["modules"][0] == "model.layers.40"
    assert p.headroom_bytes[0] == H100 - gpu0  # 13.19 GB
    assert p.device_map["lm_head"] == 1 and p.device_map["model.embed_tokens"] == 0


def test_llama_405b_needs_six_h200s():
    layer = (16384 * (16384 + 1024 + 1024 + 16384) + 3 * 16384 * 53248 + 2 * 16384) * 2
    embed = 128256 * 16384 * 2
    export = 16384 * 53248 * 3
    room = H200 - GIB - export  # for weights on one GPU (quantizer amax: KBs)
    assert room // layer == 23  # 23 layers on a middle GPU
    assert (room - embed) // layer == 22  # 22 beside embed_tokens on GPU 0 (and beside lm_head on the last)
    five = 22 + 3 * 23 + 22
    assert five == 113 and five < 126 <= five + 23  # five GPUs hold 113 of 126 layers; six hold all
    p = plan("llama-3.1-405b")
    assert p.gpus == 6 and p.offload_bytes == 0
    assert p.weights_bytes == 2 * embed + 126 * layer + 16384 * 2 + 128 * 2 == 811_706_777_856
    assert max(p.per_gpu_bytes) <= H200
    # Balanced, not filled: the middle GPUs carry 21 layers, the ends embed_tokens / lm_head + 21.
    assert [len(load["modules"]) for load in p.loads] == [23, 21, 21, 21, 21, 23]


def test_mixtral_8x22b_needs_two_h200s():
    layer = (6144 * (6144 + 1024 + 1024 + 6144) + 8 * 3 * 6144 * 16384 + 6144 * 8 + 2 * 6144) * 2
    assert layer == 5_008_121_856
    export = 2 * 16384 * 6144 * 3  # one expert's gate_up slice, packed at a time
    one = (H200 - GIB - export) // layer
    assert one == 29 and one < 56 <= 2 * (one - 1)  # one GPU is not enough; two are (beside embed / lm_head)
    p = plan("mixtral-8x22b")
    assert p.gpus == 2 and max(p.per_gpu_bytes) <= H200


def test_node_too_small_is_refused_with_what_would_fit():
    with pytest.raises(RecipeError) as err:
        plan("llama-3.1-405b", gpu="h100", count=8)
    text = str(err.value)
    assert "811.7 GB of BF16 weights" in text and "8 x h100 hold 684 GB" in text
    assert "{gpu: h200, count: 6}" in text and "{gpu: h100, count: 11}" in text
    assert "cpu_offload_gb: 202" in text  # see test_cpu_offload_when_allowed


def test_cpu_offload_when_allowed():
    # An H100 has 85.52e9 - 1 GiB context - 2.62e9 FP8 export buffer = 81.83e9 for weights: 12
    # layers of 6.375e9; GPU 0 also holds embed_tokens (4.2e9) and room for one offloaded layer: 11.
    layer, head = 6_375_407_616, 128256 * 16384 * 2
    room = H100 - GIB - 16384 * 53248 * 3
    assert room // layer == 12 and (room - head - layer) // layer == 11
    offloaded_layers = 126 - (11 + 7 * 12)  # 31
    p = plan("llama-3.1-405b", gpu="h100", count=8, cpu_offload_bytes=300_000_000_000)
    assert p.gpus == 8 and p.offload_bytes == offloaded_layers * layer + 16384 * 2 + head == 201_840_361_472
    assert "cpu" in p.device_map.values() and max(p.per_gpu_bytes) <= H100
    # GPU 0 keeps room to run the largest offloaded module (one 6.38 GB layer) on itself.
    assert p.loads[0]["offload_reserve_bytes"] == 6_375_407_616
    assert p.max_memory()["cpu"] == p.offload_bytes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_device_map_lists_every_placement_unit_once_in_order(name):
    p = plan(name, count=8)
    names = [m.name for m in module_list(config(name), 1, 512)]
    assert list(p.device_map) == names
    gpus = list(p.device_map.values())
    assert gpus == sorted(gpus)  # contiguous: hidden states cross each GPU boundary once


def test_unknown_layout_is_refused():
    with pytest.raises(RecipeError, match="not model_type 'gpt2'"):
        plan_calibration({"model_type": "gpt2"}, "fp8", CATALOG["h200"], Node("h200", 8), 1, 512)


# ------------------------------------------------------------------------ recipe field and CLI


def _recipe(tmp_path: Path, node: dict | None, model: str = "llama-3-3-70b-instruct") -> Path:
    model_dir = tmp_path / "recipes" / model
    model_dir.mkdir(parents=True)
    for name in ("model.yaml", "config.json"):
        (model_dir / name).write_text((ROOT / "recipes" / model / name).read_text())
    recipe = yaml.safe_load((ROOT / "recipes" / model / "fp8.yaml").read_text())
    if node is not None:
        recipe["calibration"]["node"] = node
    (model_dir / "fp8.yaml").write_text(yaml.safe_dump(recipe))
    for name in ("calibration", "eval"):
        (tmp_path / name).symlink_to(ROOT / name)
    return model_dir / "fp8.yaml"


def test_forge_plan_json_carries_the_calibration_plan(tmp_path, monkeypatch, capsys):
    path = _recipe(tmp_path, {"gpu": "h100", "count": 2})
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(path.relative_to(tmp_path)), "--json", "--catalog", str(ROOT / "pipeline/core/data/gpus.yaml")]) == 0
    out = json.loads(capsys.readouterr().out)
    calibration = out["llama-3-3-70b-instruct-fp8-h200"]["calibration_plan"]
    assert calibration["gpus"] == 2 and calibration["node"] == {"gpu": "h100", "count": 2, "cpu_offload_bytes": 0}
    assert calibration["per_gpu_bytes"][0] == 72_332_086_016 and calibration["offload_bytes"] == 0
    assert calibration["device_map"]["model.layers.40"] == 1


def test_default_node_is_eight_of_the_first_target(tmp_path, monkeypatch, capsys):
    path = _recipe(tmp_path, None)
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(path.relative_to(tmp_path)), "--catalog", str(ROOT / "pipeline/core/data/gpus.yaml")]) == 0
    table = capsys.readouterr().out
    assert "8 x h100" in table and "calibration GPUs used" in table and "model.layers.40" in table


def test_validate_refuses_a_node_too_small(tmp_path, monkeypatch, capsys):
    path = _recipe(tmp_path, {"gpu": "h100", "count": 1})
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(path.relative_to(tmp_path)), "--catalog", str(ROOT / "pipeline/core/data/gpus.yaml")]) == 2
    err = capsys.readouterr().err
    assert "calibration.node" in err and "1 x h100 hold 86 GB" in err and "{gpu: h100, count: 2}" in err


def test_node_is_a_closed_schema_and_outside_the_digest(tmp_path):
    from pipeline.recipe.loading import load_recipe

    with pytest.raises(RecipeError, match="count"):
        load_recipe(_recipe(tmp_path / "a", {"gpu": "h200", "count": 0}))
    with pytest.raises(RecipeError, match="gpus"):
        load_recipe(_recipe(tmp_path / "b", {"gpu": "h200", "gpus": 2}))
    placed = load_recipe(_recipe(tmp_path / "c", {"gpu": "h200", "count": 2}))
    default = load_recipe(_recipe(tmp_path / "d", None))
    # Where calibration runs does not change its output: the calibration data stays valid.
    assert placed.section_digest("calibration") == default.section_digest("calibration")


def test_adhoc_plan_for_405b_on_h200s(capsys):
    # Serving 405B FP8 needs TP 4 on H200 (410 GB of weights); calibrating its BF16 copy needs six.
    assert main(["plan", "--model-config", str(CONFIGS["llama-3.1-405b"]), "--format", "fp8", "--gpu", "h200",
                 "--tp", "4", "--json", "--catalog", str(ROOT / "pipeline/core/data/gpus.yaml")]) == 0
    calibration = json.loads(capsys.readouterr().out)["calibration_plan"]
    assert calibration["gpus"] == 6 and len(calibration["per_gpu_bytes"]) == 6


def test_adhoc_405b_fp8_on_8_h100s_is_planned_and_its_placement_answered_apart(capsys):
    """Issue 26 item 7: serving 405B FP8 at TP 8 on H100 (a configuration NVIDIA benchmarks with trtllm-bench)
    was stopped by the calibration placement's error. Placement is its own answer: the serving plan is
    printed and exits 0; the placement problem is shown beside it, in the ad-hoc flags' terms."""
    argv = ["plan", "--model-config", str(CONFIGS["llama-3.1-405b"]), "--format", "fp8", "--gpu", "h100", "--tp", "8",
            "--catalog", str(ROOT / "pipeline/core/data/gpus.yaml")]
    assert main(argv) == 0
    table = " ".join(capsys.readouterr().out.split())  # rich wraps cells; compare the words
    assert "fits │ yes" in table and "output tok/s, ISL/OSL 1024/1024 (predicted)" in table
    assert "calibration placement │ not placeable on 8 x h100 (below)" in table
    assert ("calibration placement (answered apart from the serving plan above): --calibration-gpus: calibrating "
            "needs 811.7 GB of BF16 weights plus activations and export buffers; 8 x h100 hold 684 GB, leaving 201.8 GB "
            "for CPU offload where --cpu-offload-gb allows 0. Fix: --calibration-gpus 11, or --cpu-offload-gb 202 "
            "(slower: layers stream from host memory); or calibrate on another node that holds it (a recipe's "
            "calibration.node): 6 x h200, 5 x b200") in table
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["throughput"]["predicted_output_tok_s"] > 0
    refused = out["calibration_plan"]["refused"]
    assert refused["where"] == "--calibration-gpus" and refused["problem"].startswith("calibrating needs 811.7 GB")
    assert refused["fix"].startswith("--calibration-gpus 11, or --cpu-offload-gb 202")
    assert main([*argv, "--cpu-offload-gb", "202", "--json"]) == 0  # the fix it names places it
    placed = json.loads(capsys.readouterr().out)["calibration_plan"]
    assert placed["gpus"] == 8 and round(placed["offload_bytes"] / 1e9, 1) == 201.8  # README's table


def test_recipe_plan_shows_serving_and_a_calibration_node_too_small_apart(tmp_path, monkeypatch, capsys):
    """On a recipe too: `forge plan` answers serving and placement apart; `forge validate` (and calibrate) refuse it."""
    path = _recipe(tmp_path, {"gpu": "h100", "count": 1})
    monkeypatch.chdir(tmp_path)
    argv = [str(path.relative_to(tmp_path)), "--catalog", str(ROOT / "pipeline/core/data/gpus.yaml")]
    assert main(["plan", *argv]) == 0
    table = " ".join(capsys.readouterr().out.split())
    assert "fits │ yes" in table and "calibration placement │ not placeable on 1 x h100 (below)" in table
    assert (f"calibration placement (answered apart from the serving plan above): {path.relative_to(tmp_path)}: "
            "calibration.node: calibrating needs 141.1 GB of BF16 weights plus activations and export buffers; "
            "1 x h100 hold 86 GB, leaving 60.3 GB for CPU offload where cpu_offload_gb allows 0. Fix: use "
            "calibration.node {gpu: h100, count: 2}") in table
    assert main(["validate", *argv]) == 2


def _fake_cuda(monkeypatch, count: int, total_memory: int):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=total_memory))


def test_calibrate_stage_loads_as_planned_on_a_matching_node(tmp_path, monkeypatch):
    from pipeline.recipe.loading import load_recipe
    from pipeline.stages.calibrate import choose_placement

    recipe = load_recipe(_recipe(tmp_path, {"gpu": "h100", "count": 8}))
    _fake_cuda(monkeypatch, 8, 81_559 * 2**20)  # what nvidia-smi reports for an H100 80GB
    placement, planned = choose_placement(recipe, CATALOG, tmp_path, None, tmp_path / "offload")
    assert planned["gpus"] == 2 and placement.device_map == planned["device_map"]
    assert placement.max_memory == {0: 72_332_086_016, 1: 72_332_102_144}


def test_calibrate_stage_refuses_a_machine_smaller_than_the_plan(tmp_path, monkeypatch):
    from pipeline.core.errors import StageInputError
    from pipeline.recipe.loading import load_recipe
    from pipeline.stages.calibrate import choose_placement

    recipe = load_recipe(_recipe(tmp_path, {"gpu": "h100", "count": 8}))
    _fake_cuda(monkeypatch, 1, 81_559 * 2**20)
    with pytest.raises(StageInputError, match=r"needs 2 GPU\(s\) of h100 \(72.3 GB each\); this machine has 1"):
        choose_placement(recipe, CATALOG, tmp_path, None, tmp_path / "offload")
    with pytest.raises(StageInputError, match="--cpu-memory-budget"):
        choose_placement(recipe, CATALOG, tmp_path, 10**9, tmp_path / "offload")
