"""On a CUDA GPU: the tiny Llama placed by an accelerate device map with part of it CPU-offloaded
(weights in host RAM, brought to cuda:0 for each forward) calibrates and exports exactly what the
whole model on cuda:0 does, and the per-device peak is recorded. Skips without CUDA."""

from __future__ import annotations

import hashlib

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def run(checkpoint, placement, out):
    from safetensors import safe_open

    from pipeline.quant.hf_export import export_unified
    from pipeline.quant.modelopt_glue import calibrate
    from pipeline.quant.quant_config import build_quant_config
    from pipeline.sources.loading import load_checkpoint

    loaded = load_checkpoint(checkpoint, placement)
    assert loaded.device == "cuda:0" and loaded.dtype == "bfloat16"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.model.config.vocab_size, (8, 64), generator=g)
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": torch.ones_like(ids[i:i + 2])} for i in range(0, 8, 2)]
    result = calibrate(loaded.model, build_quant_config("FP8_DEFAULT_CFG", "fp8", []), batches,
                       progress=False, input_device=loaded.device)
    export_unified(loaded.model, out)
    digests = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                digests[key] = hashlib.sha256(t.reshape(-1).contiguous().view(torch.uint8).numpy()).hexdigest()
    return result, digests


def test_cpu_offloaded_calibration_matches_whole(tiny_llama, tmp_path):
    from pipeline.sources.loading import Placement

    whole_result, whole = run(tiny_llama.model_dir, Placement({"": 0}, {0: 1 << 30}), tmp_path / "whole")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}
    result, dispatched = run(tiny_llama.model_dir, Placement(device_map, {0: 1 << 30, "cpu": 1 << 30}),
                             tmp_path / "offloaded")
    assert dispatched == whole
    assert result.peak_cuda_bytes and whole_result.peak_cuda_bytes
