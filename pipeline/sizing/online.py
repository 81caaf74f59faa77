"""The latency-aware mode of the throughput model: requests arrive over time, as users send them, and
the answer is a latency distribution and the highest rate that meets a latency SLO. Every figure is
*predicted*.

The scenario is MLPerf Inference's Server (and Interactive) scenario (mlcommons/inference
loadgen/mlperf.conf and inference_policies inference_rules.adoc, rounds v5.0/v5.1):
- queries arrive as a Poisson process (LoadGen draws exponential inter-arrival times);
- TTFT is timed from a query's *scheduled* arrival, so queueing counts; TPOT excludes the first token:
  (latency - TTFT) / (output tokens - 1);
- a rate is valid when the p99 over queries of TTFT and of TPOT are both below their limits
  (Llama-2-70B: 2000 ms / 200 ms; Interactive 450 ms / 40 ms. Llama-3.1-8B: 2000 ms / 100 ms;
  Interactive 500 ms / 30 ms);
- tokens/s counts output tokens only.

The engine is the offline model's (pipeline/sizing/perfmodel.py): the same StepModel prices every
iteration, the same in-flight batching with chunked prefill and GUARANTEED_NO_EVICT admission
schedules it. What differs is who is waiting: here a request joins the queue at its arrival time, and
the simulation jumps over runs of pure-decode iterations only up to the next arrival or completion.
Under attention DP one rank is simulated at 1/dp of the rate (requests spread evenly over ranks).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass

from pipeline.core.errors import RecipeError
from pipeline.sizing.iteration import StepModel
from pipeline.sizing.memory import KV_BLOCK_TOKENS
from pipeline.sizing.perfmodel import Workload, simulate

# A run measures the requests that arrive in a window after a warm-up, while arrivals go on, so the
# system is as full during the window as in a long MLPerf run (600 s at least) and nothing measured
# sees the empty start or the final drain. Lengths are in request lifetimes (`lifetime`); the window
# holds at least MEASURED requests (a p99 over 2,000 rests on its 20 slowest: tail latencies come
# from bursts of arrivals, so fewer swing by a third between windows of one long run). MAX_REQUESTS
# bounds a run's cost (the window shrinks first); COARSE_REQUESTS is the bracketing pass's run length.
WARMUP_LIVES, WINDOW_LIVES, TAIL_LIVES = 2.0, 2.0, 1.0
MEASURED = 2000
MAX_REQUESTS = 8000
COARSE_REQUESTS = 1000
# The rate search: geometric bisection from ceiling / 2^10 to the ceiling; COARSE_STEPS short runs
# bracket the answer within a factor 2^(10/2^6) = 1.11, FINE_STEPS full runs narrow it to ~1.3%.
COARSE_STEPS, FINE_STEPS = 6, 3
LOWEST_SHARE = 2.0 ** -10


@dataclass(frozen=True)
class Slo:
    """Latency limits at a percentile over requests (MLPerf: p99 of TTFT and of TPOT)."""

    ttft_ms: float
    tpot_ms: float
    percentile: float = 99.0

    def __str__(self) -> str:
        return f"p{self.percentile:g} TTFT <= {self.ttft_ms:g} ms, TPOT <= {self.tpot_ms:g} ms"


@dataclass(frozen=True)
class Latencies:
    """One simulated online run (predicted)."""

    rate_per_s: float  # offered requests/s of the instance (all DP ranks)
    # Steady state, x DP ranks: output tokens of the requests that finished between the first and the
    # last tenth of completions, over that time. A finite run starts empty and drains at the end; MLPerf
    # runs at least 600 s and tens of thousands of queries, so its tokens/s is the steady rate.
    output_tok_s: float
    ttft_ms: dict[str, float]  # p50 / p90 / p99 over requests (after warm-up)
    tpot_ms: dict[str, float]
    max_batch_size: int

    def meets(self, slo: Slo) -> bool:
        key = f"p{slo.percentile:g}"
        return self.ttft_ms[key] <= slo.ttft_ms and self.tpot_ms[key] <= slo.tpot_ms


def mean_lengths(lengths: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> tuple[float, float]:
    """Mean ISL and OSL of equally likely request kinds."""
    return sum(i for i, _ in lengths) / len(lengths), sum(o for _, o in lengths) / len(lengths)


def poisson_arrivals(rate_per_s: float, n: int, seed: int = 0) -> list[float]:
    """Arrival times of `n` requests at `rate_per_s` (exponential gaps, seeded: the same inputs give
    the same prediction)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


