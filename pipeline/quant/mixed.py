"""Per-layer formats: recipe overrides and ModelOpt auto_quantize, mapped onto ModelOpt quant_cfg.

A recipe's `quant` section becomes one ModelOpt config (`quant_config_for`):

    preset of quant.format (its algorithm replaced by quant.algorithm)
    + exclude entries + override entries                     (quant_config.build_quant_config)
    + KV-cache entries

With `quant.auto`, `search_auto` first runs `mtq.auto_quantize` on a throwaway copy of the model
and `mtq.get_auto_quantize_config` turns its choice into explicit per-quantizer entries
(model_quant.py, 0.47); those replace the preset's, and calibration then runs exactly as for a
one-format recipe. Overrides still apply on top (the user wins).

Fused groups: TensorRT-LLM builds one Linear per q/k/v and gate/up group and gives it the quant
config of the group's *first* shard in `quantized_layers` (DecoderModelForCausalLM.__post_init__,
tensorrt_llm/_torch/models/modeling_utils.py: `prefix_name + '.q_proj'`, `'.gate_proj'`), so a
group split across formats would load its other shards wrongly. ModelOpt's search keeps groups
whole (AutoQuantizeSearcher.quant_grouping_rules); `check_fused_groups` refuses overrides that split
one, after quantizer insertion and before any calibration forward pass.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import RecipeError
from pipeline.core.formats import FORMATS

log = logging.getLogger(__name__)

BF16 = "bf16"  # the override value that keeps a layer unquantized
_QUANTIZERS = ("weight_quantizer", "input_quantizer")


def override_entries(overrides: Mapping[str, str]) -> list[dict[str, Any]]:
    """ModelOpt quant_cfg entries for `pattern -> format` overrides, in recipe order.

    A format override copies that format's preset cfg for `*weight_quantizer` and
    `*input_quantizer` onto the pattern's quantizers; `bf16` disables them (as `exclude` does).
    Patterns are fnmatch patterns over module names; ModelOpt matches quantizer names
    ("model.layers.0.mlp.down_proj.weight_quantizer"), so the quantizer name is appended."""
    import modelopt.torch.quantization as mtq

    from pipeline.quant.quant_config import exclude_entries

    entries: list[dict[str, Any]] = []
    for pattern, fmt in overrides.items():
        if fmt == BF16:
            entries.extend(exclude_entries([pattern]))
            continue
        preset = getattr(mtq, FORMATS[fmt].modelopt_config)
        for quantizer in _QUANTIZERS:
            cfg = next(e["cfg"] for e in preset["quant_cfg"] if e.get("quantizer_name") == f"*{quantizer}")
            joiner = "" if pattern.endswith("*") else "."
            entries.append({"quantizer_name": f"{pattern}{joiner}{quantizer}", "cfg": copy.deepcopy(cfg), "enable": True})
    return entries


def algorithm_for(format_name: str, algorithm: str | None) -> Any:
    """The ModelOpt `algorithm` value for a format: the recipe's, or "preset" (keep the preset's)."""
    return "preset" if algorithm is None else algorithm


def quant_config_for(quant: Any, auto_entries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The full ModelOpt config for a recipe's quant section (a pipeline.recipe.schema.QuantSection)."""
    from pipeline.quant.quant_config import build_quant_config

    config = build_quant_config(FORMATS[quant.format].modelopt_config, quant.kv_cache_dtype, list(quant.exclude),
                                extra_entries=override_entries(quant.overrides),
                                algorithm=algorithm_for(quant.format, quant.algorithm))
    if auto_entries is not None:
        # The searched per-quantizer entries replace the preset's format entries; exclusions,
        # overrides and the KV cache (already in `config`) come after them and still apply.
        kept = [e for e in config["quant_cfg"] if e.get("quantizer_name") not in ("*weight_quantizer", "*input_quantizer")]
        config["quant_cfg"] = kept[:1] + list(auto_entries) + kept[1:]
    return config


# --------------------------------------------------------------------------------------------
# What format each Linear got
# --------------------------------------------------------------------------------------------


