"""The GPU catalog loader. The data lives in pipeline/core/data/gpus.yaml, the only list of GPUs.

It ships inside the package (package data, pyproject.toml) rather than beside the recipes, so
`forge pull` / `forge list` work from any folder and from a wheel installed without the checkout.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.core.formats import COMPUTE_DTYPES, ComputeCapability
from pipeline.core.yamlio import load_model_file

DEFAULT_CATALOG = Path(__file__).resolve().parent / "data" / "gpus.yaml"


class GpuSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    nvml_names: list[str] = Field(min_length=1, description="substrings of the NVML device name")
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    memory_bytes: int = Field(gt=0)
    memory_bandwidth_bytes_per_s: float = Field(gt=0)
    tflops: dict[str, float] = Field(description="dense tensor-core TFLOP/s by compute dtype")
    tdp_watts: float = Field(gt=0)
    nvlink_bytes_per_s: float = Field(ge=0)
    pcie_bytes_per_s: float = Field(default=0, ge=0, description="host link, bidirectional: TP's path without NVLink")
    usd_per_gpu_hour: float | None = Field(default=None, gt=0, description="default rental price for `forge recommend` "
                                           "(an input: --price overrides it); None = not priced")

    @property
    def interconnect_bytes_per_s(self) -> float:
        """What a TP all-reduce runs over: NVLink where the GPU has it, else PCIe."""
        return self.nvlink_bytes_per_s or self.pcie_bytes_per_s

    @field_validator("tflops")
    @classmethod
    def _known_dtypes(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(COMPUTE_DTYPES))
        if unknown:
            raise ValueError(f"unknown compute dtype(s) {unknown}; use {', '.join(reversed(COMPUTE_DTYPES))}")
        if "bf16" not in value:
            raise ValueError("bf16 rate is required")
        return value

    @property
    def cc(self) -> ComputeCapability:
        return ComputeCapability.parse(self.compute_capability)

    def peak_flops(self, compute_dtype: str) -> float:
        """Dense FLOP/s for a GEMM in `compute_dtype`; a GPU without that unit falls back to the
        widest rate it has below it (an FP4 GEMM on Hopper would run as FP8 or BF16)."""
        for dtype in COMPUTE_DTYPES[COMPUTE_DTYPES.index(compute_dtype):]:
            if dtype in self.tflops:
                return self.tflops[dtype] * 1e12
        raise KeyError(compute_dtype)


class GpuCatalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: dict[str, GpuSpec]


def load_catalog(path: Path = DEFAULT_CATALOG) -> dict[str, GpuSpec]:
    return load_model_file(path, GpuCatalog).gpus