def simulate_online(step: StepModel, arrivals: list[float], lengths: list[tuple[int, int]], max_batch_size: int,
                    max_num_tokens: int, kv_capacity_tokens: int, window: tuple[float, float] | None = None,
                    percentiles: tuple[float, ...] = (50, 90, 99)) -> Latencies:
    """One rank's run: request i arrives at arrivals[i] with lengths[i] = (ISL, OSL). Latencies are of
    the requests arriving in `window` (start, end), seconds (None: all of them); the run stops once
    those have finished."""
    n = len(arrivals)
    blocks_total = kv_capacity_tokens // KV_BLOCK_TOKENS
    need = [math.ceil((isl + osl) / KV_BLOCK_TOKENS) for isl, osl in lengths]
    if max(need) > blocks_total:
        isl, osl = lengths[need.index(max(need))]
        raise RecipeError("throughput model", f"the KV cache ({kv_capacity_tokens:,} tokens) holds no request of "
                          f"{isl}+{osl} tokens.", "use more GPUs (TP), a smaller format or shorter sequences.")
    start, end = window or (0.0, math.inf)
    measured = [i for i in range(n) if start <= arrivals[i] < end]
    if not measured:
        raise ValueError(f"no request arrives in the measured window {window}")
    outstanding = len(measured)
    last_measured = measured[-1]
    first = [0.0] * n
    done_at = [math.inf] * n
    now, it, nxt = 0.0, 0, 0
    free = blocks_total
    waiting: deque[int] = deque()
    prefill: deque[list[int]] = deque()  # [request, prompt tokens done]
    finishing: list[tuple[int, int]] = []  # heap of (last iteration, request)
    decode, ctx_sum = 0, 0.0
    while outstanding and (nxt < n or waiting or prefill or decode):
        while nxt < n and arrivals[nxt] <= now:
            waiting.append(nxt)
            nxt += 1
        if not (waiting or prefill or decode):
            now = arrivals[nxt]
            continue
        while waiting and decode + len(prefill) < max_batch_size and need[waiting[0]] <= free:
            r = waiting.popleft()
            free -= need[r]
            prefill.append([r, 0])
        budget = max_num_tokens - decode
        tokens = ctx_work = 0.0
        seqs = 0
        completed: list[int] = []
        for entry in prefill:
            if budget <= 0:
                break
            r, done = entry
            chunk = min(lengths[r][0] - done, budget)
            tokens += chunk
            ctx_work += chunk * (done + (chunk + 1) / 2)
            seqs += 1
            budget -= chunk
            entry[1] = done + chunk
            if entry[1] == lengths[r][0]:
                completed.append(r)
        for _ in completed:
            prefill.popleft()
        if seqs == 0:  # pure decode until the next completion, or the next arrival that can be admitted
            steps = finishing[0][0] - it + 1
            admissible = not waiting and decode + len(prefill) < max_batch_size
            if admissible and nxt < n:
                dt0 = step.seconds(decode, ctx_sum, 0, 0, 0)
                steps = max(1, min(steps, math.ceil((arrivals[nxt] - now) / dt0)))
            dt = step.seconds(decode, ctx_sum + decode * (steps - 1) / 2, 0, 0, 0)
            now += steps * dt
            it += steps
            ctx_sum += decode * steps
        else:
            dt = step.seconds(decode, ctx_sum, tokens, ctx_work, seqs)
            now += dt
            it += 1
            ctx_sum += decode
        while finishing and finishing[0][0] < it:
            _, r = heapq.heappop(finishing)
            isl, osl = lengths[r]
            decode -= 1
            ctx_sum -= isl + osl
            free += need[r]
            done_at[r] = now
            if start <= arrivals[r] < end:
                outstanding -= 1
        for r in completed:  # first token at the end of the iteration that finished the prompt
            isl, osl = lengths[r]
            first[r] = now
            if osl > 1:
                decode += 1
                ctx_sum += isl + 1
                heapq.heappush(finishing, (it - 1 + (osl - 1), r))
            else:
                done_at[r] = now
                free += need[r]
                if start <= arrivals[r] < end:
                    outstanding -= 1
    ttft = sorted(1e3 * (first[i] - arrivals[i]) for i in measured)
    tpot = sorted(1e3 * (done_at[i] - first[i]) / (lengths[i][1] - 1) for i in measured if lengths[i][1] > 1) or [0.0]
    dp = step.par.dp_ranks
    span = arrivals[last_measured] - arrivals[measured[0]]
    # Output tokens/s over the window: those of the requests that finished inside it.
    finished = [i for i in range(n) if arrivals[measured[0]] <= done_at[i] <= arrivals[last_measured]]
    steady = sum(lengths[i][1] for i in finished) / span if span > 0 else math.inf
    return Latencies(
        rate_per_s=dp * (len(measured) - 1) / span if span > 0 else math.inf,
        output_tok_s=dp * steady,
        ttft_ms={f"p{p:g}": _quantile(ttft, p) for p in percentiles},
        tpot_ms={f"p{p:g}": _quantile(tpot, p) for p in percentiles},
        max_batch_size=max_batch_size,
    )


