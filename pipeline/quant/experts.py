"""Calibration coverage of a mixture-of-experts model's experts.

The known silent failure: an expert that receives no calibration token gets no activation range, and
its exported scale is missing or meaningless (NVIDIA/Model-Optimizer PR #1340). Two things guard it:

- ModelOpt 0.47 wraps transformers 5's fused experts (one `gate_up_proj` [E, 2I, h] and one
  `down_proj` [E, h, I] per layer, e.g. MixtralExperts) in `_QuantFusedExperts`
  (modelopt/torch/quantization/plugins/huggingface.py): one weight quantizer *per expert*, calibrated
  from that expert's own weights whether or not a token reaches it, and one input quantizer *per
  projection*, shared by the layer's experts, so an expert no token reached inherits the range of the
  inputs its siblings saw (they read the same hidden states). Layouts with per-expert input quantizers
  leave an unreached expert without a range, which `check_calibrated` refuses (modelopt_glue.py), and
  `verify_export` refuses any exported expert without its scales (engines/export_rules.py).
- The calibrate stage counts, during calibration, how many tokens the routers actually sent each
  expert (pipeline/sources/routing.py: top-k as served, never a forced calibration routing), and
  `coverage` turns that into the manifest's `experts` section: per layer and expert, the starved ones,
  and how their ranges were set.

ModelOpt's own mechanism to push tokens to every expert, `moe_calib_experts_ratio` (config.py,
QuantizeAlgorithmConfig; "currently works with a few HuggingFace models such as Mixtral, Qwen3Moe"),
is not used: with shared input quantizers it changes no input range of gate/up, and it multiplies the
experts' calibration compute by experts / top_k.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.sources.routing import RoutingCounts


def coverage(routing: RoutingCounts, model: nn.Module) -> dict[str, Any] | None:
    """The manifest's `experts` section; None for a dense model."""
    if not routing.per_layer:
        return None
    layers = sorted(routing.per_layer, key=_layer_order)
    counts = [routing.per_layer[name] for name in layers]
    flat = [n for row in counts for n in row]
    starved = [f"{name}.experts.{e}" for name, row in zip(layers, counts, strict=True)
               for e, n in enumerate(row) if n == 0]
    shared = {name: _input_range_is_shared(model.get_submodule(name)) for name in layers}
    return {
        "moe_layers": len(layers),
        "experts_per_layer": len(counts[0]),
        "routed_tokens": {name: row for name, row in zip(layers, counts, strict=True)},
        "routed_tokens_min": min(flat),
        "routed_tokens_max": max(flat),
        "starved_experts": starved,
        # How each starved expert got its ranges (see the module docstring).
        "starved_input_ranges": "shared with the layer's other experts" if all(shared.values())
        else "per expert (check_calibrated refuses one without a range)",
        "weight_ranges": "per expert, from its own weights",
    }


def _input_range_is_shared(block: nn.Module) -> bool:
    experts = block.experts
    return hasattr(experts, "gate_up_proj_input_quantizer") and not isinstance(experts, nn.ModuleList)


def _layer_order(name: str) -> tuple[int, str]:
    numbers = [int(p) for p in name.split(".") if p.isdigit()]
    return (numbers[0] if numbers else -1, name)
