"""Facts about a Hugging Face config.json that several layers read: where a multimodal config keeps its
language model, and the keys that make a model a mixture of experts (the planner reads the layout,
the engine contracts whether an engine loads such experts)."""

from __future__ import annotations

from typing import Any

# Routed experts per MoE layer, by family: Mixtral, gpt-oss, Llama-4 and Phi-MoE say num_local_experts;
# Qwen2/3-MoE and OLMoE num_experts; DeepSeek n_routed_experts.
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a HF config. Multimodal configs (Gemma-3, Llama-4, Mistral-3,
    Qwen2.5-VL's newer layout) nest it under `text_config` (transformers Gemma3Config); top-level
    keys fill what the nested one leaves out. The vision tower is not counted: it is a few hundred
    million BF16 parameters (Gemma-3's SigLIP: ~0.4 B) beside multi-billion language models."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and config.get("hidden_size") is None:
        return {**{k: v for k, v in config.items() if k != "text_config"}, **nested}
    return config


def is_moe(config: dict[str, Any]) -> bool:
    """Whether the config (or its language model's) has routed experts."""
    language = language_config(config)
    return any(language.get(key) for key in EXPERT_KEYS)
