"""One selection rule for `forge list --gpu` and `forge pull MODEL --gpu`: both call `profile_rows`.

Like NIM's `list-model-profiles`, every artifact gets a row for the GPU asked about: compatible or
not, and why not (`reject_reason` below: gate, compute capability, GPU count, memory).
Artifacts that were built but refused by their accuracy gate have no version to pull; the
directory registry records the refusal, so they appear as rows that say so instead of vanishing.
The row marked `selected` is what `forge pull <model> --gpu` takes (`select_for_gpu`). `check_compatible` is pull's refusal
of an artifact built for another compute capability or runtime. What they are checked against, this machine:
`resolve_gpu` (the GPU `--gpu` names or NVML finds) and `installed_version` (a runtime's version here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

from pipeline.core.errors import RegistryError
from pipeline.core.gpus import GpuSpec
from pipeline.core.local_gpu import LocalGpu, detect_local_gpu
from pipeline.registry.artifacts import PASSING_VERDICT, parse_version

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- compatibility and selection


def compatibility_problems(
    manifest: Mapping[str, Any],
    local_gpu: LocalGpu | None,
    runtime_versions: Mapping[str, str | None] | None,
) -> list[str]:
    """Why this artifact should not run here; empty when it should.

    A TensorRT-LLM engine is bound to its compute capability and TensorRT version (TRT-LLM issues
    #222, #574), and ModelOpt / TRT-LLM / transformers versions are coupled, so an exact match
    of compute capability and of every runtime the caller reports is required. Runtimes the
    caller does not report (absent, or None = not installed) are not compared.
    """
    meta = manifest.get("metadata", {})
    problems = []
    if local_gpu is not None and meta.get("compute_capability") != local_gpu.compute_capability:
        problems.append(
            f"built for compute capability {meta.get('compute_capability')} ({meta.get('gpu')}), "
            f"this GPU ({local_gpu.name}) is {local_gpu.compute_capability}"
        )
    built = meta.get("runtime_versions", {})
    for package, local in sorted((runtime_versions or {}).items()):
        if local is None or package not in built:
            continue
        if built[package] != local:
            problems.append(f"built with {package} {built[package]}, this machine has {local}")
    return problems


def reject_reason(manifest: Mapping[str, Any], gpu: LocalGpu) -> str | None:
    """Why `select_for_gpu` would never choose this manifest for `gpu`; None if it is a candidate."""
    meta = manifest.get("metadata", {})
    verdict = meta.get("gate", {}).get("verdict")
    if verdict != PASSING_VERDICT:
        return f"accuracy gate verdict is {verdict!r}, not {PASSING_VERDICT!r}"
    if meta.get("compute_capability") != gpu.compute_capability:
        built = meta.get("compute_capability")
        return f"built for compute capability {built}, local GPU is {gpu.compute_capability}"
    tp = meta.get("tp", 1)
    if tp > gpu.count:
        return f"needs {tp} GPUs (tensor parallel), {gpu.count} available"
    need = meta.get("min_gpu_memory_bytes")
    if need is not None and need > gpu.memory_bytes:
        return f"needs {need} bytes of GPU memory, local GPU has {gpu.memory_bytes}"
    return None


def select_for_gpu(manifests: list[dict], gpu: LocalGpu) -> dict | None:
    """Pick the artifact to run on `gpu`, in the manner of NVIDIA NIM's profile selection.

    Candidates: gate verdict "pass", the same compute capability, tp within the local GPU
    count, and (when recorded) memory need within the local GPU. Among them prefer the exact
    SKU (`metadata.gpu == gpu.sku`: its runtime config was sized for this card's memory), then
    fewer bits per weight, then the newest version; the name breaks remaining ties so the
    answer never depends on input order. None when nothing qualifies (see `reject_reason`).
    """
    candidates = [m for m in manifests if reject_reason(m, gpu) is None]
    if not candidates:
        return None

    def rank(manifest: Mapping[str, Any]) -> tuple:
        meta = manifest["metadata"]
        major, minor, patch = parse_version(manifest["version"])
        exact = gpu.sku is not None and meta.get("gpu") == gpu.sku
        return (0 if exact else 1, float(meta["bits_per_weight"]), -major, -minor, -patch, manifest["name"])

    return min(candidates, key=rank)


def check_compatible(manifest: Mapping[str, Any], where: str, local_gpu: LocalGpu | None,
                     runtime_versions: Mapping[str, str | None] | None, force: bool) -> list[str]:
    """The compatibility problems pull accepts because of --force; without it, the refusal."""
    problems = compatibility_problems(manifest, local_gpu, runtime_versions)
    if problems and not force:
        raise RegistryError(
            where,
            "does not match this machine: " + "; ".join(problems) + ".",
            "pull the artifact built for this GPU and runtime (`forge list`), or pass --force to pull anyway.",
        )
    for problem in problems:
        log.warning("%s: pulling despite: %s", where, problem)
    return problems


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
        shown = best or max(versions, key=lambda m: parse_version(m["version"]))
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


# --------------------------------------------------------------------------- this machine


def resolve_gpu(gpu: str | None, catalog: Mapping[str, GpuSpec], count: int | None) -> LocalGpu | None:
    """The GPU the pulled artifact will run on: detected (`auto`, or by default when NVML finds one),
    or a catalog GPU described by its datasheet values."""
    if gpu is None or gpu == "auto":
        detected = detect_local_gpu({key: spec.nvml_names for key, spec in catalog.items()})
        if detected is None and gpu == "auto":
            raise RegistryError("--gpu auto", "no NVIDIA GPU detected (NVML found no device).",
                                f"pass --gpu <key>, one of {', '.join(catalog)}.")
        if detected is None:
            log.info("no local NVIDIA GPU detected: compute capability not checked (pass --gpu KEY to check)")
            return None
        return detected if count is None else LocalGpu(detected.name, detected.compute_capability,
                                                       detected.memory_bytes, count, detected.sku)
    if gpu not in catalog:
        raise RegistryError("--gpu", f"unknown GPU {gpu!r}.", f"use 'auto' or one of {', '.join(catalog)}.")
    spec = catalog[gpu]
    return LocalGpu(spec.name, spec.compute_capability, spec.memory_bytes, count or 1, gpu)


def installed_version(distribution: str) -> str | None:
    """The version of `distribution` installed here, None when it is not: the runtime versions that
    publish records and pull compares (`compatibility_problems`)."""
    try:
        return importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return None
