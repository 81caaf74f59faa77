"""How one model instance spreads over its GPUs (tensor, expert and attention-data parallelism), and
what one GPU then holds: its share of the weights and its KV cache per token."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.core.formats import Format, KvCacheDtype
from pipeline.sizing.shapes import ModelShape, ParamCounts, weight_bytes


@dataclass(frozen=True)
class Parallelism:
    """How one model instance spreads over `tp` GPUs, as TensorRT-LLM's Mapping does
    (tensorrt_llm/mapping.py, MappingBase.__init__: moe_tp_size x moe_ep_size = tp_size; with only
    moe_ep_size given, moe_tp_size = tp_size // moe_ep_size): the MoE layers split their experts `ep`
    ways and each expert tp/ep ways over the same GPUs. With attention_dp (dp_size = tp_size),
    every rank holds all but the routed experts and serves its own requests from its own KV cache."""

    tp: int = 1
    ep: int = 1
    attention_dp: bool = False

    @property
    def moe_tp(self) -> int:
        return self.tp // self.ep

    @property
    def attention_tp(self) -> int:
        """Ranks one sequence's attention heads are split over."""
        return 1 if self.attention_dp else self.tp

    @property
    def dp_ranks(self) -> int:
        """Ranks that each serve their own requests."""
        return self.tp if self.attention_dp else 1

    def __str__(self) -> str:
        return f"TP {self.tp}" + (f", EP {self.ep}" if self.ep > 1 else "") + (", attention DP" if self.attention_dp else "")


def as_parallelism(tp: int | Parallelism) -> Parallelism:
    """A plain GPU count is tensor parallelism over that many GPUs."""
    return tp if isinstance(tp, Parallelism) else Parallelism(tp)


def parallelism_problem(shape: ModelShape, par: Parallelism) -> str | None:
    """Why this split is not possible for the model; None when it is."""
    if par.tp < 1 or par.ep < 1 or par.tp % par.ep:
        return f"EP {par.ep} must divide TP {par.tp} (moe_tp_size x moe_ep_size = tp_size)"
    if par.ep > 1 and not shape.experts:
        return "expert parallelism needs a mixture-of-experts model"
    if par.ep > 1 and shape.experts % par.ep:
        return f"{shape.experts} experts cannot be split {par.ep} ways"
    if shape.experts and shape.expert_intermediate % par.moe_tp:
        return f"experts {shape.expert_intermediate} wide cannot be split {par.moe_tp} ways"
    if par.attention_dp and par.tp == 1:
        return "attention data parallelism needs TP > 1"
    t = par.attention_tp
    if shape.heads % t:
        return f"{shape.heads} attention heads cannot be split {t} ways"
    if not shape.mla and not (shape.kv_heads % t == 0 or t % shape.kv_heads == 0):
        return f"{shape.kv_heads} KV heads cannot be split {t} ways"
    return None


def tp_is_valid(shape: ModelShape, tp: int) -> bool:
    return parallelism_problem(shape, Parallelism(tp)) is None


def parallel_choices(shape: ModelShape, tp: int) -> list[Parallelism]:
    """The valid splits of an MoE model over `tp` GPUs: every EP that divides TP and the experts,
    each with and without attention DP (TensorRT-LLM's deployment guides pair wide EP with
    attention DP for DeepSeek-R1 and gpt-oss at high concurrency). A dense model has one: TP."""
    if not shape.experts:
        return [Parallelism(tp)] if tp_is_valid(shape, tp) else []
    options = [Parallelism(tp, ep, adp) for ep in range(1, tp + 1) for adp in ((False, True) if tp > 1 else (False,))]
    return [p for p in options if parallelism_problem(shape, p) is None]


def weight_bytes_per_gpu(counts: ParamCounts, fmt: Format, par: Parallelism, expert_fmt: Format | None = None) -> int:
    """One GPU's share. Routed experts: 1/(EP x expert TP) = 1/TP of them either way. Under attention
    DP everything else is whole on every rank: attention and MLA projections (tp_size 1), dense MLPs
    and shared experts (DeepSeek's mlp_tp_size / shared_tp_size 1, Llama-4's overridden_tp_size=1),
    routers, and the embedding and lm_head ("Attention DP doesn't work with embedding
    parallelization", TensorRT-LLM tensorrt_llm/_torch/modules/embedding.py LMHead.__init__;
    enable_lm_head_tp_in_adp splits the lm_head's compute, not its weight)."""
    total = weight_bytes(counts, fmt, expert_fmt)
    if not par.attention_dp:
        return math.ceil(total / par.tp)
    experts = counts.routed_experts * (expert_fmt or fmt).bytes_per_weight
    return math.ceil(total - experts + experts / par.tp)


def kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    # With fewer KV heads than TP ranks, TensorRT-LLM replicates KV heads (one per rank).
    return max(1, shape.kv_heads // tp)


def kv_bytes_per_layer_token(shape: ModelShape, kv: KvCacheDtype, par: Parallelism) -> float:
    """One layer's cache for one token on one GPU. GQA: K and V of the rank's KV heads. MLA: the
    latent and the RoPE key, one copy per rank whatever the TP (every rank's heads read all of it)."""
    if shape.mla:
        return shape.mla.cached_elements * kv.bytes_per_element
    return 2 * kv_heads_per_gpu(shape, par.attention_tp) * shape.head_dim * kv.bytes_per_element


def kv_bytes_per_token(shape: ModelShape, kv: KvCacheDtype, par: Parallelism = Parallelism(),
                       context: int | None = None) -> float:
    """Per token of a sequence, per GPU. Full-attention layers cache every token; sliding-window
    layers only the last `sliding_window`, so over a sequence of `context` tokens they add
    window/context of a layer per token (None: a context within the window, the most per token)."""
    sliding = shape.sliding_layers * (min(1.0, shape.sliding_window / context) if context else 1.0)
    return (shape.full_attention_layers + sliding) * kv_bytes_per_layer_token(shape, kv, par)
