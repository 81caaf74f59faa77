"""Effective bits per weight of an exported checkpoint, scales counted. One definition, here.

    effective_bits = 8 * (bytes of the counted weights + bytes of every scale tensor they carry)
                     / (number of values in the counted weights)

Counted weights (the denominator): every 2-D `<module>.weight` of a Linear that quantization may
touch, i.e. every 2-D weight except input embeddings and `lm_head`. Those two are left out because
no recipe quantizes them (ModelOpt's presets disable `*lm_head*` and every nn.Embedding), and, in
SmolLM2-135M, `lm_head` *is* the embedding (tie_word_embeddings): 28.3M of its 134.5M parameters,
a 21% share at BF16 that would hide the difference between any two recipes. This is also what the
recipe's `quant.auto.effective_bits` targets (pipeline/quant/mixed.py translates it to ModelOpt's
cost model, which counts lm_head at 16 bits).

A counted weight's scales: `<module>.weight_scale`, `.weight_scale_2`, `.input_scale`,
`.pre_quant_scale` (all that ModelOpt writes beside a quantized Linear); KV-cache `k_scale` /
`v_scale` belong to the attention, not to a weight, and are left out. Values: a packed FP4 weight
(U8, two E2M1 per byte) holds 2 values per element (export_rules.EXPORT_RULES). With those rules
NVFP4 comes out at 4 + 8/16 = 4.5 bits plus 64 bits per tensor (weight_scale_2 + input_scale),
FP8 at 8 plus 64 bits per tensor, BF16 at 16.

`whole_checkpoint_bits` is the plain ratio over everything stored: all tensor bytes * 8 / all
parameter values (tied weights stored once, counted once), the number a download size implies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.engines.export_rules import EXPORT_RULES, TensorInfo

SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
_NOT_COUNTED = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


@dataclass(frozen=True)
class BitsReport:
    effective_bits: float       # counted Linears, scales counted (the definition above)
    counted_weights: int        # values in the counted Linear weights (the denominator)
    counted_bits: int           # bits of those weights and their scales (the numerator)
    whole_checkpoint_bits: float  # every stored tensor over every stored value
    whole_values: int
    by_format: dict[str, int]   # format -> counted Linear weight values in it

    def to_dict(self) -> dict[str, Any]:
        return {"effective_bits": self.effective_bits, "counted_weights": self.counted_weights,
                "counted_bits": self.counted_bits, "whole_checkpoint_bits": self.whole_checkpoint_bits,
                "whole_values": self.whole_values, "by_format": dict(self.by_format)}


def counted(module: str) -> bool:
    return module.rsplit(".", 1)[-1] not in _NOT_COUNTED


def effective_bits(tensors: dict[str, TensorInfo], layer_formats: dict[str, str]) -> BitsReport:
    """`tensors`: name -> dtype/shape (safetensors headers); `layer_formats`: module -> registry
    format of each quantized Linear (others are unquantized). Pure arithmetic, no files."""
    bits = values = 0
    whole_values = 0
    by_format: dict[str, int] = {}
    for name, info in tensors.items():
        module, _, leaf = name.rpartition(".")
        fmt = layer_formats.get(module)
        per_element = EXPORT_RULES[fmt].values_per_element if (fmt and leaf == "weight") else 1
        n = math.prod(info.shape) * per_element
        if leaf in SCALE_SUFFIXES or leaf in ("k_scale", "v_scale"):
            n = 0  # scales are overhead, not parameters
        whole_values += n
        if leaf == "weight" and len(info.shape) == 2 and counted(module):
            values += n
            bits += 8 * info.nbytes + sum(8 * tensors[f"{module}.{s}"].nbytes for s in SCALE_SUFFIXES
                                          if f"{module}.{s}" in tensors)
            by_format[fmt or "bf16"] = by_format.get(fmt or "bf16", 0) + n
    if values == 0:
        raise ValueError("no Linear weights to count (every 2-D weight is an embedding or lm_head)")
    whole_bits = 8 * sum(i.nbytes for i in tensors.values())
    return BitsReport(bits / values, values, bits, whole_bits / whole_values if whole_values else float("nan"),
                      whole_values, dict(sorted(by_format.items())))


def checkpoint_layer_formats(quant: dict[str, Any], tensors: dict[str, TensorInfo], format_name: str) -> dict[str, str]:
    """Module -> format of each quantized Linear, from an export's hf_quant_config `quantization`."""
    from pipeline.core.formats import MIXED_PRECISION_QUANT_ALGO
    from pipeline.engines.export_rules import is_excluded, mixed_layer_rules

    if str(quant.get("quant_algo")).upper() == MIXED_PRECISION_QUANT_ALGO:
        return mixed_layer_rules(quant, [])
    exclude = [str(p) for p in quant.get("exclude_modules") or []]
    return {n[: -len(".weight")]: format_name for n, i in tensors.items()
            if n.endswith(".weight") and len(i.shape) == 2 and not is_excluded(n[: -len(".weight")], exclude)}


def checkpoint_bits(export_dir: Path, format_name: str) -> BitsReport:
    """effective_bits of an exported checkpoint directory (headers and JSON only)."""
    from pipeline.engines.export_rules import read_headers, read_quant_config

    tensors, _ = read_headers(Path(export_dir))
    quant = read_quant_config(Path(export_dir))
    return effective_bits(tensors, checkpoint_layer_formats(quant, tensors, format_name))