def quantizer_format(weight_q: Any, input_q: Any) -> str:
    """The forge format name of one QuantLinear's quantizers ("bf16" when its weight is not quantized)."""
    if weight_q is None or not weight_q.is_enabled:
        return BF16
    w_bits = tuple(weight_q.num_bits) if isinstance(weight_q.num_bits, (tuple, list)) else weight_q.num_bits
    scale_bits = tuple((weight_q.block_sizes or {}).get("scale_bits") or ())
    in_bits = tuple(input_q.num_bits) if input_q is not None and input_q.is_enabled else None
    if w_bits == (4, 3):
        return "fp8"
    if w_bits == (2, 1) and scale_bits == (4, 3):
        return "nvfp4"
    if w_bits == (2, 1) and scale_bits == (8, 0):
        return "w4a8_mxfp4_fp8" if in_bits == (4, 3) else "mxfp4"
    return f"other(num_bits={w_bits}, block_sizes={weight_q.block_sizes})"


def layer_formats(model: nn.Module) -> dict[str, str]:
    """Module name -> format for every module with a weight quantizer (QuantLinear)."""
    out = {}
    for name, module in model.named_modules():
        weight_q = getattr(module, "weight_quantizer", None)
        if weight_q is not None and hasattr(module, "weight"):
            out[name] = quantizer_format(weight_q, getattr(module, "input_quantizer", None))
    return out


def check_fused_groups(model: nn.Module) -> None:
    """Refuse a model whose q/k/v or gate/up shards ended up in different formats (see module doc)."""
    from pipeline.engines.export_rules import FUSED_SHARD_GROUPS

    formats = layer_formats(model)
    split = []
    for parent in sorted({n.rsplit(".", 1)[0] for n in formats if "." in n}):
        for group in FUSED_SHARD_GROUPS:
            found = {s: formats.get(f"{parent}.{s}") for s in group}
            if None not in found.values() and len(set(found.values())) > 1:
                split.append(f"{parent} ({', '.join(f'{s} {f}' for s, f in found.items())})")
    if split:
        raise RecipeError(
            "quant.overrides",
            f"{len(split)} fused group(s) split across formats: {'; '.join(split[:4])}"
            + (f" and {len(split) - 4} more" if len(split) > 4 else "") + "; engines run each group as one GEMM in one format.",
            'give every shard of a group the same format, e.g. "*layers.3.self_attn.*" or "*layers.3.mlp.*" '
            "(down_proj and o_proj may differ).",
        )


