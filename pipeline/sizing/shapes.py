"""A model's shape from its HF config.json, and the arithmetic on it the memory plan, the roofline and
the throughput model share: parameter counts by component, weight bytes at a format, KV-cache bytes
per token, the positions the model supports and the TP sizes its heads split into."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.core.formats import Format
from pipeline.core.hf_config import EXPERT_KEYS, is_moe, language_config

EMBEDDING_BYTES_PER_PARAM = 2  # embeddings, lm_head, norms and routers stay BF16 (ModelOpt default)
TP_CHOICES = (1, 2, 4, 8)


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


# Families whose expert layout forge reads, by transformers `model_type` (the language model's, after
# `language_config`). Each reads its own keys below; a config with expert or MLA keys under any other
# model_type is refused rather than planned as the nearest family (DeepSeek-R1 read as a dense Llama
# was 38.6 B instead of 671 B: issue 24).
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "gpt_oss", "llama4_text", "llama4",
                "deepseek_v2", "deepseek_v3")
MLA_KEYS = ("kv_lora_rank", "q_lora_rank")
# Attention kinds a `layer_types` list may name and forge plans (transformers' configuration_utils
# ALLOWED_LAYER_TYPES also has linear/chunked/hybrid kinds, e.g. Qwen3-Next's "linear_attention").
READ_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Mla:
    """DeepSeek's multi-head latent attention (transformers DeepseekV3Attention): queries through a
    low-rank q_a/q_b pair (or one q_proj when q_lora_rank is null, DeepSeek-V2-Lite), keys and values
    from one compressed latent of kv_lora_rank plus a shared RoPE key of qk_rope_head_dim. The latent
    and the RoPE key are what the KV cache holds, once per token per layer, for all heads."""

    q_lora_rank: int  # 0: q_proj straight from the hidden state
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def cached_elements(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    def params(self, hidden: int, heads: int) -> int:
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = (hidden * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * qk
             if self.q_lora_rank else hidden * heads * qk)
        kv_a = hidden * self.cached_elements + self.kv_lora_rank  # kv_a_proj_with_mqa + kv_a_layernorm
        kv_b = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + heads * self.v_head_dim * hidden


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int  # the dense MLP's width (dense models, and an MoE model's dense layers)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    experts: int = 0  # routed experts per MoE layer; 0 = dense
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0  # all shared experts of one MoE layer together
    moe_layers: int = 0  # layers whose MLP is the MoE; the other layers are dense at `intermediate`
    mla: Mla | None = None
    sliding_window: int = 0  # tokens a sliding-window layer attends to (and caches); 0 = none
    sliding_layers: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    expert_bias: bool = False  # gpt-oss: gate_up_proj_bias and down_proj_bias per expert
    vision_params: int = 0  # a vision tower served with the language model (BF16, never quantized)
    model_type: str = ""  # the language model's transformers model_type, where the config names it

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], where: str = "config.json") -> ModelShape:
        top = config
        config = language_config(config)
        model_type = str(config.get("model_type") or "")

        def need(*keys: str) -> int:
            for key in keys:
                if config.get(key) is not None:
                    return int(config[key])
            raise RecipeError(
                where, f"missing '{keys[0]}' in the model config.", "use the model's full HF config.json."
            )

        _refuse_unread(config, model_type, where)
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        layers = need("num_hidden_layers")
        sliding_window, sliding_layers = _sliding(config, model_type, layers, where)
        moe = _moe(config, model_type, layers, need) if is_moe(config) else {}
        return cls(
            hidden=hidden,
            intermediate=need("intermediate_size_mlp", "intermediate_size") if model_type.startswith("llama4")
            else need("intermediate_size"),
            layers=layers,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=need("vocab_size"),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            mla=_mla(config, need) if any(config.get(k) is not None for k in MLA_KEYS) else None,
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            # transformers: Qwen2 always biases q/k/v (Qwen2Attention); Llama-style attention_bias
            # biases q/k/v/o (LlamaAttention), as does gpt-oss (GptOssAttention).
            qkv_bias=bool(config.get("attention_bias")) or model_type in ("qwen2", "qwen2_moe"),
            o_bias=bool(config.get("attention_bias")),
            expert_bias=model_type == "gpt_oss",
            vision_params=_llama4_vision_params(top) if model_type.startswith("llama4") else 0,
            model_type=model_type,
            **moe,
        )

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def full_attention_layers(self) -> int:
        return self.layers - self.sliding_layers

    @property
    def qk_head_dim(self) -> int:
        return self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def v_head_dim(self) -> int:
        return self.mla.v_head_dim if self.mla else self.head_dim

    def to_json(self) -> dict[str, Any]:
        """The shape as the plan records it: the dense fields always, the MoE, MLA, sliding-window,
        bias and vision fields only where the model has them."""
        out = asdict(self)
        for name in OPTIONAL_SHAPE_FIELDS:
            if not out[name]:
                del out[name]
        return out


OPTIONAL_SHAPE_FIELDS = ("moe_layers", "mla", "sliding_window", "sliding_layers", "qkv_bias", "o_bias",
                         "expert_bias", "vision_params", "model_type")


def _refuse_unread(config: dict[str, Any], model_type: str, where: str) -> None:
    """A config whose layout forge does not read is refused, naming what it could not read."""
    unread = [k for k in EXPERT_KEYS + MLA_KEYS if config.get(k)]
    if unread and model_type not in MOE_FAMILIES:
        raise RecipeError(
            where, f"model_type {model_type!r} has {', '.join(unread)}: a mixture-of-experts or latent-attention "
            "layout forge has no reader for, and planning it as another family would misstate its memory.",
            f"forge reads the expert layouts of {', '.join(MOE_FAMILIES)}; add a reader in pipeline/sizing/shapes.py.",
        )
    kinds = config.get("layer_types")
    if kinds is not None:
        other = sorted({str(k) for k in kinds} - set(READ_LAYER_TYPES))
        if other or len(kinds) != config.get("num_hidden_layers"):
            raise RecipeError(
                f"{where}: layer_types", f"layers of kind {other or 'a count other than num_hidden_layers'}: "
                "forge plans full and sliding-window attention layers only.",
                "plan a model whose layers are all full or sliding-window attention.",
            )


def _sliding(config: dict[str, Any], model_type: str, layers: int, where: str) -> tuple[int, int]:
    """(window, sliding layers). `layer_types` names each layer (gpt-oss alternates sliding_attention
    and full_attention; Gemma-3 writes it from sliding_window_pattern); Mistral and Mixtral apply a
    non-null sliding_window to every layer (MistralAttention). Qwen2's sliding_window is only read
    when use_sliding_window is true (Qwen2Config), and no Qwen release sets it."""
    window = config.get("sliding_window")
    kinds = config.get("layer_types")
    if kinds is not None:
        count = sum(1 for k in kinds if k == "sliding_attention")
    elif isinstance(config.get("sliding_window_pattern"), int):  # Gemma-2/3 configs written before layer_types
        pattern = config["sliding_window_pattern"]
        count = sum(1 for i in range(layers) if (i + 1) % pattern)
    elif model_type in ("mistral", "mixtral") and window:
        count = layers
    else:
        return 0, 0
    if count and not (isinstance(window, int) and window > 0):
        raise RecipeError(f"{where}: sliding_window", f"{count} sliding-window layers but sliding_window is {window!r}.",
                          "use the model's full HF config.json (it states the window in tokens).")
    return (int(window), count) if count else (0, 0)


def _mla(config: dict[str, Any], need) -> Mla:
    return Mla(q_lora_rank=int(config.get("q_lora_rank") or 0), kv_lora_rank=need("kv_lora_rank"),
               qk_nope_head_dim=need("qk_nope_head_dim"), qk_rope_head_dim=need("qk_rope_head_dim"),
               v_head_dim=need("v_head_dim"))


def _moe(config: dict[str, Any], model_type: str, layers: int, need) -> dict[str, int]:
    """The expert layout of one family, as its transformers modeling file builds the layers."""
    experts = need(*EXPERT_KEYS)
    top_k = need("num_experts_per_tok", "experts_per_token")
    if model_type in ("mixtral", "olmoe", "phimoe", "gpt_oss"):
        # Every layer is MoE; each expert is `intermediate_size` wide (MixtralSparseMoeBlock,
        # OlmoeSparseMoeBlock, PhimoeSparseMoeBlock, GptOssExperts).
        return {"experts": experts, "experts_per_token": top_k, "expert_intermediate": need("intermediate_size"),
                "moe_layers": layers}
    if model_type in ("qwen2_moe", "qwen3_moe"):
        # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: layer i is sparse unless listed in
        # mlp_only_layers, when (i + 1) % decoder_sparse_step == 0; Qwen2-MoE adds one shared expert
        # of shared_expert_intermediate_size (Qwen3-MoE has none).
        step = int(config.get("decoder_sparse_step") or 1)
        dense_only = set(config.get("mlp_only_layers") or [])
        moe_layers = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        return {"experts": experts, "experts_per_token": top_k, "expert_intermediate": need("moe_intermediate_size"),
                "shared_expert_intermediate": int(config.get("shared_expert_intermediate_size") or 0),
                "moe_layers": moe_layers}
    if model_type.startswith("llama4"):
        # Llama4TextConfig: moe_layers defaults to every interleave_moe_layer_step-th layer
        # (range(step - 1, layers, step)); an MoE layer is the routed experts plus one shared expert,
        # all `intermediate_size` wide (Llama4TextMoe); dense layers are intermediate_size_mlp wide.
        step = int(config.get("interleave_moe_layer_step") or 1)
        listed = config.get("moe_layers")
        moe_layers = len(listed) if isinstance(listed, list) else len(range(step - 1, layers, step))
        width = need("intermediate_size")
        return {"experts": experts, "experts_per_token": top_k, "expert_intermediate": width,
                "shared_expert_intermediate": width, "moe_layers": moe_layers}
    # DeepSeek-V2/V3 (DeepseekV3DecoderLayer): layer i is MoE when i >= first_k_dense_replace and
    # i % moe_layer_freq == 0, with n_shared_experts shared experts of moe_intermediate_size. The
    # num_nextn_predict_layers multi-token-prediction layers are not counted: DeepSeek's 671 B
    # excludes them, and the runtime loads them only for MTP speculative decoding.
    first_dense = int(config.get("first_k_dense_replace") or 0)
    freq = int(config.get("moe_layer_freq") or 1)
    width = need("moe_intermediate_size")
    return {"experts": experts, "experts_per_token": top_k, "expert_intermediate": width,
            "shared_expert_intermediate": int(config.get("n_shared_experts") or 0) * width,
            "moe_layers": sum(1 for i in range(layers) if i >= first_dense and i % freq == 0)}


def _llama4_vision_params(config: dict[str, Any]) -> int:
    """Llama-4's vision tower and projector (transformers Llama4VisionModel,
    Llama4MultiModalProjector): Meta's totals (Scout 109 B, Maverick 400 B) include it, and
    TensorRT-LLM loads it with the language model for image inputs. A ViT: patch embedding,
    class and position embeddings, per layer biased q/k/v/o and a biased two-layer MLP with two
    LayerNorms, a pixel-shuffle adapter MLP to projector_output_dim, a projector to the text width."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return 0
    h, inner, n = int(vision["hidden_size"]), int(vision["intermediate_size"]), int(vision["num_hidden_layers"])
    patch, image = int(vision.get("patch_size", 14)), int(vision.get("image_size", 336))
    positions = (image // patch) ** 2 + 1
    layer = 4 * (h * h + h) + (h * inner + inner) + (inner * h + h) + 2 * 2 * h
    shuffled = int(h / float(vision.get("pixel_shuffle_ratio", 0.5)) ** 2)
    adapter_in, adapter_out = int(vision.get("projector_input_dim", 4096)), int(vision.get("projector_output_dim", 4096))
    adapter = shuffled * adapter_in + adapter_in * adapter_out  # Llama4VisionMLP2, no biases
    text_hidden = int(language_config(config)["hidden_size"])
    projector = int(vision.get("vision_output_dim", adapter_out)) * text_hidden
    return (int(vision.get("num_channels", 3)) * patch * patch * h + h + positions * h + 2 * 2 * h
            + n * layer + adapter + projector)


@dataclass(frozen=True)
class ParamCounts:
    attention: int
    mlp: int  # dense MLP layers, all routed experts and shared experts
    router: int
    embeddings: int
    lm_head: int  # 0 when tied to the embeddings
    norms: int
    active_mlp: int  # MLP params one token touches (MoE: top-k experts + shared)
    routed_experts: int = 0  # the part of `mlp` that expert parallelism splits
    vision: int = 0

    @property
    def linear(self) -> int:
        """Linear layers inside the decoder blocks: what ModelOpt quantizes by default."""
        return self.attention + self.mlp

    @property
    def total(self) -> int:
        return self.attention + self.mlp + self.router + self.embeddings + self.lm_head + self.norms + self.vision

    @property
    def active(self) -> int:
        """Params one token's forward pass multiplies through (embedding lookup excluded; OpenAI's
        convention for gpt-oss's 5.1 B). Vision excluded."""
        return self.attention + self.active_mlp + self.router + (self.lm_head or self.embeddings)

    @property
    def active_with_embeddings(self) -> int:
        """`active` plus the input embedding table: the convention of Mistral's 12.9 B, Qwen's 3.3 B
        and Meta's 17 B."""
        return self.active + (self.embeddings if self.lm_head else 0)


def count_params(shape: ModelShape) -> ParamCounts:
    h, L = shape.hidden, shape.layers
    if shape.mla:
        attention = L * shape.mla.params(h, shape.heads)
    else:
        q = h * shape.heads * shape.head_dim
        kv = h * shape.kv_heads * shape.head_dim
        bias = (shape.heads + 2 * shape.kv_heads) * shape.head_dim * shape.qkv_bias + h * shape.o_bias
        attention = L * (2 * q + 2 * kv + bias)
    dense = shape.dense_layers * 3 * h * shape.intermediate
    if shape.experts:
        w = shape.expert_intermediate
        per_expert = 3 * h * w + (2 * w + h) * shape.expert_bias  # gate, up, down (+ biases)
        shared = 3 * h * shape.shared_expert_intermediate
        routed = shape.moe_layers * shape.experts * per_expert
        mlp = dense + routed + shape.moe_layers * shared
        active_mlp = dense + shape.moe_layers * (shape.experts_per_token * per_expert + shared)
        router = shape.moe_layers * (h + shape.expert_bias) * shape.experts
    else:
        mlp = active_mlp = dense
        routed = router = 0
    embeddings = shape.vocab * h
    return ParamCounts(
        attention=attention,
        mlp=mlp,
        router=router,
        embeddings=embeddings,
        lm_head=0 if shape.tie_embeddings else embeddings,
        norms=L * 2 * h + h,
        active_mlp=active_mlp,
        routed_experts=routed,
        vision=shape.vision_params,
    )


def weight_bytes(counts: ParamCounts, fmt: Format, expert_fmt: Format | None = None) -> int:
    """Quantized decoder Linear layers at the format's effective bits; the rest in BF16. `expert_fmt`:
    the routed experts' own format where it differs (gpt-oss ships MXFP4 experts beside BF16 attention)."""
    experts = counts.routed_experts * ((expert_fmt or fmt).bytes_per_weight - fmt.bytes_per_weight)
    return math.ceil(counts.linear * fmt.bytes_per_weight + experts + _unquantized(counts) * EMBEDDING_BYTES_PER_PARAM)


def _unquantized(counts: ParamCounts) -> int:
    return counts.router + counts.embeddings + counts.lm_head + counts.norms + counts.vision
