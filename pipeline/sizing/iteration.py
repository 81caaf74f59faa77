"""What one scheduler iteration of TensorRT-LLM costs on one GPU: the throughput model's physics, shared
by the offline scenario (pipeline/sizing/perfmodel.py) and the online one (pipeline/sizing/online.py).

Iteration time, per GPU (each term is a kernel class that runs after the other):
  dense linears    roof(2 * params * tokens / (tensor rate * GEMM_EFF), weight bytes / (HBM * HBM_EFF))
  routed experts   roof(expert FLOPs of the routed token slots / (rate * GEMM_EFF * MOE_GEMM_EFF),
                        bytes of the experts the batch touches / (HBM * HBM_EFF))
                   + MOE_LAYER_OVERHEAD_S per MoE layer (routing, permute, grouped-GEMM launch)
  decode attention live KV bytes read / (HBM * HBM_EFF)
  prefill attention causal QK^T + PV FLOPs / (bf16 rate * ATTENTION_EFF)
  all-reduce       2 per layer, ring over NVLink (tensor-parallel attention only)
  MoE gather       under attention DP, every rank's tokens gathered to the experts and the results
                   reduce-scattered back, over NVLink, per MoE layer
  overhead         STEP_OVERHEAD_S + SEQ_OVERHEAD_S * scheduled requests (host scheduler, sampling)
roof(c, w) = (c^p + w^p)^(1/p) joins the compute and the bandwidth limit of one GEMM. p = infinity is
the textbook roofline max(c, w); a real GEMM near the ridge point reaches neither limit, and the
sharp max over-predicts exactly the decode steps of large models, whose batch sits near the ridge
(issue 25: decode-heavy 70B/405B rows over-predicted by 20-42%). p is fitted (ROOFLINE_P).
An expert GEMM sees only the tokens routed to it, so a batch of B tokens with top-k of E experts
touches E * (1 - (1 - k/E)^B) experts in expectation (uniform routing) and each runs a GEMM of
B * k / E rows: small-batch MoE decode streams few experts, large batches stream all of them at a
grouped-GEMM efficiency of their own. Under attention DP each rank runs attention on its own
requests and the experts see every rank's tokens; the model simulates one rank.
The *_EFF, *_OVERHEAD and ROOFLINE_P constants are fitted to published trtllm-bench rows
(bench/fit_perfmodel.py writes pipeline/sizing/perfmodel_constants.json); the rest is arithmetic from
the config and the catalog.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import RecipeError
from pipeline.core.formats import FORMATS, ComputeCapability, Format, KvCacheDtype
from pipeline.core.gpus import GpuSpec
from pipeline.sizing.parallel import Parallelism, as_parallelism, kv_bytes_per_token
from pipeline.sizing.roofline import Ceilings
from pipeline.sizing.shapes import EMBEDDING_BYTES_PER_PARAM, ModelShape, ParamCounts, weight_bytes

CONSTANTS_FILE = Path(__file__).with_name("perfmodel_constants.json")
# NVLink: the catalog gives the bidirectional figure; a ring all-reduce moves each byte one way, and
# NCCL's bus bandwidth on 8xH100 reaches ~783 of 900 GB/s (NVIDIA/nccl issue #1264). Not fitted: no
# calibration row has TP > 1.
NVLINK_EFFICIENCY = 0.87 / 2
# One small all-reduce (TensorRT-LLM's custom one/two-shot kernels) costs a few microseconds of
# launch + sync; a stated estimate, not fitted, for the same reason.
ALLREDUCE_LATENCY_S = 8e-6
BOUND_NAMES = ("compute", "weights", "experts", "kv", "attention", "allreduce", "moe_gather", "overhead")


@dataclass(frozen=True)
class Efficiency:
    """The fitted constants (pipeline/sizing/perfmodel_constants.json), each a physical share or time."""

    gemm: float  # share of the dense BF16/FP8 tensor-core peak the linear layers reach
    gemm_fp4: float  # the same for FP4 GEMMs: block-scale loads and per-GEMM activation quantization
    #                  keep NVFP4 further from its doubled peak, so it gets its own share
    hbm: float  # share of HBM bandwidth reached streaming weights and KV
    attention: float  # share of the BF16 tensor peak the context (prefill) attention kernels reach
    step_overhead_s: float  # fixed time per scheduler iteration (host scheduling, launch, sync)
    seq_overhead_s: float  # extra time per scheduled request per iteration (sampling, bookkeeping)
    roofline_p: float  # sharpness of roof(): infinity = max(compute, bandwidth); 1 = their sum
    moe_gemm: float  # share of `gemm` a grouped expert GEMM reaches (small per-expert row counts)
    moe_layer_overhead_s: float  # per MoE layer per iteration: routing, token permute, grouped launch

    @classmethod
    def load(cls, path: Path = CONSTANTS_FILE) -> Efficiency:
        try:
            data = json.loads(Path(path).read_text())["constants"]
            return cls(**{name: float(data[name]) for name in cls.__dataclass_fields__})
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise RecipeError(str(path), f"cannot read the fitted throughput constants ({exc}).",
                              "regenerate it: python bench/fit_perfmodel.py") from None


@dataclass(frozen=True)
class Hardware:
    """Rates for one GPU of the TP group: datasheet, or `forge probe` measurements where present."""

    bandwidth: float  # bytes/s
    gemm_flops: float  # dense FLOP/s at the format's compute dtype
    compute_dtype: str
    attention_flops: float  # dense BF16 FLOP/s
    nvlink: float  # bytes/s, bidirectional (catalog convention): NVLink, or PCIe where there is none
    source: str
    expert_gemm_flops: float = 0.0  # dense FLOP/s of the routed experts' GEMMs (Precision.expert_compute)
    expert_compute_dtype: str = ""

    @classmethod
    def of(cls, gpu: GpuSpec, fmt: Format, ceilings: Ceilings | None = None,
           precision: Precision | None = None) -> Hardware:
        precision = precision or Precision.uniform(fmt)
        experts = gpu.peak_flops(precision.expert_compute), precision.expert_compute
        if ceilings is None:
            return cls(gpu.memory_bandwidth_bytes_per_s, gpu.peak_flops(fmt.compute_dtype), fmt.compute_dtype,
                       gpu.peak_flops("bf16"), gpu.interconnect_bytes_per_s, "datasheet", *experts)
        scale = ceilings.peak_flops / gpu.peak_flops(fmt.compute_dtype)  # measured share of the datasheet rate
        return cls(ceilings.memory_bandwidth_bytes_per_s, ceilings.peak_flops, fmt.compute_dtype, gpu.peak_flops("bf16"),
                   gpu.interconnect_bytes_per_s, ceilings.source, experts[0] * scale, experts[1])


@dataclass(frozen=True)
class Precision:
    """What each part of a model is stored in and multiplied at. A ModelOpt checkpoint quantizes every
    decoder linear to one format (`uniform`); a checkpoint shipped pre-quantized can differ per part."""

    dense: Format  # attention projections, dense MLPs, shared experts
    experts: Format  # routed experts
    expert_compute: str  # tensor-core rate the expert GEMMs run at (GpuSpec.tflops key)

    @classmethod
    def uniform(cls, fmt: Format) -> Precision:
        return cls(fmt, fmt, fmt.compute_dtype)

    @classmethod
    def mxfp4_experts(cls, gpu: GpuSpec) -> Precision:
        """gpt-oss as OpenAI ships it: MXFP4 routed experts, everything else BF16. TensorRT-LLM runs an
        HF `quant_method: mxfp4` checkpoint as W4A16_MXFP4 below SM 100 (experts upcast to BF16 GEMMs,
        the TRITON MoE backend on Hopper) and as W4A8_MXFP4_MXFP8 from SM 100 (FP8-rate GEMMs)
        (tensorrt_llm/_torch/model_config.py, the quant_method mapping and resolve_moe_backend)."""
        blackwell = ComputeCapability(10, 0) <= ComputeCapability.parse(gpu.compute_capability)
        return cls(FORMATS["bf16"], FORMATS["mxfp4"], "fp8" if blackwell else "bf16")

    @classmethod
    def as_published(cls, config: dict, gpu: GpuSpec) -> Precision | None:
        """The precision a pre-quantized HF checkpoint ships in, from its config.json
        `quantization_config`; None for an unquantized one. A quant_method forge cannot price is
        refused, never read as BF16."""
        quant = config.get("quantization_config")
        if not quant:
            return None
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        moe = any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
        if method == "mxfp4" and moe:
            return cls.mxfp4_experts(gpu)
        raise RecipeError("config.json: quantization_config", f"a checkpoint published as {method!r}"
                          f"{' (dense)' if not moe else ''} is not a precision forge prices (it prices MXFP4-expert "
                          "MoE checkpoints, as gpt-oss ships, and the formats it quantizes to itself).",
                          "plan the BF16 checkpoint instead (remove quantization_config from the config you pass).")

    @property
    def expert_format(self) -> Format | None:
        """The experts' format for the memory plan; None where it is the dense one."""
        return None if self.experts == self.dense else self.experts


