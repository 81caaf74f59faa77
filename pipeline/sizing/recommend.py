"""The purchase decision: every way to serve a demand (a model, request lengths, a request rate, latency
limits) on the candidate GPUs, what each costs, and the cheapest. Every figure is *predicted* by the
throughput model (pipeline/sizing/iteration.py, pipeline/sizing/online.py); prices are inputs.

A configuration is GPU x format x parallelism (TP, and for an MoE model EP and attention DP) x
replicas. One replica's capacity is the highest Poisson request rate whose p-th percentile TTFT and
TPOT meet the limits (online.max_rate, MLPerf's Server rule); the demand needs ceil(rate / capacity)
replicas. Cost is the GPUs' hourly price; $/Mtok is that price over the tokens the demand asks for
(the replicas run below their capacity when the demand does not fill the last one, and that idle
share is paid for). J/token is at TDP, an upper bound.

Formats: a format forge has evaluated for this model is offered only where its accuracy gate passed
(the caller reads the verdicts); one never evaluated is offered with "accuracy not measured". A
pre-quantized checkpoint is also offered as its publisher ships it (AS_PUBLISHED, e.g. gpt-oss's
MXFP4 experts), labelled with the publisher's accuracy.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.core.formats import FORMATS, ComputeCapability, Format, KvCacheDtype
from pipeline.core.gpus import GpuSpec
from pipeline.sizing.iteration import Efficiency, Hardware, Precision, StepModel, step_model
from pipeline.sizing.memory import ServingShape, memory_at_tp
from pipeline.sizing.online import Slo, max_rate, mean_lengths, offline_tok_s
from pipeline.sizing.parallel import Parallelism, parallel_choices
from pipeline.sizing.perfmodel import Workload, simulate
from pipeline.sizing.shapes import TP_CHOICES, ModelShape, count_params

# TensorRT-LLM's default token budget per iteration (BaseLlmArgs.max_num_tokens); the serving side
# of the search sizes everything else.
MAX_NUM_TOKENS = 8192
KV_FRACTION = 0.9  # KvCacheConfig.free_gpu_memory_fraction's default
HOURS_PER_MONTH = 730  # 8,760 h / 12
BASELINE = "baseline (unquantized)"
NOT_MEASURED = "accuracy not measured"
PASSED = "accuracy gate passed"
# A pre-quantized checkpoint served as its publisher ships it (Precision.as_published: gpt-oss's MXFP4
# experts), beside the formats forge quantizes to itself; its accuracy is the publisher's, not forge's.
AS_PUBLISHED = "as-published"
PUBLISHERS = "the publisher's checkpoint (accuracy not measured by forge)"


@dataclass(frozen=True)
class Demand:
    lengths: tuple[tuple[int, int], ...]  # (ISL, OSL) per request kind, equally likely
    rate_per_s: float  # requests/s to serve
    slo: Slo

    @property
    def mean_input_len(self) -> float:
        return mean_lengths(self.lengths)[0]

    @property
    def mean_output_len(self) -> float:
        return mean_lengths(self.lengths)[1]

    @property
    def max_seq_len(self) -> int:
        return max(i + o for i, o in self.lengths)


@dataclass(frozen=True)
class Offer:
    """One candidate GPU and what an hour of it costs (None: not priced; its rows carry no $)."""

    key: str
    gpu: GpuSpec
    usd_per_gpu_hour: float | None
    price_source: str


@dataclass(frozen=True)
class Option:
    """One configuration. All figures predicted."""

    gpu: str
    format: str
    parallelism: str
    gpus_per_replica: int
    accuracy: str
    replica_rate_per_s: float  # the highest rate one replica serves within the SLO
    replicas: int
    gpus: int
    ttft_ms: dict[str, float]  # one replica at its highest rate (the worst the demand can see)
    tpot_ms: dict[str, float]
    output_tok_s_per_gpu: float  # the demand's output tokens/s over all GPUs
    usd_per_hour: float | None
    usd_per_month: float | None
    usd_per_mtok: float | None
    joules_per_token: float
    seconds: float  # time the rate search took
    pareto: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Rejected:
    gpu: str
    format: str
    parallelism: str
    why: str


@dataclass(frozen=True)
class Recommendation:
    options: list[Option]  # feasible, cheapest first (unpriced last, by GPUs)
    rejected: list[Rejected]

    @property
    def cheapest(self) -> Option | None:
        priced = [o for o in self.options if o.usd_per_hour is not None]
        return priced[0] if priced else None


def formats_for(gpu: GpuSpec, evaluated: dict[str, str], wanted: tuple[str, ...] | None) -> list[tuple[Format, str | None]]:
    """The formats this GPU runs, each with its accuracy label, or None with why it is left out."""
    cc = ComputeCapability.parse(gpu.compute_capability)
    out = []
    for name in wanted or tuple(FORMATS):
        if name == AS_PUBLISHED:  # not a format forge quantizes to: recommend() reads it from the config
            continue
        fmt = FORMATS[name]
        if not fmt.min_compute_capability <= cc:
            continue
        if not fmt.quantized:
            out.append((fmt, BASELINE))
        elif name not in evaluated:
            out.append((fmt, NOT_MEASURED))
        elif evaluated[name] == "PASS":
            out.append((fmt, PASSED))
        else:
            out.append((fmt, None))
    return out


def recommend(config: dict[str, Any], demand: Demand, offers: list[Offer], kv: KvCacheDtype,
              evaluated: dict[str, str], formats: tuple[str, ...] | None = None, eff: Efficiency | None = None,
              pareto: int = 0, cheapest_only: bool = False) -> Recommendation:
    """Every configuration of the offers that fits and meets the SLO, cheapest first.
    `evaluated`: format -> the accuracy verdict forge measured for this model (PASS, FAIL,
    INCONCLUSIVE); formats absent from it were never evaluated. `pareto`: how many of the cheapest
    options get their concurrency sweep (pareto_points), for the plot. `cheapest_only`: skip the rate
    search of a configuration that cannot beat the cheapest found so far even at its offline rate
    (a lower bound on what it costs), so only the cheapest is sure to be in the list."""
    shape = ModelShape.from_hf_config(config)
    counts = count_params(shape)
    eff = eff or Efficiency.load()
    serving = ServingShape(max_input_len=max(i for i, _ in demand.lengths),
                           max_output_len=max(o for _, o in demand.lengths), seq_len=demand.max_seq_len,
                           max_num_tokens=MAX_NUM_TOKENS, kv_cache_free_gpu_memory_fraction=KV_FRACTION)
    options: list[Option] = []
    rejected: list[Rejected] = []
    candidates = []  # (cost floor, offer, format, accuracy, parallelism, step, batch limit, KV capacity, offline tok/s)
    for offer in offers:
        if not kv.min_compute_capability <= ComputeCapability.parse(offer.gpu.compute_capability):
            rejected.append(Rejected(offer.key, "-", "-", f"a {kv.name} KV cache needs compute capability "
                                     f"{kv.min_compute_capability}; {offer.key} has {offer.gpu.compute_capability}"))
            continue
        precisions = []  # (name, precision, accuracy label)
        for fmt, accuracy in formats_for(offer.gpu, evaluated, formats):
            if accuracy is None:
                rejected.append(Rejected(offer.key, fmt.name, "-", f"accuracy gate {evaluated[fmt.name]} for this model"))
            else:
                precisions.append((fmt.name, Precision.uniform(fmt), accuracy))
        if formats is None or AS_PUBLISHED in formats:
            try:
                shipped = Precision.as_published(config, offer.gpu)
            except RecipeError as e:
                rejected.append(Rejected(offer.key, AS_PUBLISHED, "-", e.problem))
                shipped = None
            if shipped is not None:
                precisions.append((AS_PUBLISHED, shipped, PUBLISHERS))
        for name, precision, accuracy in precisions:
            fmt = precision.dense
            for tp in TP_CHOICES:
                for par in parallel_choices(shape, tp):
                    split = memory_at_tp(shape, counts, fmt, kv, offer.gpu, serving, par, precision.expert_format)
                    if split.why_not:
                        rejected.append(Rejected(offer.key, name, str(par), split.why_not))
                        continue
                    batch = min(split.max_batch_per_rank, 4096)
                    step = step_model(shape, counts, fmt, kv, Hardware.of(offer.gpu, fmt, precision=precision), par, eff,
                                      context=demand.mean_input_len + demand.mean_output_len / 2, precision=precision)
                    floor, offline = math.inf, None
                    if cheapest_only and offer.usd_per_gpu_hour is not None:
                        offline = offline_tok_s(step, list(demand.lengths), batch, MAX_NUM_TOKENS, split.capacity)
                        floor = math.ceil(demand.rate_per_s * demand.mean_output_len / offline) * par.tp * offer.usd_per_gpu_hour
                    candidates.append((floor, offer, name, accuracy, par, step, batch, split.capacity, offline))
    if cheapest_only:  # branch and bound: cheapest floor first, stop where the floor reaches the best found
        candidates.sort(key=lambda c: c[0])
    sweeps: dict[int, tuple[Any, int, int]] = {}  # id(option) -> (step model, batch limit, KV capacity)
    best = math.inf  # the lowest $/hour found so far
    for floor, offer, name, accuracy, par, step, batch, capacity, offline in candidates:
        if cheapest_only and floor >= best:
            break
        option = _option(step, offer, name, par, capacity, batch, demand, accuracy, offline)
        if isinstance(option, str):
            rejected.append(Rejected(offer.key, name, str(par), option))
        else:
            options.append(option)
            sweeps[id(option)] = (step, batch, capacity)
            if option.usd_per_hour is not None:
                best = min(best, option.usd_per_hour)
    options.sort(key=lambda o: (o.usd_per_hour is None, o.usd_per_hour or 0.0, o.gpus, o.format))
    for option in options[:pareto]:
        option.pareto.extend(pareto_points(*sweeps[id(option)], demand))
    return Recommendation(options, rejected)


def _option(step: StepModel, offer: Offer, fmt: str, par: Parallelism, capacity: int, batch_limit: int,
            demand: Demand, accuracy: str, offline: float | None = None) -> Option | str:
    start = time.perf_counter()
    answer = max_rate(step, list(demand.lengths), demand.slo, batch_limit, MAX_NUM_TOKENS, capacity, offline)
    seconds = time.perf_counter() - start
    if answer.run is None:
        return (f"no request rate meets {demand.slo}: not even {answer.offline_output_tok_s / demand.mean_output_len / 1024:.3g} "
                "req/s (1/1024 of the offline rate), so a lone request's own latency is over the limits")
    replicas = math.ceil(demand.rate_per_s / answer.max_rate_per_s)
    gpus = replicas * par.tp
    tok_s = demand.rate_per_s * demand.mean_output_len
    usd_hour = None if offer.usd_per_gpu_hour is None else gpus * offer.usd_per_gpu_hour
    return Option(
        gpu=offer.key, format=fmt, parallelism=str(par), gpus_per_replica=par.tp, accuracy=accuracy,
        replica_rate_per_s=answer.max_rate_per_s, replicas=replicas, gpus=gpus,
        ttft_ms=answer.run.ttft_ms, tpot_ms=answer.run.tpot_ms, output_tok_s_per_gpu=tok_s / gpus,
        usd_per_hour=usd_hour, usd_per_month=None if usd_hour is None else usd_hour * HOURS_PER_MONTH,
        usd_per_mtok=None if usd_hour is None else usd_hour / (tok_s * 3600) * 1e6,
        joules_per_token=gpus * offer.gpu.tdp_watts / tok_s, seconds=seconds,
    )


def pareto_points(step: StepModel, batch_limit: int, capacity: int, demand: Demand) -> list[dict[str, float]]:
    """Throughput per GPU against tokens/s per user (1000 / TPOT) as the concurrency grows: the curve
    a latency target picks a point on. trtllm-bench's offline run at each concurrency (perfmodel)."""
    isl, osl = round(demand.mean_input_len), round(demand.mean_output_len)
    points = []
    concurrency = 1
    while True:
        c = min(concurrency, batch_limit)
        run = simulate(step, Workload(isl, osl, max(64, 8 * c) * step.par.dp_ranks), c, MAX_NUM_TOKENS, capacity)
        if run.predicted_tpot_ms > 0:
            points.append({"concurrency": c * step.par.dp_ranks, "tok_s_per_gpu": run.predicted_output_tok_s_per_gpu,
                           "tok_s_per_user": 1e3 / run.predicted_tpot_ms})
        if c >= batch_limit:
            return points
        concurrency *= 2
