"""Calibration sets: schema loading, the offline text generator, and deterministic materialization."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline.calibration.documents import preview_documents
from pipeline.calibration.english import _article, _Verb, generate_document
from pipeline.calibration.sets import (
    GeneratedCalibrationSet,
    HFCalibrationSet,
    list_calibration_sets,
    load_calibration_set,
)
from pipeline.calibration.tensors import load_materialized, materialize
from pipeline.core.errors import CalibrationError, RecipeError, SourceError, StageInputError

REPO_CALIB = Path(__file__).resolve().parents[2] / "calibration"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def make_tokenizer(chat_template: str | None = TEMPLATE):
    """Byte-level BPE without merges: one token per byte, plus three special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_set(directory: Path, name: str, body: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("name", list_calibration_sets(REPO_CALIB))
def test_shipped_sets_load(name):
    spec = load_calibration_set(name, REPO_CALIB)
    assert spec.name == name and spec.description
    if isinstance(spec, HFCalibrationSet):
        assert len(spec.revision) == 40


def test_shipped_set_contents():
    assert list_calibration_sets(REPO_CALIB) == ["cnn_dailymail", "generated-en", "ultrachat"]
    cnn = load_calibration_set("cnn_dailymail", REPO_CALIB)
    assert (cnn.dataset, cnn.config, cnn.split, cnn.text_field) == ("abisee/cnn_dailymail", "3.0.0", "train", "article")
    chat = load_calibration_set("ultrachat", REPO_CALIB)
    assert (chat.dataset, chat.split, chat.messages_field, chat.text_field) == (
        "HuggingFaceH4/ultrachat_200k",
        "train_sft",
        "messages",
        None,
    )
    gen = load_calibration_set("generated-en", REPO_CALIB)
    assert isinstance(gen, GeneratedCalibrationSet) and gen.documents == 20000


def test_unknown_set_lists_known_names():
    with pytest.raises(RecipeError) as err:
        load_calibration_set("cnn-dailymail", REPO_CALIB)
    text = str(err.value)
    assert text.startswith("calibration set 'cnn-dailymail': no such set in ")
    assert "known sets: cnn_dailymail, generated-en, ultrachat." in text and "Fix: Use one of those names" in text


HF = {"kind": "hf", "description": "d", "dataset": "a/b", "revision": "c" * 40, "split": "train", "text_field": "text"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({**HF, "revison": "x"}, "revison: Extra inputs are not permitted"),
        ({**HF, "revision": "main"}, "revision: Value error, 'main' is not a 40-hex commit"),
        ({**HF, "messages_field": "messages"}, "set exactly one of text_field or messages_field"),
        ({**HF, "kind": "s3"}, "does not match any of the expected tags: 'hf', 'local', 'generated'"),
        ({**HF, "name": "other"}, "`name` is set from the file name, not in the file."),
        ({"kind": "local", "description": "d", "files": ["a.csv"]}, "unsupported file type ['a.csv']"),
        ({"kind": "local", "description": "d", "files": ["missing.txt"]}, "files not found under"),
    ],
)
def test_invalid_sets_are_refused(tmp_path, body, expected):
    path = write_set(tmp_path, "bad", body)
    with pytest.raises(RecipeError) as err:
        load_calibration_set("bad", tmp_path)
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)


# ---------------------------------------------------------------------------------------------
# Generator


def test_inflection_and_articles():
    assert (_Verb.parse("stir").past, _Verb.parse("stir").ing, _Verb.parse("stir").third) == (
        "stirred",
        "stirring",
        "stirs",
    )
    assert (_Verb.parse("study").past, _Verb.parse("study").third) == ("studied", "studies")
    assert (_Verb.parse("dig/dug").past, _Verb.parse("dig/dug").ing) == ("dug", "digging")
    assert (_Verb.parse("tune").past, _Verb.parse("tune").ing, _Verb.parse("dye").ing) == ("tuned", "tuning", "dyeing")
    assert (_Verb.parse("debug/debugged").ing, _Verb.parse("visit").past) == ("debugging", "visited")
    assert [_article(w) for w in ("owl", "unit test", "hour", "rook")] == ["an owl", "a unit test", "an hour", "a rook"]