@dataclass(frozen=True)
class Experts:
    """The routed experts of an MoE model as one GPU sees them (all MoE layers together)."""

    experts: int  # routed experts per MoE layer
    top_k: int
    flops_per_slot: float  # one token through one expert in every MoE layer, this GPU's share (1/expert TP)
    bytes_per_expert: float  # one expert in every MoE layer, this GPU's share
    moe_layers: int
    hidden: int
    ep: int
    dp: int  # ranks whose tokens meet at the experts (attention DP); 1 otherwise

    def touched(self, tokens: float) -> float:
        """Experts this GPU holds that a batch of `tokens` (all DP ranks) routes to, in expectation
        under uniform routing."""
        return self.experts / self.ep * (1 - (1 - self.top_k / self.experts) ** tokens)


@dataclass(frozen=True)
class StepModel:
    """Per-GPU arithmetic of one iteration; built once per (model, precision, GPU, parallelism). Under
    attention DP it is one rank's iteration over that rank's own requests."""

    linear_flops_per_token: float  # dense decoder linears (attention, dense MLPs, shared experts, router), per GPU
    head_flops_per_seq: float  # lm_head, once per request that produces a token
    weight_bytes_per_gpu: float  # the dense part's weights one GPU streams each iteration
    kv_bytes_per_token_gpu: float
    attention_flops_per_token_ctx: float  # QK^T + PV per (query token, context token), per GPU
    allreduce_bytes_per_token: float
    allreduces: int
    hw: Hardware
    eff: Efficiency
    experts: Experts | None = None
    par: Parallelism = field(default_factory=Parallelism)

    @property
    def tp(self) -> int:
        return self.par.tp

    def seconds_per(self) -> tuple[float, ...]:
        """Seconds per unit of each term: linear FLOP, weight pass, KV byte-token, attention work,
        all-reduce token, all-reduce fixed, scheduled request, iteration, expert FLOP, HBM byte,
        MoE-gather token, MoE-gather fixed."""
        share = self.eff.gemm_fp4 if self.hw.compute_dtype == "fp4" else self.eff.gemm
        gemm = 1 / (self.hw.gemm_flops * share)
        hbm = 1 / (self.hw.bandwidth * self.eff.hbm)
        link = self.hw.nvlink * NVLINK_EFFICIENCY
        t = self.par.attention_tp
        ring = 0.0 if t == 1 else 2 * (t - 1) / t * self.allreduce_bytes_per_token * self.allreduces / link
        fixed_ar = 0.0 if t == 1 else self.allreduces * ALLREDUCE_LATENCY_S
        expert_gemm = a2a = fixed_a2a = 0.0
        if self.experts:
            e = self.experts
            expert_share = self.eff.gemm_fp4 if self.hw.expert_compute_dtype == "fp4" else self.eff.gemm
            expert_gemm = 1 / (self.hw.expert_gemm_flops * expert_share * self.eff.moe_gemm)
            if self.par.attention_dp:
                # Each rank's experts (an EP share, each expert split moe_tp ways) need every rank's
                # tokens: the CUTLASS and TRTLLM fused-MoE backends all-gather the ranks' hidden states
                # before the experts and reduce-scatter the outputs after (the TRITON backend has the
                # model all-gather itself: tensorrt_llm/_torch/models/modeling_gpt_oss.py MLPBlock at 050b6cb9).
                # Per MoE layer a ring moves (dp-1) of the ranks' BF16 token rows into each rank, twice.
                a2a = 2 * e.moe_layers * (e.dp - 1) * e.hidden * 2 / link
                fixed_a2a = 2 * e.moe_layers * ALLREDUCE_LATENCY_S
        return (gemm, self.weight_bytes_per_gpu * hbm, self.kv_bytes_per_token_gpu * hbm,
                self.attention_flops_per_token_ctx / (self.hw.attention_flops * self.eff.attention), ring, fixed_ar,
                self.eff.seq_overhead_s, self.eff.step_overhead_s, expert_gemm, hbm, a2a, fixed_a2a)

    def time(self, decode: int, decode_ctx_sum: float, prefill_tokens: float, prefill_ctx_work: float,
             prefill_seqs: int) -> tuple[float, str]:
        """Seconds for one iteration and the term that dominated it."""
        _, _, kv_tok, attn, *_ = self._rates
        tokens = decode + prefill_tokens
        linears, compute, weights, experts, allreduce, gather, overhead = self._batch_terms(tokens, decode + prefill_seqs)
        kv = decode_ctx_sum * kv_tok
        attention = prefill_ctx_work * attn
        terms = (compute, weights, experts, kv, attention, allreduce, gather, overhead)
        bound = BOUND_NAMES[terms.index(max(terms))]
        return linears + kv + attention + allreduce + gather + overhead, bound

    def seconds(self, decode: int, decode_ctx_sum: float, prefill_tokens: float, prefill_ctx_work: float,
                prefill_seqs: int) -> float:
        """time() without the dominating term's name: the simulators' inner loop (same sum, same order,
        so the same float)."""
        _, _, kv_tok, attn, *_ = self._rates
        linears, _, _, _, allreduce, gather, overhead = self._batch_terms(decode + prefill_tokens, decode + prefill_seqs)
        return linears + decode_ctx_sum * kv_tok + prefill_ctx_work * attn + allreduce + gather + overhead

    def _batch_terms(self, tokens: float, seqs: int) -> tuple[float, ...]:
        """The terms that depend on the iteration's token and request counts only, memoized: a simulated
        run prices millions of iterations over a few thousand distinct (tokens, requests) pairs, and the
        roofline's powers dominated the search's time (profiled: 56% of gpu-compare's serving table)."""
        memo = self.__dict__.get("_terms_memo")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_terms_memo", memo)
        key = (tokens, seqs)
        hit = memo.get(key)
        if hit is not None:
            return hit
        gemm, weights, _, _, ring, fixed_ar, per_seq, per_step, expert_gemm, hbm, a2a, fixed_a2a = self._rates
        p = self.eff.roofline_p
        compute = (tokens * self.linear_flops_per_token + seqs * self.head_flops_per_seq) * gemm
        experts = gather = 0.0
        if self.experts:
            e = self.experts
            routed = tokens * e.dp  # every DP rank's tokens meet at the experts
            expert_compute = routed * e.top_k / e.ep * e.flops_per_slot * expert_gemm
            expert_bytes = e.touched(routed) * e.bytes_per_expert * hbm
            experts = roof(expert_compute, expert_bytes, p) + e.moe_layers * self.eff.moe_layer_overhead_s
            gather = tokens * a2a + fixed_a2a
        allreduce = fixed_ar + tokens * ring
        overhead = per_step + per_seq * seqs
        hit = (roof(compute, weights, p) + experts, compute, weights, experts, allreduce, gather, overhead)
        if len(memo) < TERMS_MEMO_SIZE:
            memo[key] = hit
        return hit

    @property
    def _rates(self) -> tuple[float, ...]:
        cached = self.__dict__.get("_rates_cache")
        if cached is None:
            cached = self.seconds_per()
            object.__setattr__(self, "_rates_cache", cached)
        return cached

