"""Find out which NVIDIA GPU this machine has, through NVML.

Used by `forge pull MODEL --gpu auto` to pick the artifact built for the local card, and by pull
to refuse an artifact built for another compute capability. NVML (the library behind
`nvidia-smi`, Python binding `pynvml` from the `nvidia-ml-py` distribution) answers without a CUDA
toolkit or torch, so detection works in a bare serving container. It is imported lazily: the
module must import on CPU machines, where detection simply answers None.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pipeline.core.errors import RecipeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalGpu:
    """The local GPU as NVML reports it (device 0, plus how many identical devices there are).

    `compute_capability` is "major.minor" ("9.0" for H100/H200, "10.0" for B200), the same
    string the artifact metadata records. `sku` is the GPU-catalog key (e.g. "h200") when the
    caller gave a catalog to match against, else None.
    """

    name: str
    compute_capability: str
    memory_bytes: int
    count: int = 1
    sku: str | None = None


def match_sku(name: str, known: Mapping[str, str | Sequence[str]]) -> str | None:
    """Map an NVML device name to a catalog key; `known` maps key -> substring(s) of the NVML name.

    A key may list several substrings (pipeline/core/data/gpus.yaml `nvml_names`, e.g. h100: ["H100 80GB
    HBM3", "H100 SXM"]); matching is case-insensitive. When several substrings match, the longest wins, so a catalog
    can hold both "H100" and "H100 NVL" and "NVIDIA H100 NVL" maps to the second. Two different
    keys matching with equally long substrings is a catalog bug and raises RecipeError.
    """
    lowered = name.lower()
    hits = [
        (len(sub), key, sub)
        for key, subs in known.items()
        for sub in ([subs] if isinstance(subs, str) else subs)
        if sub and sub.lower() in lowered
    ]
    if not hits:
        return None
    hits.sort(reverse=True)
    best_len, best_key, best_sub = hits[0]
    rivals = [key for length, key, _ in hits[1:] if length == best_len and key != best_key]
    if rivals:
        raise RecipeError(
            "GPU catalog",
            f"GPU name {name!r} matches {best_sub!r} of {best_key!r} and an equally long "
            f"substring of {', '.join(repr(k) for k in sorted(rivals))}.",
            "make each GPU's NVML name substring unique (e.g. 'H100 PCIe' vs 'H100 80GB HBM3').",
        )
    return best_key


def _text(value: Any) -> str:
    # nvidia-ml-py before 11.515 returned bytes from nvmlDeviceGetName; newer ones return str.
    return value.decode() if isinstance(value, bytes) else str(value)


def detect_local_gpu(
    known_skus: Mapping[str, str | Sequence[str]] | None = None, nvml: ModuleType | Any | None = None
) -> LocalGpu | None:
    """Describe GPU 0 via NVML, or None when there is no NVML library, driver or device.

    `known_skus` (catalog key -> NVML name substring(s)) fills `LocalGpu.sku`. `nvml` replaces the
    `pynvml` module (tests pass a stand-in); by default `pynvml` is imported here, lazily.
    `count` is the number of devices with the same name as device 0: a tensor-parallel
    artifact needs that many identical cards.
    """
    if nvml is None:
        try:
            import pynvml as nvml  # lazy: absent, or driverless, on CPU hosts
        except ImportError:
            log.info("pynvml (nvidia-ml-py) is not installed; assuming no local GPU")
            return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        # NVMLError_LibraryNotFound / DriverNotLoaded on machines without an NVIDIA driver.
        log.info("NVML unavailable (%s); assuming no local GPU", exc)
        return None
    try:
        total = nvml.nvmlDeviceGetCount()
        if total == 0:
            return None
        first = nvml.nvmlDeviceGetHandleByIndex(0)
        name = _text(nvml.nvmlDeviceGetName(first))
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(first)
        memory = int(nvml.nvmlDeviceGetMemoryInfo(first).total)
        names = [_text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(total)]
    except nvml.NVMLError as exc:
        log.warning("NVML initialised but could not describe device 0: %s", exc)
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    same = sum(1 for other in names if other == name)
    if same != total:
        log.warning("mixed GPUs %s: describing only the %d x %s", names, same, name)
    sku = match_sku(name, known_skus) if known_skus is not None else None
    return LocalGpu(
        name=name,
        compute_capability=f"{int(major)}.{int(minor)}",
        memory_bytes=memory,
        count=same,
        sku=sku,
    )