def test_generated_text_is_deterministic_varied_and_complete():
    import yaml

    lists = yaml.safe_load((REPO_CALIB / "wordlists" / "english-v1.yaml").read_text())
    docs = [generate_document(lists, 0, i, 0.3) for i in range(300)]
    assert docs[17] == generate_document(lists, 0, 17, 0.3)  # independent of generation order
    assert generate_document(lists, 1, 17, 0.3) != docs[17]
    chats = [d for d in docs if isinstance(d, list)]
    assert 0.2 < len(chats) / len(docs) < 0.4
    assert all(m["role"] in ("user", "assistant") for chat in chats for m in chat)
    text = " ".join(d if isinstance(d, str) else " ".join(m["content"] for m in d) for d in docs)
    assert "{" not in text and "}" not in text  # every template slot was filled
    words = {w.strip(".,:?!\"'").lower() for w in text.split()}
    assert len(words) > 700, len(words)
    assert sum(topic["title"].capitalize() in text for topic in lists["topics"].values()) >= 20


def test_preview_is_seeded():
    spec = load_calibration_set("generated-en", REPO_CALIB)
    assert preview_documents(spec, 3, 5) == preview_documents(spec, 3, 5)
    assert preview_documents(spec, 3, 5) != preview_documents(spec, 4, 5)


# ---------------------------------------------------------------------------------------------
# Materialize


def test_materialize_is_deterministic(tokenizer, tmp_path):
    spec = load_calibration_set("generated-en", REPO_CALIB)
    a = materialize(spec, tokenizer, 16, 64, 0, False, tmp_path / "a.safetensors")
    b = materialize(spec, tokenizer, 16, 64, 0, False, tmp_path / "b.safetensors")
    c = materialize(spec, tokenizer, 16, 64, 1, False, tmp_path / "c.safetensors")
    assert a.sha256 == b.sha256 and a.path.read_bytes() == b.path.read_bytes()
    assert c.sha256 != a.sha256
    assert (a.num_samples, a.seq_len, a.token_count) == (16, 64, 1024)
    assert a.documents_used >= 16  # each document contributes at most seq_len tokens

    loaded = load_materialized(a.path)
    assert tuple(loaded.input_ids.shape) == (16, 64) and str(loaded.input_ids.dtype) == "torch.int64"
    assert int(loaded.attention_mask.sum()) == 16 * 64
    assert (
        loaded.info["set"] == "generated-en"
        and loaded.info["seed"] == 0
        and loaded.info["documents_used"] == a.documents_used
    )
    text = tokenizer.decode(loaded.input_ids.flatten().tolist())
    assert "<|im_end|>" in text  # documents are separated by EOS
    assert "<|im_start|>" not in text  # no chat template requested
    assert not list(tmp_path.glob(".*partial"))


def test_too_few_tokens_is_an_error_without_output(tokenizer, tmp_path):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["alpha", "beta gamma", "delta"]))
    write_set(tmp_path, "small", {"kind": "local", "description": "d", "files": ["docs.jsonl"], "text_field": "body"})
    spec = load_calibration_set("small", tmp_path)
    out = tmp_path / "out" / "calib.safetensors"
    with pytest.raises(CalibrationError) as err:
        materialize(spec, tokenizer, 4, 8, 0, False, out)
    # One token per byte; 5, 10 and 5 bytes plus EOS, capped at 8 per document: 6 + 8 + 6 = 20.
    assert str(err.value) == (
        "calibration set 'small': needs 4 samples x 8 tokens = 32 tokens, but its 3 documents give 20 tokens "
        "(2 samples; each document contributes at most 8). Fix: Lower num_samples to 2 or less, shorten seq_len, "
        "or use a larger set."
    )
    assert not out.exists() and not (tmp_path / "out").exists()
    ok = materialize(spec, tokenizer, 2, 8, 0, False, out)
    assert ok.token_count == 16 and ok.documents_used == 3


