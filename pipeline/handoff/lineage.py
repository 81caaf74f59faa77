"""The lineage walk: from a bundle and its evaluation, every recorded input down to the download.

Each consumer records its upstream outputs by manifest digest (pipeline/handoff/manifest.py `inputs`), so the
chain recipe -> calibration set -> downloaded model is checked without rehashing the weights: every
manifest must be the one on disk now, typed by its handoff model (pipeline/handoff/models.py), and, for the
recipe-driven stages, made from the recipe's sections as they read now (`reader.recipe_mismatch`,
the same rule every stage reader applies). Publish refuses what does not chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import RegistryError
from pipeline.handoff.manifest import manifest_digest
from pipeline.handoff.models import InputRecord
from pipeline.handoff.reader import Opened, open_upstream, recipe_mismatch

RERUN = "re-run the pipeline so every stage sees the same upstream outputs (`dvc repro`), then publish again."
# Stages whose outputs a recipe drives (their manifests carry `recipe.id` and section digests), and
# the sections without which an output cannot be tied to the recipe at all.
RECIPE_STAGES = ("build", "evaluate", "calibrate", "calibration-set")
REQUIRED_SECTIONS = {"calibrate": ("model", "quant", "calibration"), "calibration-set": ("calibration",)}
# The chain the issue asks for: recipe -> calibration set -> downloaded model, under the bundle and its evaluation.
REQUIRED_LINKS = ("build", "evaluate", "calibrate", "calibration-set", "download")


@dataclass(frozen=True)
class Link:
    """One manifest of the lineage, as found on disk and matching what its consumer recorded."""

    stage: str
    subject: str | None
    path: str
    manifest_sha256: str


def check_lineage(recipe, name: str, bundle: Opened, evaluation: Opened) -> tuple[Link, ...]:
    """Walk every recorded input, digest by digest, from the bundle and the evaluation down to the
    downloaded model; returns the links, sorted along REQUIRED_LINKS."""
    where = f"lineage of {name}"
    bundle_calibrate = _input_of_stage(bundle, "calibrate", where)
    evaluated_calibrate = _input_of_stage(evaluation, "calibrate", where)
    if bundle_calibrate.manifest_sha256 != evaluated_calibrate.manifest_sha256:
        raise RegistryError(
            where,
            f"the bundle ({bundle.path}) was built from calibrate manifest {bundle_calibrate.manifest_sha256[:12]}… "
            f"but the evaluation ({evaluation.path}) scored calibrate manifest "
            f"{evaluated_calibrate.manifest_sha256[:12]}…: its accuracy figures are not this bundle's.", RERUN)
    found: dict[tuple[str, str], Link] = {}
    pending: list[Opened] = [bundle, evaluation]
    while pending:
        output = pending.pop(0)
        link = Link(output.envelope.stage, output.envelope.subject, str(output.path), output.digest)
        if (link.path, link.manifest_sha256) in found:
            continue
        found[(link.path, link.manifest_sha256)] = link
        check_recipe_record(recipe, link, output, where)
        for key, entry in sorted(output.envelope.inputs.items()):
            child = Path(entry.path)
            described = f"link {link.stage} {output.path} -> {key} ({entry.stage} {child})"
            current = _current_digest(child, described, where)
            if current != entry.manifest_sha256:
                raise RegistryError(
                    where, f"{described} is broken: it was made from manifest {entry.manifest_sha256[:12]}…, "
                           f"{child} now holds {current[:12]}….", RERUN)
            # The digest chain stands for the files: the child's manifest lists their digests.
            pending.append(open_upstream(child, entry.stage, verify=False))
    stages = {link.stage for link in found.values()}
    missing = [s for s in REQUIRED_LINKS if s not in stages]
    if missing:
        raise RegistryError(where, f"does not reach {', '.join(missing)}: the bundle cannot be traced back to the "
                                   "downloaded model and calibration set.", RERUN)
    return tuple(sorted(found.values(), key=lambda link: (REQUIRED_LINKS.index(link.stage)
                                                          if link.stage in REQUIRED_LINKS else len(REQUIRED_LINKS),
                                                          link.path)))


def check_recipe_record(recipe, link: Link, output: Opened, where: str) -> None:
    """A recipe-driven output was made for this recipe, from every section it records (and at least
    the REQUIRED_SECTIONS of its stage) as they read now."""
    if link.stage not in RECIPE_STAGES:
        return
    record = output.envelope.recipe
    recorded = tuple(sorted(record.sections)) if record else ()
    sections = (*REQUIRED_SECTIONS.get(link.stage, ()), *(s for s in recorded if s not in REQUIRED_SECTIONS.get(link.stage, ())))
    problem = recipe_mismatch(recipe, record.model_dump() if record else None, sections)
    if problem:
        raise RegistryError(where, f"{link.stage} output {link.path} {problem}.", RERUN)


def _input_of_stage(output: Opened, stage: str, where: str) -> InputRecord:
    entries = [e for e in output.envelope.inputs.values() if e.stage == stage]
    if len(entries) != 1:
        raise RegistryError(where, f"{output.path} records {len(entries)} {stage} inputs, expected exactly one.", RERUN)
    return entries[0]


def _current_digest(directory: Path, link: str, where: str) -> str:
    try:
        return manifest_digest(directory)
    except FileNotFoundError:
        raise RegistryError(where, f"{link} is broken: {directory} has no manifest any more.", RERUN) from None
