"""The documents of a calibration set, in a seeded order, for any kind of set (the generated kind's
writer is pipeline/calibration/english.py)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.calibration.english import Document, generate_document, load_wordlist  # the english-v1 generator
from pipeline.calibration.sets import CalibrationSetSpec, GeneratedCalibrationSet, HFCalibrationSet, LocalCalibrationSet
from pipeline.core.deadline import DeadlineExceeded, call_within, transfer_deadline
from pipeline.core.errors import CalibrationError
from pipeline.sources.hub import check_pinned_revision, hub_settings, probe_hub, repo_bytes


def has_chats(spec: CalibrationSetSpec) -> bool:
    """Whether the set's documents include chats (what a chat template can render)."""
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
    # datasets reads HF_ENDPOINT once, when it is imported (datasets/config.py), and load_dataset
    # takes no endpoint: one given here that differs would be probed while the data came from
    # another host, the Hub itself for an in-house mirror's users. Refused before any download.
    loads_from = datasets.config.HF_ENDPOINT.rstrip("/")
    if loads_from != settings.endpoint:
        raise CalibrationError(
            where,
            f"the hub endpoint is {settings.endpoint}, but datasets {datasets.__version__} loads from {loads_from} "
            "(HF_ENDPOINT as it was when datasets was imported).",
            f"Set HF_ENDPOINT={settings.endpoint} in the environment before forge starts (README: In-house mirrors).",
        )
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
    lists = load_wordlist(calib_dir / spec.wordlist)
    order = _seeded_order(spec.documents, seed)
    return spec.documents, (generate_document(lists, spec.corpus_seed, i, spec.dialogue_fraction) for i in order)


def set_documents(
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
    _, docs = set_documents(spec, seed, None, True, 0.0)
    return [doc for _, doc in zip(range(count), docs)]
