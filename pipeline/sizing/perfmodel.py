"""A physical model of trtllm-bench's offline max-throughput scenario; every output is *predicted*.

The scenario (TensorRT-LLM docs, performance/perf-overview.md, "Reproducing Benchmarked Results"):
N requests of fixed ISL/OSL are all queued at t=0; the PyTorch backend runs in-flight batching with
chunked prefill, a paged KV cache and CUDA graphs. Each scheduler iteration serves every decoding
request one token and fills the rest of `max_num_tokens` with prefill chunks of admitted requests.

Admission: at most `max_batch_size` requests are in flight, and the KV pool must hold every admitted
request at its full ISL + OSL (the default GUARANTEED_NO_EVICT capacity policy reserves a request's
blocks up front: tensorrt_llm/llmapi/llm_args.py SchedulerConfig.capacity_scheduler_policy, and
trtllm-bench passes the same policy explicitly).

Iteration time, per GPU of the TP group (each term is a kernel class that runs after the other):
  linear layers   max(2 * params * tokens / (tensor rate * GEMM_EFF), weight bytes / (HBM * HBM_EFF))
  decode attention  live KV bytes read / (HBM * HBM_EFF)
  prefill attention causal QK^T + PV FLOPs / (bf16 rate * ATTENTION_EFF)
  all-reduce       2 per layer, ring over NVLink (TP > 1 only)
  overhead         STEP_OVERHEAD_S + SEQ_OVERHEAD_S * scheduled requests (host scheduler, sampling)
The *_EFF and *_OVERHEAD constants are fitted to published trtllm-bench rows (bench/fit_perfmodel.py
writes pipeline/sizing/perfmodel_constants.json); the rest is arithmetic from the config and the catalog.

The simulation is O(1) per iteration and jumps over runs of pure-decode iterations (their time is
affine in the live context), so a 3000-request run costs milliseconds, not per-token Python loops.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.core.formats import Format, KvCacheDtype
from pipeline.core.gpus import GpuSpec
from pipeline.sizing.memory import KV_BLOCK_TOKENS, ServingShape, memory_at_tp
from pipeline.sizing.parallel import Parallelism, kv_bytes_per_token
from pipeline.sizing.roofline import Ceilings
from pipeline.sizing.shapes import (
    EMBEDDING_BYTES_PER_PARAM,
    ModelShape,
    ParamCounts,
    count_params,
    weight_bytes,
)

CONSTANTS_FILE = Path(__file__).with_name("perfmodel_constants.json")
# NVLink: the catalog gives the bidirectional figure; a ring all-reduce moves each byte one way, and
# NCCL's bus bandwidth on 8xH100 reaches ~783 of 900 GB/s (NVIDIA/nccl issue #1264). Not fitted: no
# calibration row has TP > 1.
NVLINK_EFFICIENCY = 0.87 / 2
# One small all-reduce (TensorRT-LLM's custom one/two-shot kernels) costs a few microseconds of
# launch + sync; a stated estimate, not fitted, for the same reason.
ALLREDUCE_LATENCY_S = 8e-6
# trtllm-bench's dataset sizes by ISL/OSL (perf-overview.md, "$num_requests" table).
PUBLISHED_NUM_REQUESTS = {(128, 128): 30000, (128, 2048): 3000, (128, 4096): 1500, (1000, 2000): 1500,
                          (2048, 128): 3000, (2048, 2048): 1500, (5000, 500): 1500, (1000, 1000): 3000,
                          (500, 2000): 3000, (20000, 2000): 1000}
# Runtime limits forge's search tries (build picks the best that fits memory).
BOUND_NAMES = ("compute", "weights", "kv", "attention", "allreduce", "overhead")
BATCH_CHOICES = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
TOKEN_CHOICES = (2048, 4096, 8192, 16384, 32768)


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

    @classmethod
    def of(cls, gpu: GpuSpec, fmt: Format, ceilings: Ceilings | None = None) -> Hardware:
        if ceilings is None:
            return cls(gpu.memory_bandwidth_bytes_per_s, gpu.peak_flops(fmt.compute_dtype), fmt.compute_dtype,
                       gpu.peak_flops("bf16"), gpu.interconnect_bytes_per_s, "datasheet")
        return cls(ceilings.memory_bandwidth_bytes_per_s, ceilings.peak_flops, fmt.compute_dtype, gpu.peak_flops("bf16"),
                   gpu.interconnect_bytes_per_s, ceilings.source)


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    num_requests: int

    @classmethod
    def published(cls, input_len: int, output_len: int) -> Workload:
        """trtllm-bench's dataset size for these lengths; other lengths get the table's rule of thumb
        (more requests for short sequences so the run reaches a steady state)."""
        n = PUBLISHED_NUM_REQUESTS.get((input_len, output_len))
        if n is None:
            seq = input_len + output_len
            n = 30000 if seq <= 256 else 3000 if seq <= 2500 else 1500 if seq <= 5500 else 1000
        return cls(input_len, output_len, n)


@dataclass(frozen=True)
class StepModel:
    """Per-GPU arithmetic of one iteration; built once per (model, format, GPU, TP)."""

    linear_flops_per_token: float  # decoder linear layers, per GPU
    head_flops_per_seq: float  # lm_head, once per request that produces a token
    weight_bytes_per_gpu: float
    kv_bytes_per_token_gpu: float
    attention_flops_per_token_ctx: float  # QK^T + PV per (query token, context token), per GPU
    allreduce_bytes_per_token: float
    allreduces: int
    tp: int
    hw: Hardware
    eff: Efficiency

    def seconds_per(self) -> tuple[float, ...]:
        """Seconds per unit of each term: linear FLOP, weight pass, KV byte-token, attention work,
        all-reduce token, all-reduce fixed, scheduled request, iteration."""
        share = self.eff.gemm_fp4 if self.hw.compute_dtype == "fp4" else self.eff.gemm
        gemm = 1 / (self.hw.gemm_flops * share)
        hbm = 1 / (self.hw.bandwidth * self.eff.hbm)
        ring = 0.0 if self.tp == 1 else (2 * (self.tp - 1) / self.tp * self.allreduce_bytes_per_token * self.allreduces
                                         / (self.hw.nvlink * NVLINK_EFFICIENCY))
        fixed_ar = 0.0 if self.tp == 1 else self.allreduces * ALLREDUCE_LATENCY_S
        return (gemm, self.weight_bytes_per_gpu * hbm, self.kv_bytes_per_token_gpu * hbm,
                self.attention_flops_per_token_ctx / (self.hw.attention_flops * self.eff.attention), ring, fixed_ar,
                self.eff.seq_overhead_s, self.eff.step_overhead_s)

    def time(self, decode: int, decode_ctx_sum: float, prefill_tokens: float, prefill_ctx_work: float,
             prefill_seqs: int) -> tuple[float, str]:
        """Seconds for one iteration and the term that dominated it."""
        gemm, weights, kv_tok, attn, ring, fixed_ar, per_seq, per_step = self._rates
        tokens = decode + prefill_tokens
        seqs = decode + prefill_seqs
        compute = (tokens * self.linear_flops_per_token + seqs * self.head_flops_per_seq) * gemm
        kv = decode_ctx_sum * kv_tok
        attention = prefill_ctx_work * attn
        allreduce = fixed_ar + tokens * ring
        overhead = per_step + per_seq * seqs
        terms = (compute, weights, kv, attention, allreduce, overhead)
        bound = BOUND_NAMES[terms.index(max(terms))]
        return max(compute, weights) + kv + attention + allreduce + overhead, bound

    @property
    def _rates(self) -> tuple[float, ...]:
        cached = self.__dict__.get("_rates_cache")
        if cached is None:
            cached = self.seconds_per()
            object.__setattr__(self, "_rates_cache", cached)
        return cached


def step_model(shape: ModelShape, counts: ParamCounts, fmt: Format, kv: KvCacheDtype, hw: Hardware, tp: int,
               eff: Efficiency, context: float | None = None) -> StepModel:
    """`context`: the mean context a decode step reads, for sliding-window layers (they read at most
    their window); None reads every layer in full."""
    head = counts.lm_head or counts.embeddings
    active_linear = counts.attention + counts.active_mlp + counts.router
    return StepModel(
        linear_flops_per_token=2 * active_linear / tp,
        head_flops_per_seq=2 * head / tp,
        weight_bytes_per_gpu=(weight_bytes(counts, fmt) - counts.embeddings * EMBEDDING_BYTES_PER_PARAM
                              * (0 if shape.tie_embeddings else 1)) / tp,  # the embedding table is gathered, not streamed
        kv_bytes_per_token_gpu=kv_bytes_per_token(shape, kv, Parallelism(tp), context=context),
        attention_flops_per_token_ctx=2 * shape.layers * shape.heads * (shape.qk_head_dim + shape.v_head_dim) / tp,
        allreduce_bytes_per_token=shape.hidden * 2,  # BF16 activations
        allreduces=2 * shape.layers,  # after attention and after the MLP
        tp=tp, hw=hw, eff=eff,
    )


@dataclass(frozen=True)
class Prediction:
    """One simulated trtllm-bench run. All figures predicted."""

    predicted_output_tok_s: float  # total over the TP group (trtllm-bench "Total Output Throughput")
    predicted_output_tok_s_per_gpu: float
    predicted_output_tok_s_per_user: float  # mean over requests of OSL / request latency
    predicted_ttft_ms: float  # mean; includes queueing, as trtllm-bench measures from submission
    predicted_tpot_ms: float  # mean over requests
    max_batch_size: int
    max_num_tokens: int
    concurrency: int  # requests in flight at most: min(max_batch_size, KV capacity / (ISL + OSL), N)
    kv_capacity_tokens: int
    bound_prefill: str  # dominant term of iterations that carry prefill
    bound_decode: str  # dominant term of pure-decode iterations
    iterations: int
    hardware_source: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def simulate(step: StepModel, work: Workload, max_batch_size: int, max_num_tokens: int,
             kv_capacity_tokens: int) -> Prediction:
    """One trtllm-bench run, iteration by iteration, in O(1) per iteration.

    State: requests still queued; admitted requests still in prefill (all requests are alike and
    chunks go out in admission order, so only the oldest can be part-way: its progress is
    `head_done`); decoding requests as a count, the sum of their live context, and cohorts by the
    iteration they finish."""
    isl, osl, n = work.input_len, work.output_len, work.num_requests
    blocks_per_request = math.ceil((isl + osl) / KV_BLOCK_TOKENS)
    kv_requests = (kv_capacity_tokens // KV_BLOCK_TOKENS) // blocks_per_request
    limit = min(max_batch_size, kv_requests, n)
    if limit < 1:
        raise RecipeError("throughput model", f"the KV cache ({kv_capacity_tokens:,} tokens) holds no request of "
                          f"{isl}+{osl} tokens.", "use more GPUs (TP), a smaller format or shorter sequences.")
    now, it, queued = 0.0, 0, n
    inflight, head_done = 0, 0  # admitted requests in prefill; tokens done of the oldest
    decode, ctx_sum = 0, 0.0
    finishing: deque[tuple[int, int, float]] = deque()  # (last iteration, count, first-token time)
    ttft_sum = latency_user_sum = tpot_sum = 0.0
    bound_time: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
    while queued or inflight or decode:
        budget = max_num_tokens - decode
        pending = inflight * isl - head_done
        if queued and budget > pending:  # admit what this iteration can start
            admit = min(queued, limit - decode - inflight, -(-(budget - pending) // isl))
            if admit > 0:
                inflight += admit
                queued -= admit
        tokens = ctx_work = 0.0
        seqs = completed = 0
        if inflight and budget > 0:
            chunk = min(isl - head_done, budget)
            tokens, ctx_work, seqs, left = chunk, chunk * (head_done + (chunk + 1) / 2), 1, budget - chunk
            head_done += chunk
            if head_done == isl:
                completed, head_done = 1, 0
                full = min(inflight - 1, left // isl)
                completed += full
                tokens += full * isl
                ctx_work += full * isl * (isl + 1) / 2
                seqs += full
                left -= full * isl
                if left > 0 and inflight - completed > 0:  # the next one starts part-way
                    head_done = left
                    tokens += left
                    ctx_work += left * (left + 1) / 2
                    seqs += 1
            inflight -= completed
        if seqs == 0:  # pure decode until the next cohort finishes: time is affine in the context
            steps = finishing[0][0] - it + 1
            dt, bound = step.time(decode, ctx_sum + decode * (steps - 1) / 2, 0, 0, 0)
            now += steps * dt
            it += steps
            ctx_sum += decode * steps
            bound_time["decode"][bound] = bound_time["decode"].get(bound, 0) + steps * dt
        else:
            dt, bound = step.time(decode, ctx_sum, tokens, ctx_work, seqs)
            now += dt
            it += 1
            ctx_sum += decode
            bound_time["prefill"][bound] = bound_time["prefill"].get(bound, 0) + dt
        while finishing and finishing[0][0] < it:
            _, count, first = finishing.popleft()
            decode -= count
            ctx_sum -= count * (isl + osl)
            latency_user_sum += count * osl / now
            tpot_sum += count * (now - first) / (osl - 1)
        if completed:  # first token at the end of the iteration that finished the prompt
            ttft_sum += completed * now
            if osl > 1:
                decode += completed
                ctx_sum += completed * (isl + 1)
                finishing.append((it - 1 + (osl - 1), completed, now))
            else:
                latency_user_sum += completed * osl / now
    total = n * osl / now
    return Prediction(
        predicted_output_tok_s=total, predicted_output_tok_s_per_gpu=total / step.tp,
        predicted_output_tok_s_per_user=latency_user_sum / n, predicted_ttft_ms=1e3 * ttft_sum / n,
        predicted_tpot_ms=1e3 * tpot_sum / n if osl > 1 else 0.0, max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens, concurrency=limit, kv_capacity_tokens=kv_capacity_tokens,
        bound_prefill=_dominant(bound_time["prefill"]), bound_decode=_dominant(bound_time["decode"]),
        iterations=it, hardware_source=step.hw.source,
    )


def _dominant(times: dict[str, float]) -> str:
    return max(times, key=times.get) if times else "-"


def kv_capacity(shape: ModelShape, counts: ParamCounts, fmt: Format, kv: KvCacheDtype, gpu: GpuSpec, tp: int,
                max_num_tokens: int, fraction: float, seq_len: int = 2) -> int:
    """Tokens the KV pool holds, by the planner's memory model (pipeline/sizing/memory.py), which follows
    TensorRT-LLM's KvCacheCreator._cal_max_memory (tensorrt_llm/_torch/pyexecutor/_util.py):
    (total GPU memory - peak memory of the profiling run) x free_gpu_memory_fraction."""
    serving = ServingShape(max_input_len=1, max_output_len=1, seq_len=seq_len, max_num_tokens=max_num_tokens,
                           kv_cache_free_gpu_memory_fraction=fraction)
    return memory_at_tp(shape, counts, fmt, kv, gpu, serving, Parallelism(tp)).capacity


def trtllm_bench_limits(kv_tokens: int, work: Workload) -> tuple[int, int]:
    """max_batch_size / max_num_tokens as trtllm-bench picks them (tensorrt_llm/bench/build/tuning.py
    `finetune_setting`: requests the KV cache holds, capped at 4096 and rounded up; tokens =
    batch x (1 + ISL/OSL), capped at 32768, at least 2048, rounded up). Used for the published rows."""
    raw_bs = min(kv_tokens / (work.input_len + work.output_len), 4096)
    raw_tok = min(raw_bs * (1 + work.input_len / work.output_len), 32768)
    step = 32 if raw_bs < 256 else 128 if raw_bs < 1024 else 256
    bs = max(64, step * math.ceil(raw_bs / step)) if raw_bs < 256 else step * math.ceil(raw_bs / step)
    tstep = 256 if raw_tok < 4096 else 512 if raw_tok < 8192 else 1024
    tok = max(2048, tstep * math.ceil(raw_tok / tstep))
    return int(bs), int(tok)


def predict(config: dict[str, Any], fmt: Format, kv: KvCacheDtype, gpu: GpuSpec, tp: int, work: Workload,
            ceilings: Ceilings | None = None, fraction: float = 0.9, eff: Efficiency | None = None,
            limits: tuple[int, int] | None = None, batch_cap: int | None = None,
            token_cap: int | None = None) -> Prediction:
    """The predicted run at `limits` (max_batch_size, max_num_tokens); without them, forge's own
    choice: the pair of BATCH_CHOICES x TOKEN_CHOICES (within the caps) with the highest predicted
    throughput, each at the KV capacity its max_num_tokens leaves (activations scale with it)."""
    shape = ModelShape.from_hf_config(config)
    counts = count_params(shape)
    step = step_model(shape, counts, fmt, kv, Hardware.of(gpu, fmt, ceilings), tp, eff or Efficiency.load(),
                      context=work.input_len + work.output_len / 2)
    seq_len = work.input_len + work.output_len
    if limits is not None:
        return simulate(step, work, limits[0], limits[1],
                        kv_capacity(shape, counts, fmt, kv, gpu, tp, limits[1], fraction, seq_len))
    tokens = sorted({t for t in TOKEN_CHOICES if token_cap is None or t <= token_cap} | ({token_cap} if token_cap else set()))
    batches = tuple(b for b in BATCH_CHOICES if batch_cap is None or b < batch_cap) + ((batch_cap,) if batch_cap else ())
    seq_blocks = math.ceil((work.input_len + work.output_len) / KV_BLOCK_TOKENS)
    best: Prediction | None = None
    for t in tokens:
        capacity = kv_capacity(shape, counts, fmt, kv, gpu, tp, t, fraction, seq_len)
        kv_requests = (capacity // KV_BLOCK_TOKENS) // seq_blocks
        if kv_requests < 1:
            continue
        # A max_batch_size past what the KV pool admits runs like the KV limit: try the largest
        # few choices below that limit, and the limit itself.
        fitting = sorted({b for b in batches if b < kv_requests} | {min(kv_requests, max(batches))})
        for batch in fitting[-4:]:
            p = simulate(step, work, batch, t, capacity)
            # Ties (within 0.5%) go to the smaller limits: less activation memory, shorter TPOT.
            if best is None or p.predicted_output_tok_s > best.predicted_output_tok_s * 1.005:
                best = p
    if best is None:
        raise RecipeError("throughput model", f"the KV cache holds no request of {work.input_len}+{work.output_len} "
                          "tokens at any max_num_tokens.", "use more GPUs (TP), a smaller format or shorter sequences.")
    return best


def size_runtime(config: dict[str, Any], fmt: Format, kv: KvCacheDtype, gpu: GpuSpec, serving: ServingShape, tp: int,
                 ceilings: Ceilings | None = None) -> Prediction | None:
    """forge's runtime limits for a target's workload (trtllm-bench's scenario at the target's ISL/OSL),
    with the target's concurrency and max_num_tokens as caps; None when no request fits at all."""
    work = Workload.published(serving.max_input_len, serving.max_output_len)
    try:
        return predict_cached(config, fmt, kv, gpu, tp, work, ceilings, serving.kv_cache_free_gpu_memory_fraction,
                              serving.concurrency, serving.max_num_tokens)
    except RecipeError:
        return None


_CACHE: dict[str, Prediction] = {}


def predict_cached(config: dict[str, Any], fmt: Format, kv: KvCacheDtype, gpu: GpuSpec, tp: int, work: Workload,
                   ceilings: Ceilings | None = None, fraction: float = 0.9, batch_cap: int | None = None,
                   token_cap: int | None = None) -> Prediction:
    """`predict` with forge's own limits, memoised per process: validate, build and throughput all
    plan the same target, and the search runs a few dozen simulations."""
    key = json.dumps([config, fmt.name, kv.name, gpu.model_dump(), tp, asdict(work), asdict(ceilings) if ceilings else None,
                      fraction, batch_cap, token_cap, asdict(Efficiency.load())], sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = predict(config, fmt, kv, gpu, tp, work, ceilings, fraction, batch_cap=batch_cap, token_cap=token_cap)
    return _CACHE[key]
