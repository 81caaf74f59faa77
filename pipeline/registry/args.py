"""The registry options the registry verbs share, declared once (pipeline/core/cliargs.py) and
included in each verb's arguments: `RegistryLocation` (`--registry`, `--timeout-s`) in every verb that
reaches a registry, `RegistryArgs` (those and `--catalog`) in publish, pull and list, which also judge GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cliargs import arg, included
from pipeline.core.gpus import DEFAULT_CATALOG
from pipeline.registry.waiting import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, resolve_timeout

DEFAULT_REGISTRY = "registry"  # a directory relative to the working directory (the repo root under DVC)
REGISTRY_ENV = "FORGE_REGISTRY"


@dataclass(frozen=True)
class RegistryLocation:
    """Which registry, and how long to wait on it (promote includes only these)."""

    registry: str | None = arg(help=f"directory, fsspec URL, oci://HOST/NAMESPACE, plain+DIR or http(s):// "
                                    f"(default: ${REGISTRY_ENV}, else ./{DEFAULT_REGISTRY})")
    timeout_s: float | None = arg(help="oci:// and http(s):// registries: the longest wait (to connect, for an answer, "
                                       "for the next bytes) before giving up; forge says what it waits for meanwhile "
                                       f"(default: ${TIMEOUT_ENV}, else {DEFAULT_TIMEOUT_S:g})")

    @property
    def url(self) -> str:
        return self.registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY

    @property
    def deadline_s(self) -> float:
        return resolve_timeout(self.timeout_s)


@dataclass(frozen=True)
class RegistryArgs:
    """The registry options publish, pull and list share, declared once (pipeline/core/cliargs.py)."""

    at: RegistryLocation = included(RegistryLocation)
    catalog: Path = arg(DEFAULT_CATALOG, help="GPU catalog (default: %(default)s)")

    @property
    def url(self) -> str:
        return self.at.url

    @property
    def deadline_s(self) -> float:
        return self.at.deadline_s
