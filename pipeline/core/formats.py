"""The format registry: the one list of weight formats and KV-cache dtypes forge knows.

Schema literals, CLI choices, the planner, the calibrate stage and the docs all derive from
`FORMATS` and `KV_CACHE_DTYPES`; nothing else spells out a format list.

Sources for each row: ModelOpt llm_ptq README and `modelopt.torch.quantization.config` (0.47),
TensorRT-LLM docs features/quantization, NVIDIA's NVFP4 blog, OCP Microscaling Formats spec v1.0.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ComputeCapability:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> ComputeCapability:
        major, _, minor = str(text).partition(".")
        return cls(int(major), int(minor or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    def __le__(self, other: ComputeCapability) -> bool:
        return (self.major, self.minor) <= (other.major, other.minor)

    def __lt__(self, other: ComputeCapability) -> bool:
        return (self.major, self.minor) < (other.major, other.minor)


@dataclass(frozen=True)
class Format:
    """One weight (and activation) format."""

    name: str
    description: str
    element_type: str  # value encoding of each element
    block_size: int | None  # elements sharing one scale; None = per-tensor or no scale
    scale_type: str | None  # encoding of the block / tensor scale
    bits_per_weight: float  # effective, scales included (per-tensor scales rounded away)
    min_compute_capability: ComputeCapability
    compute_dtype: str  # which tensor-core rate a GEMM in this format runs at (GpuSpec.tflops key)
    modelopt_config: str | None  # name of the ModelOpt preset in modelopt.torch.quantization
    quant_algo: str | None  # what ModelOpt writes as quant_algo in hf_quant_config.json
    quantized: bool

    @property
    def bytes_per_weight(self) -> float:
        return self.bits_per_weight / 8


# FP8 needs Ada/Hopper FP8 tensor cores (SM 8.9+). NVFP4 and MXFP4 need Blackwell FP4 tensor
# cores (SM 10.0/10.3/12.0); TensorRT-LLM has no FP4 GEMM for SM 9.0.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            name="bf16",
            description="unquantized baseline",
            element_type="bf16",
            block_size=None,
            scale_type=None,
            bits_per_weight=16.0,
            min_compute_capability=ComputeCapability(8, 0),
            compute_dtype="bf16",
            modelopt_config=None,
            quant_algo=None,
            quantized=False,
        ),
        Format(
            name="fp8",
            description="FP8 E4M3 weights and activations, per-tensor FP32 scales (W8A8)",
            element_type="e4m3",
            block_size=None,
            scale_type="fp32 per tensor",
            bits_per_weight=8.0,
            min_compute_capability=ComputeCapability(8, 9),
            compute_dtype="fp8",
            modelopt_config="FP8_DEFAULT_CFG",
            quant_algo="FP8",
            quantized=True,
        ),
        Format(
            name="nvfp4",
            description="NVFP4: E2M1 values, FP8 E4M3 scale per 16, FP32 global scale (W4A4)",
            element_type="e2m1",
            block_size=16,
            scale_type="e4m3 per 16 + fp32 per tensor",
            bits_per_weight=4.0 + 8 / 16,
            min_compute_capability=ComputeCapability(10, 0),
            compute_dtype="fp4",
            modelopt_config="NVFP4_DEFAULT_CFG",
            quant_algo="NVFP4",
            quantized=True,
        ),
        Format(
            name="mxfp4",
            description="OCP MXFP4: E2M1 values, E8M0 power-of-two scale per 32 (W4A4)",
            element_type="e2m1",
            block_size=32,
            scale_type="e8m0 per 32",
            bits_per_weight=4.0 + 8 / 32,
            min_compute_capability=ComputeCapability(10, 0),
            compute_dtype="fp4",
            modelopt_config="MXFP4_DEFAULT_CFG",
            # ModelOpt 0.47 writes this one in lower case (seen here in its exported hf_quant_config.json).
            quant_algo="mxfp4",
            quantized=True,
        ),
        # MXFP4 weights with FP8 (E4M3, per-tensor) activations: what TensorRT-LLM runs as a dense
        # MXFP4 Linear (QuantAlgo.W4A8_MXFP4_FP8 -> W4A8MXFP4FP8LinearMethod, an FP8 x FP4 GEMM,
        # tensorrt_llm/_torch/modules/linear.py). ModelOpt 0.47 exports it on CPU as
        # quant_algo "W4A8_MXFP4_FP8" (tests/unit/test_engines.py). The GEMM reads FP8 activations,
        # so it runs at the FP8 tensor-core rate.
        Format(
            name="w4a8_mxfp4_fp8",
            description="MXFP4 weights (E2M1, E8M0 scale per 32) x FP8 E4M3 activations (W4A8)",
            element_type="e2m1",
            block_size=32,
            scale_type="e8m0 per 32",
            bits_per_weight=4.0 + 8 / 32,
            min_compute_capability=ComputeCapability(10, 0),
            compute_dtype="fp8",
            modelopt_config="W4A8_MXFP4_FP8_CFG",
            quant_algo="W4A8_MXFP4_FP8",
            quantized=True,
        ),
    )
}

QUANTIZED_FORMATS: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.quantized)


@dataclass(frozen=True)
class KvCacheDtype:
    name: str  # as TensorRT-LLM's KvCacheConfig.dtype spells it
    bytes_per_element: float
    min_compute_capability: ComputeCapability
    modelopt_config: str | None  # ModelOpt KV-cache preset merged into the quant config
    kv_cache_quant_algo: str | None  # what the export writes as kv_cache_quant_algo


# "auto" keeps the model dtype (BF16). FP8 KV: ModelOpt ptq docs list Hopper+; NVFP4 KV needs
# SM 10.x (TensorRT-LLM PR #6244, issue #10241). NVFP4 KV carries an E4M3 scale per 16 values.
KV_CACHE_DTYPES: dict[str, KvCacheDtype] = {
    k.name: k
    for k in (
        KvCacheDtype("auto", 2.0, ComputeCapability(8, 0), None, None),
        KvCacheDtype("fp8", 1.0, ComputeCapability(8, 9), "FP8_KV_CFG", "FP8"),
        KvCacheDtype("nvfp4", 0.5 + 1 / 16, ComputeCapability(10, 0), "NVFP4_KV_CFG", "NVFP4"),
    )
}


# Other names users give the unquantized (16-bit) KV cache. "auto" keeps the checkpoint's dtype
# (TensorRT-LLM KvCacheConfig.dtype), which is BF16 for every checkpoint forge writes; FP16 takes
# the same 2 bytes per element, so both plan identically.
KV_CACHE_ALIASES: dict[str, str] = {"bf16": "auto", "fp16": "auto"}
KV_CACHE_NAMES: tuple[str, ...] = (*KV_CACHE_DTYPES, *KV_CACHE_ALIASES)


def canonical_kv_dtype(name: str) -> str:
    return KV_CACHE_ALIASES.get(name, name)


def get_format(name: str) -> Format:
    return FORMATS[name]


def get_kv_dtype(name: str) -> KvCacheDtype:
    return KV_CACHE_DTYPES[name]


# Tensor-core rates a GEMM can run at (GpuSpec.tflops keys), narrowest first: a GPU without a unit
# runs the GEMM on the next wider one. Every Format.compute_dtype is one of these.
COMPUTE_DTYPES: tuple[str, ...] = ("fp4", "fp8", "bf16")
assert {f.compute_dtype for f in FORMATS.values()} <= set(COMPUTE_DTYPES)

# quant_algo ModelOpt writes when a checkpoint holds more than one weight format, with a per-layer
# `quantized_layers` map ({module: {"quant_algo": "NVFP4", "group_size": 16} | {"quant_algo": "FP8"}});
# layers absent from it are unquantized (process_layer_quant_config, modelopt/torch/export/
# quant_utils.py, 0.47). TensorRT-LLM reads it as QuantAlgo.MIXED_PRECISION
# (ModelConfig._build_modelopt_quant_config, tensorrt_llm/_torch/model_config.py).
MIXED_PRECISION_QUANT_ALGO = "MIXED_PRECISION"

# quant_algo ModelOpt writes for an AWQ-calibrated format whose input smoothing scale it could not
# fold into a preceding layer (o_proj, down_proj keep `pre_quant_scale`): "nvfp4_awq" ->
# "NVFP4_AWQ" (quant_utils.py process_layer_quant_config, 0.47; seen on a tiny Llama). Not a
# member of TensorRT-LLM's QuantAlgo (tensorrt_llm/quantization/mode.py).
AWQ_QUANT_ALGOS: dict[str, str] = {"nvfp4": "NVFP4_AWQ"}


def format_of_quant_algo(quant_algo: str) -> str | None:
    """The registry format whose tensors a (per-layer) quant_algo describes; None if unknown."""
    algo = str(quant_algo).upper()
    for f in FORMATS.values():
        if f.quant_algo is not None and f.quant_algo.upper() == algo:
            return f.name
    return next((f for f, a in AWQ_QUANT_ALGOS.items() if a == algo), None)
