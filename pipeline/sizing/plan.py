"""The planner's answer for one target: pure arithmetic from a HF config.json, a format, a KV-cache
dtype, a GPU and a TP size to a `Plan`: the memory plan (pipeline/sizing/memory.py), the decode/prefill
roofline ceiling (pipeline/sizing/roofline.py) and the predicted trtllm-bench run
(pipeline/sizing/perfmodel.py), which also chooses the runtime limits (max_batch_size,
max_num_tokens) the plan's memory is sized at. Two kinds of throughput figure, named apart: the
roofline's are *ceilings* (upper bounds), the perfmodel's are *predicted*, and only the prediction
is priced (J/token, $/Mtok: `priced`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.core.formats import Format, KvCacheDtype
from pipeline.core.gpus import GpuSpec
from pipeline.sizing import perfmodel
from pipeline.sizing.memory import ServingShape, memory_at_tp, smallest_fitting_tp
from pipeline.sizing.parallel import (
    Parallelism,
    kv_bytes_per_token,
    parallel_choices,
    parallelism_problem,
)
from pipeline.sizing.roofline import Ceilings, roofline
from pipeline.sizing.shapes import TP_CHOICES, ModelShape, count_params


@dataclass(frozen=True)
class Plan:
    inputs: dict[str, Any]
    params: int
    params_by_component: dict[str, int]
    weights_bytes: int
    weights_bytes_per_gpu: int
    kv_bytes_per_token: float
    kv_bytes_per_token_per_gpu: float
    memory_bytes: int
    reserve_bytes: int
    memory_left_for_kv_bytes: int
    kv_pool_bytes: int
    kv_capacity_tokens: int
    max_batch_at_seq_len: int
    fits: bool
    why_not: str | None
    min_tp: int | None
    roofline: dict[str, Any] = field(default_factory=dict)
    # trtllm-bench's offline scenario at the target's ISL/OSL (pipeline/sizing/perfmodel.py), all predicted;
    # empty when nothing fits. Under attention DP its max_batch_size is per rank, as TensorRT-LLM's is.
    throughput: dict[str, Any] = field(default_factory=dict)
    # MoE: every valid split of the experts and attention over the same GPUs, with its memory
    # (`choices_at`); the target's own is the one marked `chosen`.
    parallel_choices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def decode_tok_s_batch1(self) -> float | None:
        return self.roofline.get("decode_tok_s_batch1")

    @property
    def decode_tok_s_max_batch(self) -> float | None:
        return self.roofline.get("decode_tok_s_max_batch")

    @property
    def joules_per_token(self) -> float | None:
        """Of the predicted run, at TDP (the one price basis; the roofline is a ceiling and is not priced)."""
        return self.throughput.get("predicted_joules_per_token")

    @property
    def usd_per_mtok(self) -> float | None:
        """Of the predicted run, at the target's price per GPU-hour; None without a price."""
        return self.throughput.get("predicted_usd_per_mtok")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        roofline = out.pop("roofline")
        out.update(roofline)  # flat keys for programs: decode_tok_s_batch1, ... (ceilings: `roofline_is`)
        out.update(throughput_json(self.throughput))
        out["predicted"] = sorted(PREDICTED_KEYS) if self.throughput else []  # which keys are predictions
        return out


# The plan JSON's keys that are the predicted run (pipeline/sizing/perfmodel.py) and its price; the
# roofline's keys (decode_tok_s_*, prefill_tok_s) are ceilings.
PREDICTED_KEYS = ("predicted_output_tok_s", "predicted_output_tok_s_per_gpu", "throughput", "joules_per_token",
                  "usd_per_mtok")


SINGLE_GPU = Parallelism()


