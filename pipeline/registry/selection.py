"""One selection rule for `forge list --gpu` and `forge pull MODEL --gpu`: both call `profile_rows`.

Like NIM's `list-model-profiles`, every artifact gets a row for the GPU asked about: compatible or
not, and why not (`reject_reason` below: gate, compute capability, GPU count, memory). Compute
capability is checked by the format's floor, not an exact match (`capability_problem`), except for
a serialized TensorRT engine, which runs only where it was built.
Artifacts that were built but refused by their accuracy gate have no version to pull; the
directory registry records the refusal, so they appear as rows that say so instead of vanishing.
The row marked `selected` is what `forge pull <model> --gpu` takes (`select_for_gpu`). `check_compatible` is pull's refusal
of an artifact this GPU cannot run, or built for another runtime; `sizing_caveats` what pull says when
it runs one built for another GPU. What they are checked against, this machine:
`resolve_gpu` (the GPU `--gpu` names or NVML finds) and `installed_version` (a runtime's version here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

from pipeline.core.errors import RegistryError
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES, ComputeCapability, canonical_kv_dtype
from pipeline.core.gpus import GpuSpec
from pipeline.core.layout import OPTIONS_FILE
from pipeline.core.local_gpu import LocalGpu, detect_local_gpu
from pipeline.registry.artifacts import PASSING_VERDICT, PUBLISHED_VERDICTS, parse_version

log = logging.getLogger(__name__)

GIB = 1 << 30  # memory as nvidia-smi counts it (MiB x 2^20, pipeline/core/data/gpus.yaml)


# --------------------------------------------------------------------------- compatibility and selection


def capability_problem(meta: Mapping[str, Any], gpu: LocalGpu) -> str | None:
    """Why an artifact cannot run on `gpu`'s compute capability; None when it can.

    A serialized TensorRT engine (`engine: tensorrt`, trtllm-build) holds kernels compiled for one
    compute capability and runs only there (TRT-LLM issues #222, #574). The default bundle (`engine:
    pytorch`, or no `engine` recorded: the unified checkpoint and LLM-API options) holds no kernels:
    TensorRT-LLM picks them for the GPU it loads on, and its contract for a checkpoint format is a
    minimum compute capability, not one value (`min_cc` of each row in pipeline/engines/contracts.py,
    read off tensorrt_llm/_torch/modules/linear.py). So what a bundle needs is the GPU's support for
    its format and KV-cache dtype: the compute-capability floors of pipeline/core/formats.py.
    """
    built, here = meta.get("compute_capability"), gpu.compute_capability
    if meta.get("engine") == "tensorrt":
        if built == here:
            return None
        return (f"a TensorRT engine built for compute capability {built} ({meta.get('gpu')}) runs only there; "
                f"this GPU ({gpu.name}) is {here}")
    fmt = FORMATS.get(meta.get("format"))
    kv = KV_CACHE_DTYPES.get(canonical_kv_dtype(str(meta.get("kv_cache_dtype") or "auto")))
    if fmt is None or kv is None:  # a format this forge does not know: only where it was built is known
        if built == here:
            return None
        return (f"format {meta.get('format')!r} (KV cache {meta.get('kv_cache_dtype')!r}) is unknown to this forge: "
                f"known to run on compute capability {built} only; this GPU ({gpu.name}) is {here}")
    cc = ComputeCapability.parse(here)
    floors = ((f"{fmt.name} weights need", fmt.min_compute_capability),
              (f"the {kv.name} KV cache needs", kv.min_compute_capability))
    for what, floor in floors:
        if cc < floor:
            return f"{what} compute capability {floor} or newer; this GPU ({gpu.name}) is {here}"
    return None


def sizing_caveats(manifest: Mapping[str, Any], gpu: LocalGpu | None) -> tuple[str, ...]:
    """What to know when an artifact runs on another GPU than it was built for: its runtime options
    (max batch, tokens, KV-cache share in llm_api_options.yaml) were planned for that GPU's memory."""
    meta = manifest.get("metadata", {})
    if gpu is None or (meta.get("gpu") == gpu.sku if gpu.sku else meta.get("gpu_name") == gpu.name):
        return ()
    built = meta.get("gpu_name") or meta.get("gpu")
    memory = (meta.get("memory_plan") or {}).get("memory_bytes")
    sized = f"{built} ({meta.get('gpu')}{f', {memory / GIB:.0f} GiB' if memory else ''})"
    caveat = (f"{OPTIONS_FILE}'s runtime options were sized for the memory of {sized}, not of this GPU, "
              f"{gpu.name} ({gpu.sku or 'not in the catalog'}, {gpu.memory_bytes / GIB:.0f} GiB): they run, but "
              f"batch and KV cache are not planned for it; `forge plan RECIPE --gpu {gpu.sku or 'KEY'}` plans them")
    return (caveat,)


def compatibility_problems(
    manifest: Mapping[str, Any],
    local_gpu: LocalGpu | None,
    runtime_versions: Mapping[str, str | None] | None,
) -> list[str]:
    """Why this artifact should not run here; empty when it should.

    The GPU: `capability_problem`. ModelOpt / TRT-LLM / transformers versions are coupled, so every
    runtime the caller reports must match the one the bundle was made with. Runtimes the caller does
    not report (absent, or None = not installed) are not compared.
    """
    meta = manifest.get("metadata", {})
    problems = []
    if local_gpu is not None and (problem := capability_problem(meta, local_gpu)) is not None:
        problems.append(problem)
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
    if verdict not in PUBLISHED_VERDICTS:
        return f"accuracy gate verdict is {verdict!r}, not one that publishes ({', '.join(PUBLISHED_VERDICTS)})"
    if (problem := capability_problem(meta, gpu)) is not None:
        return problem
    tp = meta.get("tp", 1)
    if tp > gpu.count:
        return f"needs {tp} GPUs (tensor parallel), {gpu.count} available"
    need = meta.get("min_gpu_memory_bytes")
    if need is not None and need > gpu.memory_bytes:
        return f"needs {need} bytes of GPU memory, local GPU has {gpu.memory_bytes}"
    return None


def select_for_gpu(manifests: list[dict], gpu: LocalGpu) -> dict | None:
    """Pick the artifact to run on `gpu`, in the manner of NVIDIA NIM's profile selection.

    Candidates: a gate verdict that publishes (PASS, or INCONCLUSIVE published by its recipe's
    `eval.gates.inconclusive: publish`; the same rule as publish, GATE_RULE), runnable on this compute capability (`capability_problem`), tp
    within the local GPU count, and (when recorded) memory need within the local GPU. Among them
    prefer a PASS (an INCONCLUSIVE one is chosen only where no PASS qualifies), then the exact SKU
    (`metadata.gpu == gpu.sku`: its runtime config was sized for this card's memory), then fewer bits per weight, then the newest version; the name breaks remaining ties so
    the answer never depends on input order. None when nothing qualifies (see `reject_reason`).
    """
    candidates = [m for m in manifests if reject_reason(m, gpu) is None]
    if not candidates:
        return None

    def rank(manifest: Mapping[str, Any]) -> tuple:
        meta = manifest["metadata"]
        major, minor, patch = parse_version(manifest["version"])
        exact = gpu.sku is not None and meta.get("gpu") == gpu.sku
        return (meta["gate"]["verdict"] != PASSING_VERDICT, not exact, float(meta["bits_per_weight"]), -major, -minor, -patch, manifest["name"])

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
        reason = (("selected: " if selected else "compatible: ") + why_compatible(meta, gpu)) if best is not None \
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


def why_compatible(meta: Mapping[str, Any], gpu: LocalGpu) -> str:
    exact = gpu.sku is not None and meta.get("gpu") == gpu.sku
    built = meta.get("compute_capability")
    where = ("built for this GPU" if exact else
             f"built for {meta.get('gpu')}, same compute capability" if built == gpu.compute_capability else
             f"built for {meta.get('gpu')} (compute capability {built}); {meta.get('format')} runs on "
             f"{gpu.compute_capability}, options sized for {meta.get('gpu')}'s memory")
    return f"{where}, {meta.get('bits_per_weight')} bits/weight"


# --------------------------------------------------------------------------- this machine


def resolve_gpu(gpu: str | None, catalog: Mapping[str, GpuSpec], count: int | None) -> LocalGpu | None:
    """The GPU the pulled artifact will run on: detected (`auto`, or by default when NVML finds one),
    or a catalog GPU described by its datasheet values."""
    if count is not None and count < 1:  # 0 GPUs would once be read as 1 (`count or 1`)
        raise RegistryError("--count", f"must be at least 1 (how many GPUs of that kind there are), got {count}.",
                            "pass the number of GPUs, e.g. --count 8, or leave it out (as detected, or 1).")
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