def test_local_txt_and_json_documents(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond one\n  \nthird")
    (tmp_path / "b.json").write_text(json.dumps([{"t": "fourth"}, {"t": ""}]))
    write_set(tmp_path, "mix", {"kind": "local", "description": "d", "files": ["a.txt", "b.json"], "text_field": "t"})
    docs = preview_documents(load_calibration_set("mix", tmp_path), 0, 10)
    assert sorted(docs) == ["first paragraph", "fourth", "second one", "third"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"other": "x"}))
    write_set(tmp_path, "wrongfield", {"kind": "local", "description": "d", "files": ["c.jsonl"], "text_field": "t"})
    with pytest.raises(CalibrationError, match=r"record has no field 't' \(it has \['other'\]\)"):
        preview_documents(load_calibration_set("wrongfield", tmp_path), 0, 1)


def _chat_set(tmp_path: Path) -> GeneratedCalibrationSet:
    shutil.copytree(REPO_CALIB / "wordlists", tmp_path / "wordlists")
    body = {
        "kind": "generated",
        "description": "d",
        "generator": "english-v1",
        "wordlist": "wordlists/english-v1.yaml",
        "documents": 50,
        "dialogue_fraction": 1.0,
    }
    write_set(tmp_path, "chats", body)
    return load_calibration_set("chats", tmp_path)


def test_chat_template_path(tokenizer, tmp_path):
    spec = _chat_set(tmp_path)
    templated = materialize(spec, tokenizer, 4, 256, 0, True, tmp_path / "t.safetensors")
    plain = materialize(spec, tokenizer, 4, 256, 0, False, tmp_path / "p.safetensors")
    t_text = tokenizer.decode(load_materialized(templated.path).input_ids[0].tolist())
    p_text = tokenizer.decode(load_materialized(plain.path).input_ids[0].tolist())
    assert t_text.startswith("<|im_start|>user\n") and "<|im_end|>\n<|im_start|>assistant\n" in t_text
    assert p_text.startswith("User: ") and "\n\nAssistant: " in p_text and "<|im_start|>" not in p_text
    assert load_materialized(templated.path).info["use_chat_template"] is True


def test_chat_template_requirements(tokenizer, tmp_path):
    spec = _chat_set(tmp_path)
    with pytest.raises(CalibrationError, match="the tokenizer has no chat template. Fix: Turn use_chat_template off"):
        materialize(spec, make_tokenizer(chat_template=None), 2, 16, 0, True, tmp_path / "x.safetensors")
    cnn = load_calibration_set("cnn_dailymail", REPO_CALIB)
    with pytest.raises(CalibrationError, match="the set has plain text, not chats"):
        materialize(cnn, tokenizer, 2, 16, 0, True, tmp_path / "x.safetensors")
    with pytest.raises(CalibrationError, match="num_samples=0, seq_len=16"):
        materialize(spec, tokenizer, 0, 16, 0, False, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_hf_set_offline_fails_immediately(tokenizer, tmp_path):
    spec = load_calibration_set("ultrachat", REPO_CALIB)
    start = time.monotonic()
    with pytest.raises(SourceError) as err:
        materialize(spec, tokenizer, 2, 16, 0, True, tmp_path / "x.safetensors", hub_offline=True)
    assert time.monotonic() - start < 1
    assert str(err.value).startswith(
        "hf:HuggingFaceH4/ultrachat_200k@8049631c405ae6576f93f445c6b8166f76f5505a: the hub is disabled"
    )


def test_hf_set_unreachable_hub_fails_fast(tokenizer, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = load_calibration_set("cnn_dailymail", REPO_CALIB)
    start = time.monotonic()
    with pytest.raises(SourceError, match="not reachable within 2 s"):
        materialize(
            spec,
            tokenizer,
            2,
            16,
            0,
            False,
            tmp_path / "x.safetensors",
            hub_endpoint=f"http://127.0.0.1:{port}",
            hub_offline=False,
            hub_timeout_s=2.0,
        )
    assert time.monotonic() - start < 2


def test_load_materialized_refuses_foreign_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    with pytest.raises(StageInputError, match="calibration tensor file not found"):
        load_materialized(tmp_path / "none.safetensors")
    save_file({"input_ids": torch.zeros(2, 4, dtype=torch.int64)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(StageInputError, match="missing 'forge_calibration' metadata; not written by forge"):
        load_materialized(tmp_path / "f.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"garbage")
    with pytest.raises(StageInputError, match="not a readable safetensors file"):
        load_materialized(tmp_path / "g.safetensors")
