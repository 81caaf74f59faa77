"""Named calibration sets and their materialization into a fixed token tensor file.

A set is `calibration/<name>.yaml`, one of three kinds:
  hf         a Hub dataset at a pinned commit (text field or chat messages field)
  local      json / jsonl / txt files shipped beside the YAML
  generated  English prose and dialogues generated here from word lists and a seed (offline)

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
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.calibgen import Document, _load_wordlist, generate_document  # the english-v1 generator
from pipeline.deadline import DeadlineExceeded, call_within, transfer_deadline
from pipeline.errors import CalibrationError, RecipeError, StageInputError
from pipeline.manifest import sha256_file
from pipeline.sources import check_pinned_revision, hub_settings, probe_hub, repo_bytes

log = logging.getLogger(__name__)

MATERIALIZED_FORMAT = "forge-calibration-v1"
_META_KEY = "forge_calibration"

# --------------------------------------------------------------------------------------------
# Schemas


class _SetBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Set name = file stem; filled in by the loader.")
    source_file: Path = Field(description="The YAML it was loaded from; filled in by the loader.")
    description: str = Field(min_length=1, description="What the text is and why it suits calibration.")
    license: str | None = Field(default=None, description="License of the underlying text.")


class _FieldChoice(BaseModel):
    """Exactly one of text_field / messages_field names where a record's text lives."""

    text_field: str | None = Field(default=None, description="Record field holding plain text.")
    messages_field: str | None = Field(
        default=None, description="Record field holding a chat: a list of {role, content} messages."
    )

    @model_validator(mode="after")
    def _one_field(self):
        if (self.text_field is None) == (self.messages_field is None):
            raise ValueError("set exactly one of text_field or messages_field")
        return self


class HFCalibrationSet(_SetBase, _FieldChoice):
    """A dataset on the Hugging Face Hub at a pinned commit."""

    kind: Literal["hf"]
    dataset: str = Field(description="Hub dataset id, e.g. abisee/cnn_dailymail.")
    revision: str = Field(description="40-hex commit of the dataset repo; branches and tags move.")
    config: str | None = Field(default=None, description="Dataset config (subset) name, e.g. 3.0.0.")
    split: str = Field(description="Split to sample from, e.g. train.")

    @field_validator("revision")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{40}", value):
            raise ValueError(
                f"'{value}' is not a 40-hex commit; pin it (HfApi().dataset_info(id, revision='main').sha)"
            )
        return value


class LocalCalibrationSet(_SetBase, _FieldChoice):
    """Files shipped in the repo: .jsonl (one record per line), .json (a list of records) or .txt
    (documents separated by blank lines; the field settings do not apply to .txt)."""

    kind: Literal["local"]
    files: tuple[str, ...] = Field(min_length=1, description="Paths relative to the calibration folder.")

    @field_validator("files")
    @classmethod
    def _suffixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [f for f in value if Path(f).suffix not in (".json", ".jsonl", ".txt")]
        if bad:
            raise ValueError(f"unsupported file type {bad}; use .json, .jsonl or .txt")
        return value

    @model_validator(mode="before")
    @classmethod
    def _txt_needs_no_field(cls, data: Any) -> Any:
        # A txt-only set has no records, so the one-of-two-fields rule would be meaningless.
        txt_only = isinstance(data, dict) and all(str(f).endswith(".txt") for f in data.get("files") or ["x"])
        if txt_only and data.get("text_field") is None and data.get("messages_field") is None:
            data = {**data, "text_field": "text"}
        return data


class GeneratedCalibrationSet(_SetBase):
    """Text generated here, deterministically, from word lists: works with no network."""

    kind: Literal["generated"]
    generator: Literal["english-v1"] = Field(description="Generator version; a new one gets a new name.")
    wordlist: str = Field(description="Word list YAML, relative to the calibration folder.")
    documents: int = Field(ge=1, le=1_000_000, description="How many distinct documents the set holds.")
    corpus_seed: int = Field(default=0, description="Fixes the corpus; the materialize seed picks from it.")
    dialogue_fraction: float = Field(
        ge=0.0, le=1.0, description="Share of documents that are user/assistant chats instead of prose."
    )


