"""The registry options `forge publish`, `forge pull` and `forge list` share (`--registry`, `--catalog`),
declared once (pipeline/core/cliargs.py) and included in each verb's arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cliargs import arg
from pipeline.core.gpus import DEFAULT_CATALOG

DEFAULT_REGISTRY = "registry"  # a directory relative to the working directory (the repo root under DVC)
REGISTRY_ENV = "FORGE_REGISTRY"


@dataclass(frozen=True)
class RegistryArgs:
    """The registry options publish, pull and list share, declared once (pipeline/core/cliargs.py)."""

    registry: str | None = arg(help=f"directory, fsspec URL, oci://HOST/NAMESPACE, plain+DIR or http(s):// "
                                    f"(default: ${REGISTRY_ENV}, else ./{DEFAULT_REGISTRY})")
    catalog: Path = arg(DEFAULT_CATALOG, help="GPU catalog (default: %(default)s)")

    @property
    def url(self) -> str:
        return self.registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY
