"""A dispatched model calibrates and exports exactly what an undispatched one does.

The calibrate stage runs twice through the `forge` CLI on a tiny random Llama with the
Llama-3.3-70B FP8 recipe's own settings (FP8 W8A8, FP8 KV cache, 512-token samples, seed 0,
batch 1; 16 samples instead of 512, which took 290 s here): once whole on the CPU, once dispatched by accelerate within a RAM budget smaller than
the model, so the embedding stays in RAM and the rest is offloaded to disk and streamed in
per forward (the same AlignDevicesHook path a GPU node's CPU offload takes). Every exported tensor,
every calibrated amax and both perplexities must be identical. Only the calibration set differs
from the 70B recipe: cnn_dailymail needs the Hub, so the offline generated-en set stands in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 300_000  # bytes of RAM; the tiny model is ~560 KB in fp32
SAMPLES = 16


def forge(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("dispatch")
    for name in ("calibration", "eval"):
        (root / name).symlink_to(ROOT / name)
    (root / "recipes/tiny-llama").mkdir(parents=True)
    shutil.copy(tiny_llama.model_dir / "config.json", root / "recipes/tiny-llama/config.json")
    (root / "recipes/tiny-llama/model.yaml").write_text(yaml.safe_dump(
        {"source": {"kind": "local", "path": str(tiny_llama.model_dir)}, "eval": {"suite": "smoke"}}))
    recipe = yaml.safe_load((ROOT / "recipes/llama-3-3-70b-instruct/fp8.yaml").read_text())
    assert {k: recipe["calibration"][k] for k in ("set", "num_samples", "seq_len", "seed")} == {
        "set": "cnn_dailymail", "num_samples": 512, "seq_len": 512, "seed": 0}
    recipe["calibration"]["set"] = "generated-en"
    recipe["calibration"]["num_samples"] = SAMPLES
    recipe["eval"]["suite"] = "smoke"
    for target in recipe["targets"].values():  # serving shape only: the tiny model has 512 positions
        target.update(max_input_len=256, max_output_len=256, max_seq_len=512)
    (root / "recipes/tiny-llama/fp8.yaml").write_text(yaml.safe_dump(recipe))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        path = "recipes/tiny-llama/fp8.yaml"
        assert forge("download", "recipes/tiny-llama/model.yaml", "--out", "data/models/tiny-llama") == 0
        assert forge("calibration-set", path, "--model", "data/models/tiny-llama", "--out", "data/calibration/t") == 0
        for name, extra in (("whole", ()), ("dispatched", ("--cpu-memory-budget", str(BUDGET)))):
            assert forge("calibrate", path, "--model", "data/models/tiny-llama", "--calibration", "data/calibration/t",
                         "--out", f"data/quantized/{name}", "--metrics", f"metrics/{name}.json",
                         "--timings", f"metrics/run/{name}.json", *extra) == 0
        yield root
    finally:
        os.chdir(cwd)


def tensor_digests(checkpoint: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    import torch
    from safetensors import safe_open

    out = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle lists its tensors through keys())
                t = f.get_tensor(key)
                raw = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                out[key] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest())
    return out


def test_the_dispatched_run_was_offloaded(runs, tiny_llama):
    from accelerate.utils import compute_module_sizes

    assert compute_module_sizes(tiny_llama.model)[""] > BUDGET  # the budget is smaller than the model
    placement = json.loads((runs / "data/quantized/dispatched/manifest.json").read_text())["details"]["placement"]
    assert "disk" in placement["device_map"].values() and "cpu" in placement["device_map"].values()
    assert json.loads((runs / "metrics/run/dispatched.json").read_text())["peak_cpu_rss_bytes"] > 0  # a timing, not output
    whole = json.loads((runs / "data/quantized/whole/manifest.json").read_text())["details"]["placement"]
    assert whole["device_map"] is None


def test_dispatched_export_is_tensor_for_tensor_identical(runs):
    whole = tensor_digests(runs / "data/quantized/whole/checkpoint")
    dispatched = tensor_digests(runs / "data/quantized/dispatched/checkpoint")
    assert len(whole) >= 2 * 7 * 2  # weights and scales of 14 quantized Linears, at least
    assert dispatched == whole
    quant = json.loads((runs / "data/quantized/dispatched/checkpoint/hf_quant_config.json").read_text())
    assert quant["quantization"]["quant_algo"] == "FP8" and quant["quantization"]["kv_cache_quant_algo"] == "FP8"


def test_dispatched_calibration_is_identical(runs):
    import torch

    def amax(name):
        state = torch.load(runs / f"data/quantized/{name}/quant_state.pt", weights_only=True)
        return {k: v["_amax"] for k, v in state["quantizer_state_dict"].items() if "_amax" in v}

    whole, dispatched = amax("whole"), amax("dispatched")
    assert len(whole) == 2 * (7 * 2 + 2)  # input + weight per Linear, K and V per layer
    assert set(whole) == set(dispatched) and all(torch.equal(whole[k], dispatched[k]) for k in whole)
    # The stage's results live in its manifest (the metrics file holds only KPIs: pipeline/handoff/kpis.py).
    m_whole = json.loads((runs / "data/quantized/whole/manifest.json").read_text())["details"]["results"]
    m_dispatched = json.loads((runs / "data/quantized/dispatched/manifest.json").read_text())["details"]["results"]
    for key in ("perplexity_baseline", "perplexity_quantized", "calibration_tokens"):
        assert m_whole[key] == m_dispatched[key]
    assert m_whole["calibration_tokens"] == SAMPLES * 512  # the 70B recipe's sample length

