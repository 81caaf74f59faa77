"""Named calibration sets: the schema of `calibration/<name>.yaml` and its loading.

A set is one of three kinds:
  hf         a Hub dataset at a pinned commit (text field or chat messages field)
  local      json / jsonl / txt files shipped beside the YAML
  generated  English prose and dialogues generated here from word lists and a seed (offline)

Its documents, in a seeded order, are pipeline/calibration/documents.py; the token tensor file
they become is pipeline/calibration/tensors.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import RecipeError
from pipeline.core.yamlio import YamlSyntaxError, load_yaml_file

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
        data = load_yaml_file(path)
    except YamlSyntaxError as exc:
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
