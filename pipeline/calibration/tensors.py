"""Materializing a calibration set into a fixed token tensor file, and reading it back.

Materializing turns a set into `input_ids` [N, L] + `attention_mask` [N, L] (safetensors).
Layout choice: documents are taken in a seeded random order, each truncated to at most L
tokens, joined with the tokenizer's EOS token and cut into consecutive L-token rows. No row is
padded, so every position carries a real token and activation ranges (amax) are not diluted by
pad positions; truncating each document to L keeps at least N distinct documents in N rows.
The attention mask is therefore all ones; it is stored so consumers need no special case.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.calibration.documents import has_chats, set_documents
from pipeline.calibration.english import Document
from pipeline.calibration.sets import CalibrationSetSpec, GeneratedCalibrationSet
from pipeline.core.errors import CalibrationError, StageInputError
from pipeline.core.files import sha256_file

log = logging.getLogger(__name__)

MATERIALIZED_FORMAT = "forge-calibration-v1"
_META_KEY = "forge_calibration"


@dataclass(frozen=True)
class MaterializedSet:
    """A written calibration tensor file."""

    path: Path
    sha256: str
    num_samples: int
    seq_len: int
    token_count: int  # num_samples * seq_len; every position is a real token (no padding)
    documents_used: int


@dataclass(frozen=True)
class CalibrationTensors:
    """A materialized set read back: int64 tensors [N, L] and the metadata written with them."""

    input_ids: Any
    attention_mask: Any
    info: dict[str, Any]


def _plain_chat(messages: list[dict[str, str]]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _tokenize(doc: Document, tokenizer: Any, use_chat_template: bool) -> list[int]:
    if isinstance(doc, list) and use_chat_template:
        # The rendered template already carries the model's special tokens (BOS, turn markers).
        text = tokenizer.apply_chat_template(doc, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = _plain_chat(doc) if isinstance(doc, list) else doc
    return list(tokenizer(text)["input_ids"])


def materialize(
    spec: CalibrationSetSpec,
    tokenizer: Any,
    num_samples: int,
    seq_len: int,
    seed: int,
    use_chat_template: bool,
    out_path: Path,
    *,
    hub_endpoint: str | None = None,
    hub_offline: bool | None = None,
    hub_timeout_s: float = 10.0,
) -> MaterializedSet:
    """Write `num_samples` rows of `seq_len` tokens from `spec` to `out_path` (safetensors).

    Same spec, tokenizer, sizes and seed give a byte-identical file. Nothing is written when the
    set cannot fill the request. `hub_*` apply to kind hf only (None = huggingface_hub's config).
    """
    where = f"calibration set '{spec.name}'"
    if num_samples < 1 or seq_len < 2:
        raise CalibrationError(
            where,
            f"num_samples={num_samples}, seq_len={seq_len}; need >= 1 and >= 2.",
            "Fix the recipe's calibration sizes.",
        )
    if use_chat_template:
        if not has_chats(spec):
            raise CalibrationError(
                where,
                "use_chat_template is on but the set has plain text, not chats.",
                "Turn use_chat_template off, or use a chat set "
                "(messages_field, or a generated set with dialogue_fraction > 0).",
            )
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationError(
                where,
                "use_chat_template is on but the tokenizer has no chat template.",
                "Turn use_chat_template off for this model (base models usually have none).",
            )

    available, documents = set_documents(spec, seed, hub_endpoint, hub_offline, hub_timeout_s)

    eos = tokenizer.eos_token_id
    needed = num_samples * seq_len
    stream: list[int] = []
    used = 0
    for doc in documents:
        ids = _tokenize(doc, tokenizer, use_chat_template)
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids[: seq_len - 1] + [eos]  # the separator counts toward the document's cap
        ids = ids[:seq_len]
        stream.extend(ids)
        used += 1
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise CalibrationError(
            where,
            f"needs {num_samples} samples x {seq_len} tokens = {needed} tokens, but its {available} documents give "
            f"{len(stream)} tokens ({len(stream) // seq_len} samples; each document contributes at most {seq_len}).",
            f"Lower num_samples to {len(stream) // seq_len} or less, shorten seq_len, or use a larger set"
            + (" (raise `documents`)." if isinstance(spec, GeneratedCalibrationSet) else "."),
        )

    import torch
    from safetensors.torch import save_file

    input_ids = torch.tensor(stream[:needed], dtype=torch.int64).reshape(num_samples, seq_len)
    info = {
        "format": MATERIALIZED_FORMAT,
        "set": spec.name,
        "kind": spec.kind,
        "seed": seed,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "use_chat_template": use_chat_template,
        "documents_used": used,
        "vocab_size": len(tokenizer),
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    # One metadata key holding sorted JSON: the file's bytes (and sha256) then cannot depend on
    # map iteration order inside the safetensors writer.
    save_file(
        {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
        str(tmp),
        metadata={_META_KEY: json.dumps(info, sort_keys=True)},
    )
    tmp.replace(out_path)
    log.info("materialized %s: %d x %d tokens from %d documents -> %s", spec.name, num_samples, seq_len, used, out_path)
    return MaterializedSet(out_path, sha256_file(out_path), num_samples, seq_len, needed, used)


def load_materialized(path: Path) -> CalibrationTensors:
    """Read a file written by `materialize`; anything else is refused with the fix."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    fix = "Re-run the calibrate stage's data step (forge calibrate) to rewrite it."
    if not path.is_file():
        raise StageInputError(str(path), "calibration tensor file not found.", fix)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            names = set(handle.keys())
            tensors = {k: handle.get_tensor(k) for k in names & {"input_ids", "attention_mask"}}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StageInputError(str(path), f"not a readable safetensors file: {exc}.", fix) from exc
    try:
        info = json.loads(meta[_META_KEY])
    except (KeyError, ValueError) as exc:
        raise StageInputError(str(path), f"missing '{_META_KEY}' metadata; not written by forge.", fix) from exc
    if info.get("format") != MATERIALIZED_FORMAT or set(tensors) != {"input_ids", "attention_mask"}:
        raise StageInputError(
            str(path),
            f"format {info.get('format')!r} with tensors {sorted(names)}; "
            f"expected {MATERIALIZED_FORMAT} with input_ids and attention_mask.",
            fix,
        )
    shape = tuple(tensors["input_ids"].shape)
    if shape != (info["num_samples"], info["seq_len"]) or tuple(tensors["attention_mask"].shape) != shape:
        raise StageInputError(
            str(path),
            f"tensor shape {shape} disagrees with its metadata ({info['num_samples']}, {info['seq_len']}).",
            fix,
        )
    return CalibrationTensors(tensors["input_ids"], tensors["attention_mask"], info)