def format_counts(formats: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fmt in formats.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------
# auto_quantize
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoResult:
    entries: list[dict[str, Any]]   # per-quantizer quant_cfg entries ModelOpt chose
    seconds: float
    target_bits: float          # forge's definition (decoder Linears, pipeline/quant/bits.py)
    modelopt_target_bits: float  # the same budget in ModelOpt's cost model (all Linears)
    formats: dict[str, int] = field(default_factory=dict)  # chosen format -> Linears

    def to_dict(self) -> dict[str, Any]:
        """What the calibrate manifest records; not `seconds` (the run's `auto_quantize_s` timing:
        a manifest holds no wall-clock byte, pipeline/handoff/manifest.py)."""
        return {"target_bits": self.target_bits, "modelopt_target_bits": self.modelopt_target_bits,
                "formats": dict(self.formats)}


def candidate_config(format_name: str, algorithm: str | None, backend: str | None) -> dict[str, Any]:
    """One auto_quantize candidate: the format's preset (+ the recipe's algorithm where it applies);
    its FP4 quantizers name `backend` (forge's CPU reference) when one is given."""
    import modelopt.torch.quantization as mtq

    from pipeline.quant.algorithms import ALGORITHMS

    config = copy.deepcopy(getattr(mtq, FORMATS[format_name].modelopt_config))
    if algorithm is not None and format_name in ALGORITHMS[algorithm].formats:
        config["algorithm"] = algorithm
    if backend is not None:
        for entry in config["quant_cfg"]:
            cfg = entry.get("cfg")
            if isinstance(cfg, dict) and tuple(cfg.get("num_bits") or ()) == (2, 1):
                cfg["backend"] = backend
    return config


def search_auto(model: nn.Module, quant: Any, batches: Sequence[Mapping[str, torch.Tensor]],
                device: torch.device) -> AutoResult:
    """Run ModelOpt auto_quantize on a copy of `model` and return its per-quantizer choice.

    The copy is discarded: the real model is then quantized and calibrated from the returned
    entries like any recipe, so save/restore, fused-scale unification and export see one path."""
    import modelopt.torch.quantization as mtq

    from pipeline.quant.modelopt_glue import stdout_to_debug_log
    from pipeline.quant.simulate import fp4_reference_backend

    auto = quant.auto
    data = [{"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device)} for b in batches]
    if not data:
        raise RecipeError("quant.auto", "auto_quantize needs calibration batches to score layers.",
                          "set calibration.num_samples >= 1.")

    def forward_step(m: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["input_ids"], use_cache=False)

    disabled = search_disabled(quant.exclude)
    modelopt_bits = modelopt_target_bits(model, auto.effective_bits, disabled)
    start = time.perf_counter()
    search_model = copy.deepcopy(model)
    with fp4_reference_backend(on_cuda=device.type == "cuda") as backend:
        candidates = [candidate_config(f, quant.algorithm, backend) for f in auto.formats]
        kwargs: dict[str, Any] = ({"loss_func": lambda output, _batch: output.loss} if auto.method == "gradient"
                                  else {"forward_step": lambda m, b: forward_step(m, b).logits})
        with stdout_to_debug_log("modelopt auto_quantize: "):
            _, state = mtq.auto_quantize(
                search_model, constraints={"effective_bits": modelopt_bits}, quantization_formats=candidates,
                data_loader=data, forward_step=kwargs.pop("forward_step", forward_step),
                num_calib_steps=len(data), num_score_steps=min(auto.score_batches, len(data)),
                disabled_layers=disabled,
                method=auto.method, **kwargs)
            config = mtq.get_auto_quantize_config(state)
    formats = format_counts(layer_formats(search_model))
    del search_model
    entries = [_strip_backend(e) for e in config["quant_cfg"]]
    seconds = time.perf_counter() - start
    log.info("auto_quantize: target %.2f bits, chose %s in %.1f s", auto.effective_bits, formats, seconds)
    return AutoResult(entries, seconds, auto.effective_bits, modelopt_bits, formats)


# ModelOpt's search would otherwise score lm_head too (it chose FP8 for it on a tiny Llama) although
# every preset keeps it BF16 (default_disabled_quantizers.yaml), and TensorRT-LLM does not even load
# lm_head weights when embeddings are tied (`tie_word_embeddings`, _load_weights_impl in
# tensorrt_llm/_torch/models/modeling_utils.py); disabling it also takes it out of ModelOpt's cost.
_ALWAYS_BF16 = ("*lm_head*",)
_PER_TENSOR_SCALE_BITS = 64  # weight_scale(_2) + input_scale, FP32 each (export_rules.EXPORT_RULES)


def modelopt_target_bits(model: nn.Module, target: float, disabled: Sequence[str]) -> float:
    """ModelOpt's effective-bits target for forge's `target` (pipeline/quant/bits.py definition).

    ModelOpt's weight cost model divides by *every* Linear weight, disabled ones counted at 16 bits
    (measured: "minimum achievable effective bits is 6.59" for a tiny Llama whose lm_head is 18% of
    its Linear weights; model_quant.py / _auto_quantize_cost.py, 0.47); forge's denominator is the
    decoder Linears only. Same per-format bits on both sides (NVFP4 4.5, FP8 8: ModelOpt prints
    "effective-bits: 4.5"), so the translation is exact:
    (target' * searched + 16 * disabled) / (searched + disabled), where target' leaves room for the
    two FP32 per-tensor scalars each quantized Linear also stores (64 bits; bits.py counts them,
    ModelOpt's cost does not), so the exported checkpoint stays within `target`."""
    import fnmatch

    searched = fixed = linears = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            n = module.weight.numel()
            if any(fnmatch.fnmatchcase(name, p) for p in disabled):
                fixed += n
            else:
                searched += n
                linears += 1
    if searched == 0:
        raise RecipeError("quant.auto", "no Linear layer is left to search.", "narrow quant.exclude.")
    room = target - _PER_TENSOR_SCALE_BITS * linears / searched
    return (room * searched + 16.0 * fixed) / (searched + fixed)


def search_disabled(exclude: Sequence[str]) -> list[str]:
    return list(_ALWAYS_BF16) + [p if p.endswith("*") else f"{p}*" for p in exclude]


def _strip_backend(entry: dict[str, Any]) -> dict[str, Any]:
    """The CPU reference backend is a search-time detail; the calibrated model routes FP4 itself
    (modelopt_glue.calibrate), and its saved state must not name a backend no one registered."""
    entry = copy.deepcopy(entry)
    cfg = entry.get("cfg")
    if isinstance(cfg, dict):
        cfg.pop("backend", None)
    return entry