def _quantile(values: list[float], p: float) -> float:
    """The nearest-rank percentile of sorted values (the definition LoadGen's p99 uses: the value
    below which p% of the samples lie, an observed sample)."""
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


def lifetime(step: StepModel, lengths: list[tuple[int, int]], rank_rate: float, max_batch_size: int) -> float:
    """Seconds a request lives at this rate, in the mean, for sizing a run's warm-up and window. Prompts
    arrive one by one, so each costs an iteration of its own that every decoding request waits through;
    between them run pure-decode iterations. Per second: rate prompt iterations of T_p, the rest decode
    iterations of T_d, so a decoding request gets rate + (1 - rate T_p) / T_d tokens per second. The
    decode batch is Little's law (rate x decode time, at most max_batch_size); fixed-point iteration."""
    isl, osl = mean_lengths(lengths)
    decode_s = osl * step.time(1, isl, 0, 0, 0)[0]
    prompt = step.time(0, 0, isl, isl * (isl + 1) / 2, 1)[0]
    for _ in range(8):
        batch = max(1.0, min(max_batch_size, rank_rate * decode_s))
        ctx = batch * (isl + osl / 2)
        prompt = step.time(round(batch), ctx, isl, isl * (isl + 1) / 2, 1)[0]
        pure = step.time(round(batch), ctx, 0, 0, 0)[0]
        tokens_per_s = rank_rate + max(0.0, 1 - rank_rate * prompt) / pure
        decode_s = osl / tokens_per_s
    return prompt + decode_s


def run_at_rate(step: StepModel, rate_per_s: float, lengths: list[tuple[int, int]], max_batch_size: int,
                max_num_tokens: int, kv_capacity_tokens: int, max_requests: int = MAX_REQUESTS, seed: int = 0,
                percentiles: tuple[float, ...] = (50, 90, 99)) -> Latencies:
    """The instance at `rate_per_s` requests/s; each DP rank takes an even share. Warm-up, window and
    tail are WARMUP_LIVES, WINDOW_LIVES and TAIL_LIVES request lifetimes; the window holds MEASURED
    requests at least, and the run max_requests at most (the window gives way first)."""
    rank_rate = rate_per_s / step.par.dp_ranks
    life = lifetime(step, lengths, rank_rate, max_batch_size)
    warmup, tail = WARMUP_LIVES * life, TAIL_LIVES * life
    window = max(WINDOW_LIVES * life, MEASURED / rank_rate)
    n = math.ceil(rank_rate * (warmup + window + tail))
    if n > max_requests:
        n = max_requests
        window = max(n / rank_rate - warmup - tail, 0.25 * n / rank_rate)
        warmup = min(warmup, 0.5 * (n / rank_rate - window))
    arrivals = poisson_arrivals(rank_rate, n, seed)
    cycle = [lengths[i % len(lengths)] for i in range(n)]
    return simulate_online(step, arrivals, cycle, max_batch_size, max_num_tokens, kv_capacity_tokens,
                           (warmup, warmup + window), percentiles)


def offline_tok_s(step: StepModel, lengths: list[tuple[int, int]], max_batch_size: int, max_num_tokens: int,
                  kv_capacity_tokens: int) -> float:
    """MLPerf Offline / trtllm-bench's throughput run: every request queued at t=0, through the offline
    model's scheduler (pipeline/sizing/perfmodel.py simulate) at the mean lengths, with twenty batches'
    worth of requests so that the first fill and the last drain weigh little (MLPerf Offline issues
    24,576 queries for Llama-2-70B)."""
    isl, osl = (round(x) for x in mean_lengths(lengths))
    work = Workload(isl, osl, max(3000, 20 * max_batch_size * step.par.dp_ranks))
    return simulate(step, work, max_batch_size, max_num_tokens, kv_capacity_tokens).predicted_output_tok_s


