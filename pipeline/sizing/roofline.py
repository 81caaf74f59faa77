"""The decode/prefill roofline: one decode step streams the weights it touches plus each live
sequence's KV once, and takes max(bytes / bandwidth, FLOPs / peak). TensorRT-LLM reaches roughly
30-40% of this ceiling in its docs/source/performance/perf-overview.md tables, so every figure here
is an upper bound, never a prediction of a run (that is pipeline/sizing/perfmodel.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.core.formats import Format, KvCacheDtype
from pipeline.core.gpus import GpuSpec
from pipeline.sizing.memory import ServingShape
from pipeline.sizing.parallel import kv_bytes_per_token
from pipeline.sizing.shapes import EMBEDDING_BYTES_PER_PARAM, ModelShape, ParamCounts


@dataclass(frozen=True)
class Ceilings:
    """Bandwidth and peak rates the roofline uses: datasheet values, or `forge probe` measurements."""

    memory_bandwidth_bytes_per_s: float
    peak_flops: float
    source: str  # "datasheet" or "measured"


def roofline(
    shape: ModelShape,
    counts: ParamCounts,
    fmt: Format,
    kv: KvCacheDtype,
    gpu: GpuSpec,
    serving: ServingShape,
    tp: int,
    batch: int,
    ceilings: Ceilings,
) -> dict[str, Any]:
    """Decode and prefill ceilings (whole model across its TP group): upper bounds, not a prediction,
    so nothing is priced here (J/token and $/Mtok are of the predicted run: pipeline/sizing/plan.py)."""
    bw, peak = ceilings.memory_bandwidth_bytes_per_s, ceilings.peak_flops
    bf16_bytes = (counts.router + counts.norms + (counts.lm_head or counts.embeddings)) * EMBEDDING_BYTES_PER_PARAM
    # QK^T and PV, 2 FLOP/MAC (MLA: 192-wide query-key and 128-wide value heads, prefill form)
    attention_flops_per_ctx_token = 2 * shape.layers * shape.heads * (shape.qk_head_dim + shape.v_head_dim)

    def expert_params_touched(b: int) -> float:
        if not shape.experts:
            return counts.mlp
        # Expected distinct experts hit by b tokens routing top-k of E uniformly; dense layers and
        # shared experts are read whole.
        e, k = shape.experts, shape.experts_per_token
        hit = e * (1 - (1 - k / e) ** b)
        return counts.mlp - counts.routed_experts + counts.routed_experts * hit / e

    def decode(b: int) -> tuple[float, str]:
        quantized_params = counts.attention + expert_params_touched(b)
        weight_traffic = quantized_params * fmt.bytes_per_weight + bf16_bytes
        context = serving.mean_decode_context
        kv_traffic = b * context * kv_bytes_per_token(shape, kv, context=math.ceil(context))
        flops = b * (2 * counts.active + attention_flops_per_ctx_token * serving.mean_decode_context)
        t_mem = (weight_traffic + kv_traffic) / (bw * tp)
        t_compute = flops / (peak * tp)
        return b / max(t_mem, t_compute), "memory" if t_mem >= t_compute else "compute"

    batch1, bound1 = decode(1)
    out: dict[str, Any] = {
        "decode_tok_s_batch1": batch1,
        "decode_bound_batch1": bound1,
        "decode_batch": batch,
        "decode_tok_s_max_batch": None,
        "decode_bound_max_batch": None,
        "decode_tok_s_per_user_max_batch": None,
        "prefill_tok_s": None,
        "ceilings_source": ceilings.source,
    }
    if batch >= 1:
        tok_s, bound = decode(batch)
        out.update(
            decode_tok_s_max_batch=tok_s,
            decode_bound_max_batch=bound,
            decode_tok_s_per_user_max_batch=tok_s / batch,
        )
    prefill_flops_per_token = 2 * counts.active + attention_flops_per_ctx_token * serving.max_input_len / 2
    out["prefill_tok_s"] = peak * tp / prefill_flops_per_token
    return out
