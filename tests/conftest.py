"""Shared pytest fixtures."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class TinyLlama:
    """A tiny random Llama and its tokenizer, both also saved (save_pretrained) in `model_dir`."""

    model: Any
    tokenizer: Any
    model_dir: Path


_TINY_TEXT = (
    "the a an of to in on at by for with from river garden window bread lamp road market train "
    "boat hill snow rain wind stone door table chair book letter clock city village field tree "
    "is was are were has had will can may walks runs sleeps opens closes reads writes carries "
    "red green blue small large old new quiet bright early late slowly quickly often never one "
    "two three four five six seven eight nine ten and but or because when while after"
)


def _tiny_corpus(seed: int, sentences: int = 400) -> list[str]:
    # A few KB of word-salad sentences: enough for BPE to learn merges; byte-level pre-tokenization
    # keeps every other string encodable.
    rng = random.Random(seed)
    words_pool = _TINY_TEXT.split()
    lines = []
    for _ in range(sentences):
        words = [rng.choice(words_pool) for _ in range(rng.randint(5, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyLlama:
    """Tiny random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 KV heads) + offline BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tiny_corpus(seed=0), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()

    model_dir = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return TinyLlama(model=model, tokenizer=tokenizer, model_dir=model_dir)