def plan(
    config: dict[str, Any],
    fmt: Format,
    kv: KvCacheDtype,
    gpu: GpuSpec,
    gpu_key: str,
    serving: ServingShape,
    par: Parallelism = SINGLE_GPU,
    ceilings: Ceilings | None = None,
) -> Plan:
    shape = ModelShape.from_hf_config(config)
    counts = count_params(shape)
    problem = parallelism_problem(shape, par)
    if problem:
        raise RecipeError(
            f"tp={par.tp}" + (f", ep={par.ep}" if par.ep > 1 else "") + (", attention_dp" if par.attention_dp else ""),
            f"{problem}.",
            f"use one of: {'; '.join(str(p) for t in TP_CHOICES for p in parallel_choices(shape, t))}.",
        )
    sized = workload_throughput(config, fmt, kv, gpu, serving, par, ceilings)
    if sized:  # the runtime limits the throughput model chose for this workload
        serving = replace(serving, max_num_tokens=sized["max_num_tokens"])
    ceilings = ceilings or Ceilings(gpu.memory_bandwidth_bytes_per_s, gpu.peak_flops(fmt.compute_dtype), "datasheet")
    split = memory_at_tp(shape, counts, fmt, kv, gpu, serving, par)
    batch = min(split.max_batch, serving.concurrency) if serving.concurrency else split.max_batch
    if sized and split.why_not is None:
        batch = sized["max_batch_size"] * par.dp_ranks
    return Plan(
        inputs={
            "format": fmt.name,
            "kv_cache_dtype": kv.name,
            "gpu": gpu_key,
            "compute_capability": gpu.compute_capability,
            "tp": par.tp,
            "ep": par.ep,
            "attention_dp": par.attention_dp,
            **asdict(serving),
            "shape": shape.to_json(),
        },
        params=counts.total,
        params_by_component={
            "attention": counts.attention,
            "mlp": counts.mlp,
            "routed_experts": counts.routed_experts,
            "router": counts.router,
            "embeddings": counts.embeddings,
            "lm_head": counts.lm_head,
            "norms": counts.norms,
            "vision": counts.vision,
            "active_per_token": counts.active,
            "active_per_token_with_embeddings": counts.active_with_embeddings,
        },
        weights_bytes=split.weights,
        weights_bytes_per_gpu=split.weights_per_gpu,
        kv_bytes_per_token=kv_bytes_per_token(shape, kv),
        kv_bytes_per_token_per_gpu=kv_bytes_per_token(shape, kv, par),
        memory_bytes=gpu.memory_bytes,
        reserve_bytes=split.reserve,
        memory_left_for_kv_bytes=split.left,
        kv_pool_bytes=split.pool,
        kv_capacity_tokens=split.capacity,
        max_batch_at_seq_len=split.max_batch,
        fits=split.why_not is None,
        why_not=split.why_not,
        min_tp=smallest_fitting_tp(shape, counts, fmt, kv, gpu, serving),
        roofline=roofline(shape, counts, fmt, kv, gpu, serving, par.tp, batch, ceilings),
        throughput=priced(sized, gpu, par.tp, serving.price_per_gpu_hour_usd) if sized else {},
        parallel_choices=choices_at(shape, counts, fmt, kv, gpu, serving, par) if shape.experts else [],
    )


def choices_at(shape, counts, fmt, kv, gpu, serving: ServingShape, chosen: Parallelism) -> list[dict[str, Any]]:
    """Each valid EP / attention-DP split over the chosen TP, with one GPU's memory under it."""
    rows = []
    for par in parallel_choices(shape, chosen.tp):
        split = memory_at_tp(shape, counts, fmt, kv, gpu, serving, par)
        rows.append({"parallelism": str(par), "tp": par.tp, "ep": par.ep, "attention_dp": par.attention_dp,
                     "weights_bytes_per_gpu": split.weights_per_gpu, "kv_pool_bytes_per_gpu": split.pool,
                     "kv_capacity_tokens_per_gpu": split.capacity, "max_batch_at_seq_len": split.max_batch,
                     "fits": split.why_not is None, "why_not": split.why_not, "chosen": par == chosen})
    return rows


def priced(run: dict[str, Any], gpu: GpuSpec, tp: int, usd_per_gpu_hour: float | None) -> dict[str, Any]:
    """The predicted run with its J/token (every GPU at TDP, an upper bound on power) and $/Mtok."""
    tok_s = run["predicted_output_tok_s"]
    usd = None if usd_per_gpu_hour is None else usd_per_gpu_hour * tp / (tok_s * 3600) * 1e6
    return {**run, "predicted_joules_per_token": tp * gpu.tdp_watts / tok_s, "predicted_usd_per_mtok": usd}


def workload_throughput(config, fmt, kv, gpu, serving, par: Parallelism, ceilings) -> dict[str, Any] | None:
    """Runtime limits sized to the workload and the predicted trtllm-bench run at them
    (pipeline/sizing/perfmodel.py). The limits come from datasheet rates, so a bundle's limits do not
    depend on which machine built it; `forge probe` ceilings, where given, re-predict the run."""
    sized = perfmodel.size_runtime(config, fmt, kv, gpu, serving, par)
    if sized is None or ceilings is None or ceilings.source == "datasheet":
        return sized.to_json() if sized else None
    work = perfmodel.Workload.published(serving.max_input_len, serving.max_output_len)
    return perfmodel.predict(config, fmt, kv, gpu, par, work, ceilings, serving.kv_cache_free_gpu_memory_fraction,
                             limits=(sized.max_batch_size, sized.max_num_tokens)).to_json()


def throughput_json(throughput: dict[str, Any]) -> dict[str, Any]:
    """The plan JSON's throughput keys: the prediction flat (`predicted_output_tok_s`, ...), the
    chosen limits, and a note that the roofline keys are a ceiling, not a prediction of a run."""
    if not throughput:
        return {"predicted_output_tok_s": None, "throughput": None, "joules_per_token": None, "usd_per_mtok": None}
    return {"predicted_output_tok_s": throughput["predicted_output_tok_s"],
            "predicted_output_tok_s_per_gpu": throughput["predicted_output_tok_s_per_gpu"],
            "joules_per_token": throughput["predicted_joules_per_token"],
            "usd_per_mtok": throughput["predicted_usd_per_mtok"],
            "throughput": throughput,
            "roofline_is": "ceiling: decode_tok_s_* and prefill_tok_s bound a run from above; "
                           "predicted_output_tok_s predicts trtllm-bench's offline run (pipeline/sizing/perfmodel.py), "
                           "and joules_per_token and usd_per_mtok are of that predicted run"}