# Distinct (tokens, requests) pairs kept per StepModel (a few MB at most).
TERMS_MEMO_SIZE = 65536


def roof(compute: float, bandwidth: float, p: float) -> float:
    """The time of work limited by both compute and bandwidth: between max (p = inf) and sum (p = 1)."""
    if compute <= 0 or bandwidth <= 0:
        return compute + bandwidth
    big = max(compute, bandwidth)
    return big * (1 + (min(compute, bandwidth) / big) ** p) ** (1 / p)


def step_model(shape: ModelShape, counts: ParamCounts, fmt: Format, kv: KvCacheDtype, hw: Hardware,
               tp: int | Parallelism, eff: Efficiency, context: float | None = None,
               precision: Precision | None = None) -> StepModel:
    """`context`: the mean context a decode step reads, for sliding-window layers (they read at most
    their window); None reads every layer in full. `tp`: the GPUs, or the whole split (EP, attention DP)."""
    par = as_parallelism(tp)
    precision = precision or Precision.uniform(fmt)
    head = counts.lm_head or counts.embeddings
    dense_split = par.attention_tp  # attention DP keeps attention, dense MLPs and shared experts whole per rank
    per_expert = counts.routed_experts // shape.experts if shape.experts else 0  # every MoE layer's copy of one expert
    dense_active = counts.attention + counts.active_mlp - shape.experts_per_token * per_expert + counts.router
    weights = weight_bytes(counts, precision.dense, precision.expert_format) - counts.routed_experts * precision.experts.bytes_per_weight
    embedding_gathered = counts.embeddings * EMBEDDING_BYTES_PER_PARAM * (0 if shape.tie_embeddings else 1)
    experts = None
    if shape.experts:
        experts = Experts(experts=shape.experts, top_k=shape.experts_per_token,
                          flops_per_slot=2 * per_expert / par.moe_tp,
                          bytes_per_expert=per_expert * precision.experts.bytes_per_weight / par.moe_tp,
                          moe_layers=shape.moe_layers, hidden=shape.hidden, ep=par.ep, dp=par.dp_ranks)
    return StepModel(
        linear_flops_per_token=2 * dense_active / dense_split,
        head_flops_per_seq=2 * head / dense_split,
        weight_bytes_per_gpu=(weights - embedding_gathered) / dense_split,  # the embedding table is gathered, not streamed
        kv_bytes_per_token_gpu=kv_bytes_per_token(shape, kv, par, context=context),
        attention_flops_per_token_ctx=2 * shape.layers * shape.heads * (shape.qk_head_dim + shape.v_head_dim) / dense_split,
        allreduce_bytes_per_token=shape.hidden * 2,  # BF16 activations
        allreduces=2 * shape.layers,  # after attention and after the MLP
        hw=hw, eff=eff, experts=experts, par=par,
    )
