"""A physical model of trtllm-bench's offline max-throughput scenario; every output is *predicted*.

The scenario (TensorRT-LLM docs, performance/perf-overview.md, "Reproducing Benchmarked Results"):
N requests of fixed ISL/OSL are all queued at t=0; the PyTorch backend runs in-flight batching with
chunked prefill, a paged KV cache and CUDA graphs. Each scheduler iteration serves every decoding
request one token and fills the rest of `max_num_tokens` with prefill chunks of admitted requests.

Admission: at most `max_batch_size` requests are in flight, and the KV pool must hold every admitted
request at its full ISL + OSL (the default GUARANTEED_NO_EVICT capacity policy reserves a request's
blocks up front: tensorrt_llm/llmapi/llm_args.py SchedulerConfig.capacity_scheduler_policy, and
trtllm-bench passes the same policy explicitly). What each iteration costs is
pipeline/sizing/iteration.py.

The simulation is O(1) per iteration and jumps over runs of pure-decode iterations (their time is
affine in the live context), so a 3000-request run costs milliseconds, not per-token Python loops.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.core.formats import Format, KvCacheDtype
from pipeline.core.gpus import GpuSpec
from pipeline.sizing.iteration import Efficiency, Hardware, Precision, StepModel, step_model
from pipeline.sizing.memory import KV_BLOCK_TOKENS, ServingShape, memory_at_tp
from pipeline.sizing.parallel import Parallelism, as_parallelism
from pipeline.sizing.roofline import Ceilings
from pipeline.sizing.shapes import ModelShape, ParamCounts, count_params

# trtllm-bench's dataset sizes by ISL/OSL (perf-overview.md, "$num_requests" table).
PUBLISHED_NUM_REQUESTS = {(128, 128): 30000, (128, 2048): 3000, (128, 4096): 1500, (1000, 2000): 1500,
                          (2048, 128): 3000, (2048, 2048): 1500, (5000, 500): 1500, (1000, 1000): 3000,
                          (500, 2000): 3000, (20000, 2000): 1000}
# Runtime limits forge's search tries (build picks the best that fits memory).
BATCH_CHOICES = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
TOKEN_CHOICES = (2048, 4096, 8192, 16384, 32768)


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
class Prediction:
    """One simulated trtllm-bench run. All figures predicted."""

    predicted_output_tok_s: float  # total over the TP group (trtllm-bench "Total Output Throughput")
    predicted_output_tok_s_per_gpu: float
    predicted_output_tok_s_per_user: float  # mean over requests of OSL / request latency
    predicted_ttft_ms: float  # mean; includes queueing, as trtllm-bench measures from submission
    predicted_tpot_ms: float  # mean over requests
    max_batch_size: int
    max_num_tokens: int
    concurrency: int  # requests in flight at most: min(max_batch_size, KV capacity / (ISL + OSL), N), x DP ranks
    kv_capacity_tokens: int  # one GPU's pool
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
    iteration they finish. Under attention DP this is one rank, which serves 1/dp of the requests
    with its own max_batch_size and KV pool (TensorRT-LLM's limits are per rank there); the instance's
    throughput is dp times the rank's."""
    dp = step.par.dp_ranks
    isl, osl, n = work.input_len, work.output_len, -(-work.num_requests // dp)
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
    total = dp * n * osl / now
    return Prediction(
        predicted_output_tok_s=total, predicted_output_tok_s_per_gpu=total / step.tp,
        predicted_output_tok_s_per_user=latency_user_sum / n, predicted_ttft_ms=1e3 * ttft_sum / n,
        predicted_tpot_ms=1e3 * tpot_sum / n if osl > 1 else 0.0, max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens, concurrency=limit * dp, kv_capacity_tokens=kv_capacity_tokens,
        bound_prefill=_dominant(bound_time["prefill"]), bound_decode=_dominant(bound_time["decode"]),
        iterations=it, hardware_source=step.hw.source,
    )


def _dominant(times: dict[str, float]) -> str:
    return max(times, key=times.get) if times else "-"


def kv_capacity(shape: ModelShape, counts: ParamCounts, fmt: Format, kv: KvCacheDtype, gpu: GpuSpec,
                tp: int | Parallelism, max_num_tokens: int, fraction: float, seq_len: int = 2,
                precision: Precision | None = None) -> int:
    """Tokens the KV pool holds, by the planner's memory model (pipeline/sizing/memory.py), which follows
    TensorRT-LLM's KvCacheCreator._cal_max_memory (tensorrt_llm/_torch/pyexecutor/_util.py):
    (total GPU memory - peak memory of the profiling run) x free_gpu_memory_fraction."""
    serving = ServingShape(max_input_len=1, max_output_len=1, seq_len=seq_len, max_num_tokens=max_num_tokens,
                           kv_cache_free_gpu_memory_fraction=fraction)
    par = as_parallelism(tp)
    expert_fmt = precision.expert_format if precision else None
    return memory_at_tp(shape, counts, precision.dense if precision else fmt, kv, gpu, serving, par, expert_fmt).capacity


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


def predict(config: dict[str, Any], fmt: Format, kv: KvCacheDtype, gpu: GpuSpec, tp: int | Parallelism, work: Workload,
            ceilings: Ceilings | None = None, fraction: float = 0.9, eff: Efficiency | None = None,
            limits: tuple[int, int] | None = None, batch_cap: int | None = None,
            token_cap: int | None = None, precision: Precision | None = None) -> Prediction:
    """The predicted run at `limits` (max_batch_size, max_num_tokens; per rank under attention DP);
    without them, forge's own choice: the pair of BATCH_CHOICES x TOKEN_CHOICES (within the caps) with
    the highest predicted throughput, each at the KV capacity its max_num_tokens leaves (activations
    scale with it). `precision`: per-part formats where they differ from `fmt` (Precision)."""
    shape = ModelShape.from_hf_config(config)
    counts = count_params(shape)
    precision = precision or Precision.uniform(fmt)
    step = step_model(shape, counts, precision.dense, kv, Hardware.of(gpu, precision.dense, ceilings, precision), tp,
                      eff or Efficiency.load(), context=work.input_len + work.output_len / 2, precision=precision)
    seq_len = work.input_len + work.output_len
    if limits is not None:
        return simulate(step, work, limits[0], limits[1],
                        kv_capacity(shape, counts, fmt, kv, gpu, tp, limits[1], fraction, seq_len, precision))
    tokens = sorted({t for t in TOKEN_CHOICES if token_cap is None or t <= token_cap} | ({token_cap} if token_cap else set()))
    batches = tuple(b for b in BATCH_CHOICES if batch_cap is None or b < batch_cap) + ((batch_cap,) if batch_cap else ())
    seq_blocks = math.ceil((work.input_len + work.output_len) / KV_BLOCK_TOKENS)
    best: Prediction | None = None
    for t in tokens:
        capacity = kv_capacity(shape, counts, fmt, kv, gpu, tp, t, fraction, seq_len, precision)
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


def size_runtime(config: dict[str, Any], fmt: Format, kv: KvCacheDtype, gpu: GpuSpec, serving: ServingShape,
                 tp: int | Parallelism, ceilings: Ceilings | None = None) -> Prediction | None:
    """forge's runtime limits for a target's workload (trtllm-bench's scenario at the target's ISL/OSL),
    with the target's concurrency (shared by the DP ranks) and max_num_tokens as caps; None when no
    request fits at all."""
    work = Workload.published(serving.max_input_len, serving.max_output_len)
    dp = as_parallelism(tp).dp_ranks
    batch_cap = -(-serving.concurrency // dp) if serving.concurrency else None
    try:
        return predict_cached(config, fmt, kv, gpu, tp, work, ceilings, serving.kv_cache_free_gpu_memory_fraction,
                              batch_cap, serving.max_num_tokens)
    except RecipeError:
        return None


_CACHE: dict[str, Prediction] = {}


def predict_cached(config: dict[str, Any], fmt: Format, kv: KvCacheDtype, gpu: GpuSpec, tp: int | Parallelism, work: Workload,
                   ceilings: Ceilings | None = None, fraction: float = 0.9, batch_cap: int | None = None,
                   token_cap: int | None = None) -> Prediction:
    """`predict` with forge's own limits, memoised per process: validate, build and throughput all
    plan the same target, and the search runs a few dozen simulations."""
    key = json.dumps([config, fmt.name, kv.name, gpu.model_dump(), str(as_parallelism(tp)), asdict(work), asdict(ceilings) if ceilings else None,
                      fraction, batch_cap, token_cap, asdict(Efficiency.load())], sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = predict(config, fmt, kv, gpu, tp, work, ceilings, fraction, batch_cap=batch_cap, token_cap=token_cap)
    return _CACHE[key]
