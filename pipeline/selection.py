"""One selection rule for `forge list --gpu` and `forge pull MODEL --gpu`: both call `profile_rows`.

Like NIM's `list-model-profiles`, every artifact gets a row for the GPU asked about: compatible or
not, and why not (pipeline.registry.reject_reason: gate, compute capability, GPU count, memory).
Artifacts that were built but refused by their accuracy gate have no version to pull; the
directory registry records the refusal, so they appear as rows that say so instead of vanishing.
The row marked `selected` is what `forge pull <model> --gpu` takes (pipeline.registry.select_for_gpu).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.gpu_detect import LocalGpu
from pipeline.registry import reject_reason, select_for_gpu


@dataclass(frozen=True)
class ProfileRow:
    name: str
    version: str | None  # None: refused by its gate, never published
    model: str
    format: str
    gpu: str
    compute_capability: str
    compatible: bool
    reason: str  # why not, or why this one when selected
    selected: bool = False


def profile_rows(manifests: Iterable[Mapping[str, Any]], refusals: Iterable[Mapping[str, Any]],
                 gpu: LocalGpu, model: str | None = None) -> list[ProfileRow]:
    """A row per artifact (its best version for `gpu`, else its newest), then a row per gate refusal;
    the selected row of each model first within that model. `model` keeps one model's rows."""
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for manifest in manifests:
        if model is None or manifest["metadata"].get("model") == model:
            by_name.setdefault(manifest["name"], []).append(manifest)
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for versions in by_name.values():
        by_model.setdefault(versions[0]["metadata"].get("model", ""), []).extend(versions)
    chosen = {m: select_for_gpu(candidates, gpu) for m, candidates in by_model.items()}
    rows = []
    for name, versions in sorted(by_name.items()):
        best = select_for_gpu(list(versions), gpu)
        shown = best or max(versions, key=lambda m: _vkey(m["version"]))
        meta = shown["metadata"]
        selected = best is not None and chosen.get(meta.get("model", "")) is best
        reason = (("selected: " if selected else "compatible: ") + _why(meta, gpu)) if best is not None \
            else reject_reason(shown, gpu) or ""
        rows.append(ProfileRow(name, shown["version"], meta.get("model", ""), meta.get("format", ""),
                               meta.get("gpu", ""), meta.get("compute_capability", ""), best is not None, reason,
                               selected))
    for refusal in refusals:
        meta = refusal.get("metadata") or {}
        if model is not None and meta.get("model") != model:
            continue
        rows.append(ProfileRow(str(refusal.get("name")), None, meta.get("model", ""), meta.get("format", ""),
                               meta.get("gpu", ""), meta.get("compute_capability", ""), False,
                               f"built, but refused by its accuracy gate ({refusal.get('reason')}); nothing to pull"))
    return sorted(rows, key=lambda r: (r.model, not r.selected, not r.compatible, r.name))


def _why(meta: Mapping[str, Any], gpu: LocalGpu) -> str:
    exact = gpu.sku is not None and meta.get("gpu") == gpu.sku
    where = "built for this GPU" if exact else f"built for {meta.get('gpu')}, same compute capability"
    return f"{where}, {meta.get('bits_per_weight')} bits/weight"


def _vkey(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.lstrip("v").split("."))
