"""How many tokens a loaded mixture-of-experts model's routers send each expert: hooks on the routers,
counting only inside `RoutingCounts.counting()` (the upcycle probe, the calibration passes)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class RoutingCounts:
    """Tokens the routers sent each expert while counting: layer module name -> per-expert counts."""

    per_layer: dict[str, list[int]] = field(default_factory=dict)
    active: bool = False

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count only inside this block (the calibration passes, not the probes around them)."""
        self.active = True
        try:
            yield
        finally:
            self.active = False


@contextlib.contextmanager
def count_routing(model: nn.Module) -> Iterator[RoutingCounts]:
    """Hook every MoE block's router; tokens are counted inside `counts.counting()`. A block is a module
    with a `gate` (the router) and `experts`; transformers 5 routers return (logits, scores,
    indices) (MixtralTopKRouter, Qwen3MoeTopKRouter), older ones the logits, whose top-k is taken."""
    import torch

    counts = RoutingCounts()
    hooks = []
    for name, block in model.named_modules():
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if gate is None or experts is None:
            continue
        total = int(getattr(gate, "num_experts", 0) or getattr(experts, "num_experts", 0) or len(experts))
        top_k = getattr(gate, "top_k", None) or getattr(block, "top_k", None)
        counts.per_layer[name] = [0] * total

        def hook(_module: Any, _args: Any, output: Any, name: str = name, total: int = total,
                 top_k: int | None = top_k) -> None:
            if not counts.active:
                return
            with torch.no_grad():
                if isinstance(output, tuple) and len(output) >= 3:
                    indices = output[2]
                else:
                    logits = output[0] if isinstance(output, tuple) else output
                    indices = torch.topk(logits.float(), int(top_k), dim=-1).indices
                if top_k is not None and indices.shape[-1] != top_k:
                    return  # a calibration pass with forced routing: not the served top-k
                found = torch.bincount(indices.reshape(-1).cpu(), minlength=total).tolist()
            row = counts.per_layer[name]
            for e, n in enumerate(found):
                row[e] += int(n)

        hooks.append(gate.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()
