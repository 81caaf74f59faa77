"""The one way a stage reads another stage's output: `open_upstream`, which checks, in this order,
  1. the manifest exists, has forge's schema and is of the expected stage kind;
  2. envelope and details match their models (pipeline/handoff/models.py; a wrong type names the
     file, the field and the fix);
  3. every file listed is on disk with its digest, nothing unlisted was added;
  4. when a recipe is given, the output was made for that recipe id (a missing id is refused) and
     from the named sections as they read now (a missing section digest is refused);
and returns an `Opened` whose `.details` is the typed model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pipeline.core.closed import Closed
from pipeline.core.errors import StageInputError
from pipeline.core.layout import MANIFEST_NAME
from pipeline.handoff.manifest import input_record, manifest_digest, read_manifest, verify_files
from pipeline.handoff.models import Envelope, InputRecord, check_details, check_envelope

D = TypeVar("D", bound=Closed)


@dataclass(frozen=True)
class Opened(Generic[D]):
    """A verified upstream output: its directory, typed envelope and details, and manifest digest."""

    path: Path
    envelope: Envelope
    details: D
    digest: str

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as a plain dict (for the lineage walk and records; not for reading fields)."""
        return self.envelope.model_dump(mode="json", by_alias=True)

    @property
    def recipe_id(self) -> str | None:
        return self.envelope.recipe.id if self.envelope.recipe else None

    def input_entry(self) -> dict[str, Any]:
        """How a consumer records this output among its `inputs`."""
        return input_record(self.path, self.envelope.stage, self.digest, self.envelope.subject)

    def input_of_stage(self, stage: str) -> InputRecord | None:
        found = [e for e in self.envelope.inputs.values() if e.stage == stage]
        return found[0] if len(found) == 1 else None


def open_upstream(directory: Path, kind: str, recipe: Any = None, sections: Iterable[str] = (), *,
                  verify: bool = True, rerun: str | None = None, any_recipe_id: bool = False) -> Opened[Any]:
    """Read, type-check and verify the `kind` output in `directory`; with `recipe`, also that it was
    made for that recipe from `sections` as they read now. `rerun` is the fix a mismatch names.
    `any_recipe_id`: the output may come from another recipe whose `sections` are the same (a
    calibration set serves every recipe with the same calibration section); the digests still count."""
    directory = Path(directory)
    where = str(directory / MANIFEST_NAME)
    raw = read_manifest(directory, kind)
    envelope = check_envelope(raw, where)
    details = check_details(kind, envelope.details, where)
    if verify:
        verify_files(directory, raw)
    opened = Opened(directory, envelope, details, manifest_digest(directory))
    if recipe is not None:
        problem = recipe_mismatch(recipe, raw.get("recipe"), tuple(sections), check_id=not any_recipe_id)
        if problem:
            raise StageInputError(str(directory), f"{problem}.",
                                  rerun or f"re-run it for this recipe: dvc repro {kind}@{recipe.id}")
    return opened


def recipe_mismatch(recipe: Any, record: dict[str, Any] | None, sections: tuple[str, ...],
                    check_id: bool = True) -> str | None:
    """Why `record` (a manifest's `recipe`) is not `recipe` with `sections` as they read now; None if it is.
    One rule for every reader and the lineage walk: a missing id or section digest does not pass."""
    record = record or {}
    made_for = record.get("id")
    if check_id and made_for != recipe.id:
        return (f"was made for recipe {made_for!r}, not {recipe.id!r}" if made_for
                else f"records no recipe id, so it cannot be tied to {recipe.id!r}")
    recorded = record.get("sections") or {}
    missing = [s for s in sections if s not in recorded]
    if missing:
        return f"records no digest of recipe section(s) {', '.join(missing)}, so it cannot be tied to {recipe.path}"
    for section in sections:
        try:
            current = recipe.section_digest(section)
        except KeyError:
            return f"was made from section {section!r}, which {recipe.path} no longer has"
        if recorded[section] != current:
            return (f"was made from another `{section}` section of {recipe.path} "
                    f"(digest {recorded[section][:12]}…, now {current[:12]}…)")
    return None
