"""The ModelOpt quant config of a recipe: a named preset, forge's exclusions, the KV-cache choice.

Written against nvidia-modelopt 0.47 (pinned); the order of use is in pipeline/quant/modelopt_glue.py.
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.quant.modelopt_glue import modelopt_version, stdout_to_debug_log


def build_quant_config(modelopt_preset: str, kv_cache: str, exclude: list[str],
                       extra_entries: list[dict[str, Any]] | None = None,
                       algorithm: Any = "preset") -> dict[str, Any]:
    """Return a fresh ModelOpt quant config: the named preset + exclusions + KV-cache choice.

    `modelopt_preset` names a config in `modelopt.torch.quantization` (e.g. "FP8_DEFAULT_CFG");
    `kv_cache` is a name from the format registry's KV_CACHE_DTYPES ("auto" keeps the KV cache
    in the model dtype); `exclude` holds fnmatch patterns over module names ("*lm_head*",
    "*layers.0.*", "model.layers.3.mlp.down_proj") whose quantizers stay disabled.

    `extra_entries` (per-layer overrides, pipeline/quant/mixed.py) go after the exclusions, so
    they win over them, and before the KV entries. `algorithm` replaces the preset's calibration
    algorithm (a ModelOpt method name or dict; pipeline/quant/algorithms.py); "preset" keeps it.

    The shared preset is never mutated: ModelOpt's presets are module-level dicts that every
    caller in the process sees.

    lm_head stays BF16 without any help from us: every 0.47 model preset imports
    `modelopt_recipes/configs/ptq/units/default_disabled_quantizers.yaml`, whose
    `{quantizer_name: '*lm_head*', enable: false}` entry is what decides it (the presets also
    disable `nn.Embedding` by parent class, so embeddings are never quantized either).
    """
    # Imported lazily: importing ModelOpt takes seconds and registers plugins; modules that
    # only need the dataclasses below should not pay for it.
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.config import choices as modelopt_choices
    from modelopt.torch.quantization.utils import update_quant_cfg_with_kv_cache_quant

    from pipeline.core.formats import KV_CACHE_DTYPES

    # KV-only presets (FP8_KV_CFG, ...) are chosen through `kv_cache`, never as the preset.
    model_presets = sorted(c for c in modelopt_choices if c.endswith("_CFG") and "_KV_" not in c)
    if modelopt_preset not in model_presets:
        known = ", ".join(model_presets)
        raise RecipeError(
            "format.modelopt_config",
            f"{modelopt_preset!r} is not a ModelOpt {modelopt_version()} quantization preset.",
            f"use one of: {known}.",
        )
    if kv_cache not in KV_CACHE_DTYPES:
        raise RecipeError(
            "kv_cache_dtype",
            f"unknown KV-cache dtype {kv_cache!r}.",
            f"use one of: {', '.join(KV_CACHE_DTYPES)}.",
        )
    config = copy.deepcopy(getattr(mtq, modelopt_preset))
    # 0.47 presets hold an ordered list; entries apply in order and later ones win
    # (docstring of modelopt.torch.quantization.conversion.set_quantizer_by_cfg).
    config["quant_cfg"] = list(config.get("quant_cfg") or []) + exclude_entries(exclude) + list(extra_entries or [])
    if algorithm != "preset":
        config["algorithm"] = copy.deepcopy(algorithm)

    kv_preset = KV_CACHE_DTYPES[kv_cache].modelopt_config
    if kv_preset is not None:
        # The same helper hf_ptq.py uses (examples/llm_ptq/hf_ptq.py, 0.47): it deep-copies,
        # appends the KV entries and sets algorithm "max" when the preset has none (MXFP4 has
        # `algorithm: None`, but KV scales need calibrating). Appending the KV entries after our
        # exclusions is deliberate: TensorRT-LLM allocates one KV pool with one dtype
        # (KvCacheConfig.dtype), so a layer excluded from weight quantization keeps a
        # quantized KV cache and still needs its k/v scales.
        # It prints the whole merged config on one line (print_rank_0 in
        # modelopt/torch/quantization/utils/core_utils.py, 0.47): DEBUG only.
        with stdout_to_debug_log("modelopt: "):
            config = update_quant_cfg_with_kv_cache_quant(config, copy.deepcopy(getattr(mtq, kv_preset)["quant_cfg"]))
    return config


def exclude_entries(exclude: list[str]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for pattern in exclude:
        if not isinstance(pattern, str) or not pattern.strip():
            raise RecipeError(
                "exclude",
                f"exclude patterns must be non-empty strings, got {pattern!r}.",
                'write module-name patterns such as "*lm_head*" or "*layers.0.*".',
            )
        # ModelOpt matches quantizer names ("model.layers.0.mlp.down_proj.weight_quantizer"),
        # so a plain module name matches nothing on its own; also cover its children.
        entries.append({"quantizer_name": pattern, "enable": False})
        if not pattern.endswith("*"):
            entries.append({"quantizer_name": f"{pattern}.*", "enable": False})
    return entries