def decode_batch_for_tpot(step: StepModel, slo: Slo, context: float, limit: int) -> int:
    """The largest decode batch whose pure-decode iteration fits the TPOT limit at the mean context:
    the batch a server caps itself at so that decoding users keep their TPOT (prefill chunks come on
    top, which is why the search also tries half of it)."""
    lo, hi = 1, limit
    if step.time(1, context, 0, 0, 0)[0] * 1e3 > slo.tpot_ms:
        return 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if step.time(mid, mid * context, 0, 0, 0)[0] * 1e3 <= slo.tpot_ms:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class RateAnswer:
    """The highest rate meeting the SLO, with its run (None when not even a trickle meets it)."""

    slo: Slo
    max_rate_per_s: float
    run: Latencies | None
    offline_output_tok_s: float
    mean_output_len: float
    binding: bool = True  # False: every rate tried below the offline rate met the SLO (the answer is the bracket's top)

    @property
    def output_tok_s(self) -> float:
        """Output tokens/s at that rate: a run that meets its latency limits keeps up with its
        arrivals, so it serves what is offered (MLPerf Server's tokens/s over a 600 s run)."""
        return self.max_rate_per_s * self.mean_output_len


def max_rate(step: StepModel, lengths: list[tuple[int, int]], slo: Slo, kv_batch_limit: int, max_num_tokens: int,
             kv_capacity_tokens: int, offline: float | None = None) -> RateAnswer:
    """The highest Poisson rate whose run meets `slo`: a geometric bisection between ceiling / 2^10
    and the offline throughput's request rate (the ceiling, which no server sustains), bracketed with
    short runs and narrowed with full ones, at max_batch_size = the TPOT-fitting decode batch; where
    the rate just above the answer misses on TPOT, half that batch is tried too (a server trades
    queueing for per-user speed). None-run when not even ceiling / 2^10 meets it. `offline`: the
    offline output tok/s (offline_tok_s), where the caller has it already."""
    mean_isl, mean_osl = mean_lengths(lengths)
    full = offline or offline_tok_s(step, lengths, kv_batch_limit, max_num_tokens, kv_capacity_tokens)
    ceiling = full / mean_osl  # requests/s the instance completes flat out
    cap = decode_batch_for_tpot(step, slo, mean_isl + mean_osl / 2, kv_batch_limit)
    wanted = tuple(sorted({50.0, 90.0, 99.0, slo.percentile}))
    key = f"p{slo.percentile:g}"
    best: tuple[float, Latencies] | None = None
    binding = False
    for batch in (cap, max(1, cap // 2)):
        def run(rate: float, most: int, batch: int = batch) -> Latencies:
            return run_at_rate(step, rate, lengths, batch, max_num_tokens, kv_capacity_tokens, most, percentiles=wanted)

        lo, hi = ceiling * LOWEST_SHARE, ceiling
        missed_tpot = False
        for _ in range(COARSE_STEPS):  # bracket with short runs
            mid = math.sqrt(lo * hi)
            if run(mid, COARSE_REQUESTS).meets(slo):
                lo = mid
            else:
                hi, binding = mid, True
        found = None
        while found is None:  # the bracket's low end must hold in a full run too
            trial = run(lo, MAX_REQUESTS)
            if trial.meets(slo):
                found = trial
            elif lo <= ceiling * LOWEST_SHARE:
                break
            else:
                lo, hi, binding = max(ceiling * LOWEST_SHARE, lo * lo / hi), lo, True
        if found is None:
            continue
        for _ in range(FINE_STEPS):  # narrow with full runs
            mid = math.sqrt(lo * hi)
            trial = run(mid, MAX_REQUESTS)
            if trial.meets(slo):
                lo, found = mid, trial
            else:
                hi, binding = mid, True
                missed_tpot = trial.tpot_ms[key] > slo.tpot_ms
        if best is None or lo > best[0]:
            best = (lo, found)
        if not missed_tpot or cap == 1:
            break
    if best is None:
        return RateAnswer(slo, 0.0, None, full, mean_osl)
    return RateAnswer(slo, best[0], best[1], full, mean_osl, binding)