CalibrationSetSpec = Annotated[
    HFCalibrationSet | LocalCalibrationSet | GeneratedCalibrationSet, Field(discriminator="kind")
]


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


# --------------------------------------------------------------------------------------------
# Loading specs


def list_calibration_sets(calib_dir: Path) -> list[str]:
    """Names of the sets in `calib_dir` (one per *.yaml file), sorted."""
    return sorted(p.stem for p in Path(calib_dir).glob("*.yaml"))


def load_calibration_set(name: str, calib_dir: Path) -> CalibrationSetSpec:
    """Load and validate `calib_dir/<name>.yaml`; local files and word lists must exist."""
    from pydantic import TypeAdapter

    calib_dir = Path(calib_dir)
    path = calib_dir / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_calibration_sets(calib_dir)) or "none"
        raise RecipeError(
            f"calibration set '{name}'",
            f"no such set in {calib_dir}; known sets: {known}.",
            f"Use one of those names, or add {path}.",
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), f"not valid YAML: {exc}", "Fix the YAML syntax.") from exc
    if not isinstance(data, dict):
        raise RecipeError(str(path), "must be a mapping with a `kind` key.", "See calibration/generated-en.yaml.")
    for reserved in ("name", "source_file"):
        if reserved in data:
            raise RecipeError(
                str(path), f"`{reserved}` is set from the file name, not in the file.", f"Remove `{reserved}`."
            )
    try:
        spec = TypeAdapter(CalibrationSetSpec).validate_python({**data, "name": name, "source_file": path})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())
        raise RecipeError(str(path), problems + ".", "Fix those fields (kinds: hf, local, generated).") from exc
    needed = (
        spec.files
        if isinstance(spec, LocalCalibrationSet)
        else (spec.wordlist,)
        if isinstance(spec, GeneratedCalibrationSet)
        else ()
    )
    missing = [f for f in needed if not (calib_dir / f).is_file()]
    if missing:
        raise RecipeError(
            str(path),
            f"files not found under {calib_dir}: {', '.join(missing)}.",
            "Fix the paths (relative to the calibration folder).",
        )
    return spec


# --------------------------------------------------------------------------------------------
# Documents of a set, in a seeded order (the generated kind's writer is pipeline/calibgen.py)


def _has_chats(spec: CalibrationSetSpec) -> bool:
    if isinstance(spec, GeneratedCalibrationSet):
        return spec.dialogue_fraction > 0
    return spec.messages_field is not None


def _seeded_order(count: int, seed: int) -> list[int]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def _record_document(record: Any, spec: HFCalibrationSet | LocalCalibrationSet, where: str) -> Document | None:
    field = spec.text_field or spec.messages_field
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CalibrationError(
            where,
            f"record has no field '{field}' (it has {keys}).",
            "Fix text_field / messages_field in the set's YAML.",
        )
    value = record[field]
    if spec.text_field is not None:
        return value if isinstance(value, str) and value.strip() else None
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise CalibrationError(
            where,
            f"field '{field}' is not a list of {{role, content}} messages.",
            "Point messages_field at a chat field, or use text_field.",
        )
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value] or None


