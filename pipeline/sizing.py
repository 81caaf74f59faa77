"""The planner: pure arithmetic from a HF config.json, a format, a KV-cache dtype, a GPU and a TP size
to a memory plan and a decode/prefill roofline. Every throughput figure it produces is *predicted*.

Memory model (per GPU, TensorRT-LLM PyTorch backend, docs reference/memory):
    weights/TP + reserve + KV pool <= GPU memory
    reserve = RUNTIME_OVERHEAD_BYTES + activations for one step of max_num_tokens
    KV pool = kv_cache_free_gpu_memory_fraction x (memory - weights/TP - reserve)
The KV pool is paged in blocks of KV_BLOCK_TOKENS tokens (TensorRT-LLM tokens_per_block default 32),
so a sequence of L tokens holds ceil(L/32) blocks.

Roofline (decode): one step streams the weights it touches plus each live sequence's KV once;
the step takes max(bytes / bandwidth, FLOPs / peak). TensorRT-LLM reaches roughly 30-40% of this
ceiling in its perf-overview tables (FACTS.md), so treat it as an upper bound. The run itself
(trtllm-bench's offline scenario at the target's ISL/OSL) is predicted by pipeline/perfmodel.py,
which also chooses the runtime limits (max_batch_size, max_num_tokens) the plan's memory is sized at.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.errors import RecipeError
from pipeline.formats import Format, KvCacheDtype
from pipeline.gpus import GpuSpec

KV_BLOCK_TOKENS = 32
# CUDA context, cuBLAS/NCCL workspaces and the runtime's own buffers: ~0.5-1 GiB seen on H100
# (nvidia-smi with an idle PyTorch context). A stated estimate, not a measurement.
RUNTIME_OVERHEAD_BYTES = 1 << 30
# Largest live activations in one decoder layer for a step of T tokens, BF16: the residual stream
# and the normed input (2 x hidden) plus the MLP's gate and up projections (2 x intermediate / TP).
ACTIVATION_BYTES_PER_ELEMENT = 2
EMBEDDING_BYTES_PER_PARAM = 2  # embeddings, lm_head, norms and routers stay BF16 (ModelOpt default)
TP_CHOICES = (1, 2, 4, 8)


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a HF config. Multimodal configs (Gemma-3, Llama-4, Mistral-3,
    Qwen2.5-VL's newer layout) nest it under `text_config` (transformers Gemma3Config); top-level
    keys fill what the nested one leaves out. The vision tower is not counted: it is a few hundred
    million BF16 parameters (Gemma-3's SigLIP: ~0.4 B) beside multi-billion language models."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and config.get("hidden_size") is None:
        return {**{k: v for k, v in config.items() if k != "text_config"}, **nested}
    return config


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the model's position encoding supports; None when the config does not
    say. max_position_embeddings, unless RoPE scaling extends it: by factor x
    original_max_position_embeddings when the config gives the original, and for YaRN and dynamic
    NTK scaling by factor x max_position_embeddings (transformers 5 modeling_rope_utils.py,
    `standardize_rope_params`, defaults the original length to max_position_embeddings). Linear and llama3 configs already
    state the extended length (Gemma-3: 131072 with a linear factor 8; Llama-3.1: 131072)."""
    config = language_config(config)
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None
    scaling = config.get("rope_scaling") or {}
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if not (isinstance(factor, (int, float)) and factor > 1):
        return positions
    original = scaling.get("original_max_position_embeddings")
    if isinstance(original, int):
        return max(positions, int(original * factor))
    if (scaling.get("rope_type") or scaling.get("type")) in ("yarn", "dynamic"):
        return int(positions * factor)
    return positions


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    experts: int = 0  # 0 = dense
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], where: str = "config.json") -> ModelShape:
        config = language_config(config)

        def need(*keys: str) -> int:
            for key in keys:
                if config.get(key) is not None:
                    return int(config[key])
            raise RecipeError(
                where, f"missing '{keys[0]}' in the model config.", "use the model's full HF config.json."
            )

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
        return cls(
            hidden=hidden,
            intermediate=need("intermediate_size"),
            layers=need("num_hidden_layers"),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=need("vocab_size"),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            experts=experts,
            experts_per_token=int(config.get("num_experts_per_tok") or 0) if experts else 0,
            expert_intermediate=int(config.get("moe_intermediate_size") or config.get("intermediate_size"))
            if experts
            else 0,
            shared_expert_intermediate=int(config.get("shared_expert_intermediate_size") or 0),
        )


