"""A model's shape from its HF config.json, and the arithmetic on it the memory plan, the roofline and
the throughput model share: parameter counts by component, weight bytes at a format, KV-cache bytes
per token, the positions the model supports and the TP sizes its heads split into."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.core.formats import Format, KvCacheDtype

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
