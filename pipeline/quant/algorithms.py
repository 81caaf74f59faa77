"""Calibration algorithms forge offers, as ModelOpt 0.47 names them: the one vocabulary.

`quant.algorithm` in a recipe is a key of ALGORITHMS; nothing else spells the list out. Each name
is the `method` literal of one ModelOpt config class in `modelopt/torch/quantization/config.py`
(0.47: MaxCalibConfig "max", MseCalibConfig "mse", AWQLiteCalibConfig "awq_lite",
AWQClipCalibConfig "awq_clip", AWQFullCalibConfig "awq_full", GPTQCalibConfig "gptq",
NVFP4ActHeadroomCalibConfig "nvfp4_act_headroom"); tests/unit/test_quant_algorithms.py checks
every row against the installed ModelOpt. `formats` says which forge formats (pipeline/core/formats.py)
an algorithm applies to; the evidence is the ModelOpt preset that pairs them (`preset`) or, where
ModelOpt ships none, what was measured on CPU (noted).

ModelOpt methods forge does not offer, and why (NOT_OFFERED): the recipe error names the reason.
This module imports nothing heavy: recipe validation and the slim install use it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str              # the ModelOpt `method` literal, also the recipe spelling
    modelopt_class: str    # config class in modelopt.torch.quantization.config
    formats: tuple[str, ...]  # forge format names it applies to
    preset: str | None     # a ModelOpt 0.47 preset that pairs it with the first format
    description: str


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("max", "MaxCalibConfig", ("fp8", "nvfp4", "mxfp4", "w4a8_mxfp4_fp8"), "NVFP4_DEFAULT_CFG",
                  "per-tensor amax = max |x| seen (the presets' default; MX weight scales are dynamic)"),
        # MSE searches a per-tensor amax multiplier (start 0.25, stop 4.0, step 0.1 by default);
        # MX formats have no per-tensor amax to search. NVFP4_FOUR_OVER_SIX_CFG pairs it with NVFP4.
        Algorithm("mse", "MseCalibConfig", ("nvfp4", "fp8"), "NVFP4_FOUR_OVER_SIX_CFG",
                  "weight amax chosen to minimise the weight's quantize-dequantize MSE"),
        # AWQ's search runs on CPU through forge's reference, but on SmolLM2-style Llamas its export
        # is NVFP4_AWQ (TensorRT-LLM's QuantAlgo has no such member) and, after ModelOpt's export
        # re-smoothing, gate/up weight_scale_2 differ, which the export check refuses
        # (tests/unit/test_quant_mixed.py). Offered for exploring; no shipped recipe uses it.
        Algorithm("awq_lite", "AWQLiteCalibConfig", ("nvfp4",), "NVFP4_AWQ_LITE_CFG",
                  "AWQ per-input-channel smoothing scale searched over alpha in [0, 1]"),
        Algorithm("awq_clip", "AWQClipCalibConfig", ("nvfp4",), "NVFP4_AWQ_CLIP_CFG",
                  "AWQ clipping: per-block amax searched in [0.5, 1] x amax"),
        Algorithm("awq_full", "AWQFullCalibConfig", ("nvfp4",), "NVFP4_AWQ_FULL_CFG",
                  "awq_lite followed by awq_clip"),
        # No 0.47 preset pairs GPTQ with a format; it ran here with NVFP4_DEFAULT_CFG on a tiny Llama
        # (CPU, weights updated layer by layer, exported as plain NVFP4).
        Algorithm("gptq", "GPTQCalibConfig", ("nvfp4",), None,
                  "GPTQ: Hessian-based weight updates that compensate rounding, layer by layer"),
        Algorithm("nvfp4_act_headroom", "NVFP4ActHeadroomCalibConfig", ("nvfp4",), None,
                  "NVFP4 activation global scale from a percentile of block amaxes (weights: max)"),
    )
}

NOT_OFFERED: dict[str, str] = {
    # INT8_SMOOTHQUANT_CFG is its only preset; on NVFP4 ModelOpt smoothed 0 modules (measured).
    "smoothquant": "ModelOpt applies SmoothQuant to INT8 (INT8_SMOOTHQUANT_CFG), a format forge has no engine row for",
    # Its preset NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG switches weights to static NVFP4 blocks with an
    # FP8 scale sweep; forge's CPU reference simulates dynamic blocks only, and with dynamic blocks
    # ModelOpt searched 0 weights (measured).
    "local_hessian": "needs static NVFP4 weight blocks (NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG), which forge's CPU reference does not simulate",
    # Exports quant_algo NVFP4_SVD with a low-rank BF16 branch per Linear (quant_utils.py
    # process_layer_quant_config); no engine contract in pipeline/engines/contracts.py loads it.
    "svdquant": "exports NVFP4_SVD (an extra low-rank branch per Linear), which no engine contract in pipeline/engines/contracts.py loads",
    "lsq": "learns scales by training (LSQConfig), not post-training calibration",
}


def default_algorithm(format_name: str) -> str | None:
    """What the format's own ModelOpt preset uses (MXFP4 presets have `algorithm: None`)."""
    return None if format_name in ("mxfp4", "w4a8_mxfp4_fp8") else "max"


def algorithm_problem(name: str, format_name: str) -> tuple[str, str] | None:
    """(problem, fix) when `name` is not a calibration algorithm forge runs for `format_name`."""
    if name in NOT_OFFERED:
        return (f"{name!r} is a ModelOpt method forge does not offer: {NOT_OFFERED[name]}.",
                f"use one of {', '.join(for_format(format_name))} for {format_name}.")
    algo = ALGORITHMS.get(name)
    if algo is None:
        return (f"unknown calibration algorithm {name!r}.",
                f"use one of {', '.join(for_format(format_name))} for {format_name} (pipeline/quant/algorithms.py).")
    if format_name not in algo.formats:
        return (f"{name!r} does not apply to {format_name} (it applies to {', '.join(algo.formats)}).",
                f"use one of {', '.join(for_format(format_name))} for {format_name}.")
    return None


def for_format(format_name: str) -> list[str]:
    return [a.name for a in ALGORITHMS.values() if format_name in a.formats]


# AWQ's smoothing leaves `pre_quant_scale` on Linears it cannot fold into a preceding layer, and
# the export then names the format NVFP4_AWQ (pipeline/core/formats.py AWQ_QUANT_ALGOS); awq_clip only
# clips, so its export keeps the plain name.
SMOOTHING = frozenset({"awq_lite", "awq_full"})


def allowed_quant_algos(quant: object) -> list[str]:
    """quant_algo values an export of this recipe quant section may carry (hf_quant_config.json).

    One format and no per-layer change: the format's own (or its AWQ spelling). Overrides or
    `auto` may also produce MIXED_PRECISION (whether they do depends on what they pick)."""
    from pipeline.core.formats import AWQ_QUANT_ALGOS, FORMATS, MIXED_PRECISION_QUANT_ALGO

    fmt = quant.format  # type: ignore[attr-defined]
    algos = [FORMATS[fmt].quant_algo]
    if getattr(quant, "algorithm", None) in SMOOTHING and fmt in AWQ_QUANT_ALGOS:
        algos.append(AWQ_QUANT_ALGOS[fmt])
    if getattr(quant, "overrides", None) or getattr(quant, "auto", None):
        algos.append(MIXED_PRECISION_QUANT_ALGO)
    return algos