@dataclass(frozen=True)
class ParamCounts:
    attention: int
    mlp: int  # dense MLP, or all experts (+ shared expert) for MoE
    router: int
    embeddings: int
    lm_head: int  # 0 when tied to the embeddings
    norms: int
    active_mlp: int  # MLP params one token touches (MoE: top-k experts + shared)

    @property
    def linear(self) -> int:
        """Linear layers inside the decoder blocks: what ModelOpt quantizes by default."""
        return self.attention + self.mlp

    @property
    def total(self) -> int:
        return self.attention + self.mlp + self.router + self.embeddings + self.lm_head + self.norms

    @property
    def active(self) -> int:
        """Params one token's forward pass multiplies through (embedding lookup excluded)."""
        return self.attention + self.active_mlp + self.router + (self.lm_head or self.embeddings)


def count_params(shape: ModelShape) -> ParamCounts:
    h, L = shape.hidden, shape.layers
    q_and_o = 2 * h * shape.heads * shape.head_dim
    k_and_v = 2 * h * shape.kv_heads * shape.head_dim
    attention = L * (q_and_o + k_and_v)
    if shape.experts:
        per_expert = 3 * h * shape.expert_intermediate  # gate, up, down
        shared = 3 * h * shape.shared_expert_intermediate
        mlp = L * (shape.experts * per_expert + shared)
        active_mlp = L * (shape.experts_per_token * per_expert + shared)
        router = L * h * shape.experts
    else:
        mlp = active_mlp = L * 3 * h * shape.intermediate
        router = 0
    embeddings = shape.vocab * h
    return ParamCounts(
        attention=attention,
        mlp=mlp,
        router=router,
        embeddings=embeddings,
        lm_head=0 if shape.tie_embeddings else embeddings,
        norms=L * 2 * h + h,
        active_mlp=active_mlp,
    )


def weight_bytes(counts: ParamCounts, fmt: Format) -> int:
    """Quantized decoder Linear layers at the format's effective bits; the rest in BF16."""
    unquantized = counts.router + counts.embeddings + counts.lm_head + counts.norms
    return math.ceil(counts.linear * fmt.bytes_per_weight + unquantized * EMBEDDING_BYTES_PER_PARAM)


def kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    # With fewer KV heads than TP ranks, TensorRT-LLM replicates KV heads (one per rank).
    return max(1, shape.kv_heads // tp)


def kv_bytes_per_token(shape: ModelShape, kv: KvCacheDtype, tp: int = 1) -> float:
    """K and V for every layer, per GPU at this TP (tp=1: the whole model)."""
    return 2 * shape.layers * kv_heads_per_gpu(shape, tp) * shape.head_dim * kv.bytes_per_element


def tp_is_valid(shape: ModelShape, tp: int) -> bool:
    return shape.heads % tp == 0 and (shape.kv_heads % tp == 0 or tp % shape.kv_heads == 0)


@dataclass(frozen=True)
class ServingShape:
    max_input_len: int
    max_output_len: int
    seq_len: int
    max_num_tokens: int = 8192
    kv_cache_free_gpu_memory_fraction: float = 0.9
    concurrency: int | None = None
    price_per_gpu_hour_usd: float | None = None

    @property
    def mean_decode_context(self) -> float:
        """Average tokens of context per decode step: the prompt plus half the output."""
        return self.max_input_len + self.max_output_len / 2


@dataclass(frozen=True)
class Ceilings:
    """Bandwidth and peak rates the roofline uses: datasheet values, or `forge probe` measurements."""

    memory_bandwidth_bytes_per_s: float
    peak_flops: float
    source: str  # "datasheet" or "measured"


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
    # trtllm-bench's offline scenario at the target's ISL/OSL (pipeline/perfmodel.py), all predicted;
    # empty when nothing fits.
    throughput: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tok_s_batch1(self) -> float | None:
        return self.roofline.get("decode_tok_s_batch1")

    @property
    def decode_tok_s_max_batch(self) -> float | None:
        return self.roofline.get("decode_tok_s_max_batch")

    @property
    def joules_per_token(self) -> float | None:
        return self.roofline.get("joules_per_token")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        roofline = out.pop("roofline")
        out.update(roofline)  # flat keys for programs: decode_tok_s_batch1, ...
        out["predicted"] = sorted(roofline)  # which keys are predictions, said once and explicitly
        out.update(throughput_json(self.throughput))
        return out


def reserve_bytes(shape: ModelShape, serving: ServingShape, tp: int) -> int:
    per_token = 2 * shape.hidden + 2 * (shape.expert_intermediate or shape.intermediate) // tp
    return RUNTIME_OVERHEAD_BYTES + serving.max_num_tokens * per_token * ACTIVATION_BYTES_PER_ELEMENT


def _memory_at_tp(shape, counts, fmt, kv, gpu, serving, tp):
    weights = weight_bytes(counts, fmt)
    weights_per_gpu = math.ceil(weights / tp)
    reserve = reserve_bytes(shape, serving, tp)
    left = gpu.memory_bytes - weights_per_gpu - reserve
    kv_per_token_gpu = kv_bytes_per_token(shape, kv, tp)
    pool = max(0, int(left * serving.kv_cache_free_gpu_memory_fraction))
    blocks = int(pool // (kv_per_token_gpu * KV_BLOCK_TOKENS))
    capacity = blocks * KV_BLOCK_TOKENS
    max_batch = blocks // math.ceil(serving.seq_len / KV_BLOCK_TOKENS)
    if left <= 0:
        why = (
            f"weights {weights_per_gpu / 1e9:.1f} GB/GPU + reserve {reserve / 1e9:.1f} GB exceed "
            f"{gpu.memory_bytes / 1e9:.0f} GB at TP {tp}"
        )
    elif max_batch < 1:
        why = (
            f"KV pool {pool / 1e9:.2f} GB holds {capacity} tokens, less than one sequence of {serving.seq_len}"
        )
    else:
        why = None
    return weights, weights_per_gpu, reserve, max(0, left), pool, capacity, max_batch, why


def smallest_fitting_tp(shape, counts, fmt, kv, gpu, serving) -> int | None:
    for tp in TP_CHOICES:
        if tp_is_valid(shape, tp) and _memory_at_tp(shape, counts, fmt, kv, gpu, serving, tp)[-1] is None:
            return tp
    return None


@dataclass(frozen=True)
class Alternative:
    """One (format, GPU, TP) under which the same model and serving shape fits: computed by the
    planner, never guessed."""

    format: str
    gpu: str
    tp: int
    max_batch: int

    def __str__(self) -> str:
        return f"{self.format} on {self.gpu} x{self.tp} (max batch {self.max_batch})"


def fitting_alternatives(
    config: dict[str, Any],
    formats: list[Format],
    kv: KvCacheDtype,
    catalog: dict[str, GpuSpec],
    serving: ServingShape,
) -> list[Alternative]:
    """For each (format, GPU) the format and KV cache can run on, the smallest TP that fits,
    ordered by GPUs used, then by the most sequences served."""
    shape = ModelShape.from_hf_config(config)
    counts = count_params(shape)
    found = []
    for fmt in formats:
        for key, gpu in catalog.items():
            if not (fmt.min_compute_capability <= gpu.cc and kv.min_compute_capability <= gpu.cc):
                continue
            tp = smallest_fitting_tp(shape, counts, fmt, kv, gpu, serving)
            if tp is not None:
                max_batch = _memory_at_tp(shape, counts, fmt, kv, gpu, serving, tp)[-2]
                found.append(Alternative(fmt.name, key, tp, max_batch))
    return sorted(found, key=lambda a: (a.tp, -a.max_batch))


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
    """Predicted decode and prefill throughput (whole model across its TP group)."""
    bw, peak = ceilings.memory_bandwidth_bytes_per_s, ceilings.peak_flops
    bf16_bytes = (counts.router + counts.norms + (counts.lm_head or counts.embeddings)) * EMBEDDING_BYTES_PER_PARAM
    attention_flops_per_ctx_token = 4 * shape.layers * shape.heads * shape.head_dim  # QK^T and PV, 2 FLOP/MAC

    def expert_params_touched(b: int) -> float:
        if not shape.experts:
            return counts.mlp
        # Expected distinct experts hit by b tokens routing top-k of E uniformly.
        e, k = shape.experts, shape.experts_per_token
        hit = e * (1 - (1 - k / e) ** b)
        shared = shape.layers * 3 * shape.hidden * shape.shared_expert_intermediate
        return (counts.mlp - shared) * hit / e + shared

    def decode(b: int) -> tuple[float, str]:
        quantized_params = counts.attention + expert_params_touched(b)
        weight_traffic = quantized_params * fmt.bytes_per_weight + bf16_bytes
        kv_traffic = b * serving.mean_decode_context * kv_bytes_per_token(shape, kv, 1)
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
        "joules_per_token": None,
        "usd_per_mtok": None,
        "ceilings_source": ceilings.source,
    }
    if batch >= 1:
        tok_s, bound = decode(batch)
        out.update(
            decode_tok_s_max_batch=tok_s,
            decode_bound_max_batch=bound,
            decode_tok_s_per_user_max_batch=tok_s / batch,
            joules_per_token=tp * gpu.tdp_watts / tok_s,  # at TDP: an upper bound on power
        )
        if serving.price_per_gpu_hour_usd is not None:
            out["usd_per_mtok"] = serving.price_per_gpu_hour_usd * tp / (tok_s * 3600) * 1e6
    prefill_flops_per_token = 2 * counts.active + attention_flops_per_ctx_token * serving.max_input_len / 2
    out["prefill_tok_s"] = peak * tp / prefill_flops_per_token
    return out


def plan(
    config: dict[str, Any],
    fmt: Format,
    kv: KvCacheDtype,
    gpu: GpuSpec,
    gpu_key: str,
    serving: ServingShape,
    tp: int = 1,
    ceilings: Ceilings | None = None,
) -> Plan:
    shape = ModelShape.from_hf_config(config)
    counts = count_params(shape)
    if not tp_is_valid(shape, tp):
        raise RecipeError(
            f"tp={tp}",
            f"{shape.heads} attention heads / {shape.kv_heads} KV heads cannot be split {tp} ways.",
            f"use a TP size in {[t for t in TP_CHOICES if tp_is_valid(shape, t)]}.",
        )
    sized = workload_throughput(config, fmt, kv, gpu, serving, tp, ceilings)
    if sized:  # the runtime limits the throughput model chose for this workload
        serving = replace(serving, max_num_tokens=sized["max_num_tokens"])
    ceilings = ceilings or Ceilings(gpu.memory_bandwidth_bytes_per_s, gpu.peak_flops(fmt.compute_dtype), "datasheet")
    weights, weights_gpu, reserve, left, pool, capacity, max_batch, why = _memory_at_tp(
        shape, counts, fmt, kv, gpu, serving, tp
    )
    batch = min(max_batch, serving.concurrency) if serving.concurrency else max_batch
    if sized and why is None:
        batch = sized["max_batch_size"]
    return Plan(
        inputs={
            "format": fmt.name,
            "kv_cache_dtype": kv.name,
            "gpu": gpu_key,
            "compute_capability": gpu.compute_capability,
            "tp": tp,
            **asdict(serving),
            "shape": asdict(shape),
        },
        params=counts.total,
        params_by_component={
            "attention": counts.attention,
            "mlp": counts.mlp,
            "router": counts.router,
            "embeddings": counts.embeddings,
            "lm_head": counts.lm_head,
            "norms": counts.norms,
            "active_per_token": counts.active,
        },
        weights_bytes=weights,
        weights_bytes_per_gpu=weights_gpu,
        kv_bytes_per_token=kv_bytes_per_token(shape, kv, 1),
        kv_bytes_per_token_per_gpu=kv_bytes_per_token(shape, kv, tp),
        memory_bytes=gpu.memory_bytes,
        reserve_bytes=reserve,
        memory_left_for_kv_bytes=left,
        kv_pool_bytes=pool,
        kv_capacity_tokens=capacity,
        max_batch_at_seq_len=max_batch,
        fits=why is None,
        why_not=why,
        min_tp=smallest_fitting_tp(shape, counts, fmt, kv, gpu, serving),
        roofline=roofline(shape, counts, fmt, kv, gpu, serving, tp, batch, ceilings),
        throughput=sized or {},
    )


def workload_throughput(config, fmt, kv, gpu, serving, tp, ceilings) -> dict[str, Any] | None:
    """Runtime limits sized to the workload and the predicted trtllm-bench run at them
    (pipeline/perfmodel.py). The limits come from datasheet rates, so a bundle's limits do not
    depend on which machine built it; `forge probe` ceilings, where given, re-predict the run."""
    from pipeline import perfmodel  # imports this module

    sized = perfmodel.size_runtime(config, fmt, kv, gpu, serving, tp)
    if sized is None or ceilings is None or ceilings.source == "datasheet":
        return sized.to_json() if sized else None
    work = perfmodel.Workload.published(serving.max_input_len, serving.max_output_len)
    return perfmodel.predict(config, fmt, kv, gpu, tp, work, ceilings, serving.kv_cache_free_gpu_memory_fraction,
                             limits=(sized.max_batch_size, sized.max_num_tokens)).to_json()


def throughput_json(throughput: dict[str, Any]) -> dict[str, Any]:
    """The plan JSON's throughput keys: the prediction flat (`predicted_output_tok_s`, ...), the
    chosen limits, and a note that the roofline keys are a ceiling, not a prediction of a run."""
    if not throughput:
        return {"predicted_output_tok_s": None, "throughput": None}
    return {"predicted_output_tok_s": throughput["predicted_output_tok_s"],
            "predicted_output_tok_s_per_gpu": throughput["predicted_output_tok_s_per_gpu"],
            "throughput": throughput,
            "roofline_is": "ceiling: decode_tok_s_* and prefill_tok_s bound a run from above; "
                           "predicted_output_tok_s predicts trtllm-bench's offline run (pipeline/perfmodel.py)"}


def throughput_rows(plan_json: dict[str, Any]) -> list[tuple[str, str]]:
    """`forge plan`'s table rows for the predicted run (throughput_json's keys)."""
    t = plan_json.get("throughput")
    if not t:
        return [("output tok/s (predicted)", "-")]
    gpus = plan_json["inputs"]["tp"]
    return [
        ("runtime limits: max batch / max tokens", f"{t['max_batch_size']:,} / {t['max_num_tokens']:,}"),
        (f"output tok/s, ISL/OSL {plan_json['inputs']['max_input_len']}/{plan_json['inputs']['max_output_len']} (predicted)",
         f"{t['predicted_output_tok_s']:,.1f}" + (f" ({t['predicted_output_tok_s_per_gpu']:,.1f} per GPU)" if gpus > 1 else "")),
        ("  per user / TTFT / TPOT (predicted)", f"{t['predicted_output_tok_s_per_user']:,.1f} tok/s / "
         f"{t['predicted_ttft_ms'] / 1e3:,.1f} s / {t['predicted_tpot_ms']:,.1f} ms"),
        ("  bound by (prefill / decode)", f"{t['bound_prefill']} / {t['bound_decode']}"),
    ]