def _local_documents(spec: LocalCalibrationSet, calib_dir: Path, seed: int) -> tuple[int, Iterator[Document]]:
    docs: list[Document] = []
    for rel in spec.files:
        path = calib_dir / rel
        where = str(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            docs.extend(block.strip() for block in re.split(r"\n\s*\n", text) if block.strip())
            continue
        try:
            records = (
                [json.loads(line) for line in text.splitlines() if line.strip()]
                if path.suffix == ".jsonl"
                else json.loads(text)
            )
        except json.JSONDecodeError as exc:
            raise CalibrationError(where, f"invalid JSON: {exc}.", "Fix the file.") from exc
        if not isinstance(records, list):
            raise CalibrationError(
                where, "a .json set file must hold a list of records.", "Wrap the records in [...], or use .jsonl."
            )
        docs.extend(d for d in (_record_document(r, spec, where) for r in records) if d is not None)
    return len(docs), (docs[i] for i in _seeded_order(len(docs), seed))


def _hf_documents(
    spec: HFCalibrationSet, seed: int, endpoint: str | None, offline: bool | None, timeout_s: float
) -> tuple[int, Iterator[Document]]:
    check_pinned_revision("dataset", spec.dataset, spec.revision)
    # Bounded probe first: load_dataset against a hanging endpoint retries for minutes.
    settings = hub_settings(endpoint, offline, timeout_s)
    info = probe_hub("dataset", spec.dataset, spec.revision, settings)
    import datasets

    where = f"hf:{spec.dataset}@{spec.revision}"
    # load_dataset's own timeouts are per request: the whole call gets a total deadline.
    deadline_s = transfer_deadline(repo_bytes(info), timeout_s)
    try:
        table = call_within(lambda: datasets.load_dataset(spec.dataset, name=spec.config, split=spec.split,
                                                          revision=spec.revision), deadline_s, settings.endpoint)
    except DeadlineExceeded as exc:
        raise CalibrationError(
            where,
            f"load_dataset from hub endpoint {settings.endpoint} did not finish within {deadline_s:,.0f} s.",
            "Check the network path to the hub (a proxy or mirror that stalls); retry.",
        ) from exc
    except Exception as exc:  # datasets raises many unrelated types (DatasetNotFoundError, ValueError, OSError)
        raise CalibrationError(
            where,
            f"load_dataset failed: {type(exc).__name__}: {exc}",
            "Check config and split names against the dataset card.",
        ) from exc

    def documents() -> Iterator[Document]:
        for index in _seeded_order(len(table), seed):
            doc = _record_document(table[index], spec, where)
            if doc is not None:
                yield doc

    return len(table), documents()



def _generated_documents(spec: GeneratedCalibrationSet, calib_dir: Path, seed: int) -> tuple[int, Iterator[Document]]:
    lists = _load_wordlist(calib_dir / spec.wordlist)
    order = _seeded_order(spec.documents, seed)
    return spec.documents, (generate_document(lists, spec.corpus_seed, i, spec.dialogue_fraction) for i in order)


# --------------------------------------------------------------------------------------------
# Materialize


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
        if not _has_chats(spec):
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

    available, documents = _documents(spec, seed, hub_endpoint, hub_offline, hub_timeout_s)

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


def _documents(
    spec: CalibrationSetSpec, seed: int, hub_endpoint: str | None, hub_offline: bool | None, hub_timeout_s: float
) -> tuple[int, Iterator[Document]]:
    """(documents available, the documents in seeded order) for any kind of set."""
    calib_dir = spec.source_file.parent
    if isinstance(spec, GeneratedCalibrationSet):
        return _generated_documents(spec, calib_dir, seed)
    if isinstance(spec, LocalCalibrationSet):
        return _local_documents(spec, calib_dir, seed)
    return _hf_documents(spec, seed, hub_endpoint, hub_offline, hub_timeout_s)


def preview_documents(spec: CalibrationSetSpec, seed: int, count: int) -> Sequence[Document]:
    """The first `count` documents materialize would use, for reviewing a set's text offline."""
    if isinstance(spec, HFCalibrationSet):
        raise CalibrationError(
            f"calibration set '{spec.name}'", "preview needs the hub for kind hf.", "Preview a local or generated set."
        )
    _, docs = _documents(spec, seed, None, True, 0.0)
    return [doc for _, doc in zip(range(count), docs)]
