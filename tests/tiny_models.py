"""Tiny random models shared by tests (importable because pytest puts tests/ on sys.path for
tests/conftest.py). Weights are random with a fixed seed: numerics tests, not language tests."""

from __future__ import annotations


def random_tiny_llama(num_key_value_heads: int = 2, max_position_embeddings: int = 128, seed: int = 0):
    """LlamaForCausalLM: hidden 64, MLP 128, 2 layers, 4 heads, vocab 256, eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        vocab_size=256,
        max_position_embeddings=max_position_embeddings,
        architectures=["LlamaForCausalLM"],
    )
    return transformers.LlamaForCausalLM(config).eval()
