"""`forge promote`: point a stage label (prod, staging) at a version already in the registry.

Promotion is a registry operation, as GTO's `gto assign NAME --version v1.0.0 --stage prod` is on git
tags (iterative/gto): it needs the registry and nothing else (no checkout, recipe or bundle; nothing
is re-published), and whatever pulls "the prod one" (`forge pull NAME --stage prod`) gets the promoted
version next time. Each registry kind records it its own way (the same `assign_stage` publish --stage
uses): the directory registry appends a stage event (the newest wins, earlier ones stay as history),
an OCI registry moves the stage tag onto the version's manifest, the plain layout rewrites its index;
a plain layout over http(s):// is read only, so there promotion is refused. `--tag` also writes GTO's
stage tag `NAME#STAGE#N` (pipeline/registry/tags.py) in the git repository here, on the commit of
`NAME@vX.Y.Z`, so `gto show` and `dvc artifacts get` see the same promotion.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cliargs import add_verb, arg, included, run_with
from pipeline.core.errors import RegistryError
from pipeline.registry.args import RegistryLocation
from pipeline.registry.artifacts import validate_name
from pipeline.registry.backends import open_registry
from pipeline.registry.tags import tag_stage
from pipeline.registry.waiting import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

PROMOTE_EXAMPLE = """examples:
  forge promote smollm2-135m-instruct-fp8-h200 --version v1.0.0 --to prod
  forge promote smollm2-135m-instruct-fp8-h200 --from staging --to prod    # what staging has, to prod
  forge promote smollm2-135m-instruct-fp8-h200 --version 1.0.1 --to prod --registry oci://registry.example.com/forge
then deployments pull it by stage: forge pull smollm2-135m-instruct-fp8-h200 --stage prod --dest /models
"""


@dataclass(frozen=True, kw_only=True)
class PromoteArgs:
    """`forge promote`'s arguments, declared once (pipeline/core/cliargs.py)."""

    name: str = arg(positional="name", help="an artifact name (`forge list` shows them)")
    version: str | None = arg(group="which", help="the version to promote: vX.Y.Z or X.Y.Z")
    from_stage: str | None = arg(group="which", flag="from", metavar="STAGE",
                                 help="promote the version this stage points at, e.g. staging")
    to: str = arg(required=True, metavar="STAGE", help="the stage label to point at it, e.g. prod")
    tag: bool = arg(False, help="also create GTO's stage tag NAME#STAGE#N in the git repository here")
    where: RegistryLocation = included(RegistryLocation)


@dataclass(frozen=True)
class Promotion:
    name: str
    stage: str
    version: str
    previous: str | None  # the version the stage pointed at before; None: a new stage
    tag: str | None = None  # the GTO tag created, with --tag

    @property
    def moved(self) -> bool:
        return self.previous != self.version


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "promote", run_with(PromoteArgs, run_promote),
             help="point a stage label (prod) at a published version, in the registry itself",
             epilog=PROMOTE_EXAMPLE)


def run_promote(args: PromoteArgs) -> int:
    done = promote_main(args.name, args.to, args.where.url, version=args.version, from_stage=args.from_stage,
                        timeout_s=args.where.deadline_s, tag_repo=Path.cwd() if args.tag else None)
    if not done.moved:
        print(f"{done.name}: {done.stage} already points at {done.version}; nothing changed")
        return 0
    was = f"it pointed at {done.previous}" if done.previous else "a new stage"
    print(f"promoted {done.name} {done.version} to {done.stage} ({was}) in {args.where.url}; "
          f"`forge pull {done.name} --stage {done.stage}` gets {done.version}")
    if done.tag:
        print(f"git tag {done.tag} created (push it with `git push origin {done.tag}`)")
    return 0


def promote_main(name: str, stage: str, registry_url: str, *, version: str | None = None,
                 from_stage: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 tag_repo: Path | None = None) -> Promotion:
    """Point `stage` of artifact `name` at `version` (or at the version `from_stage` points at)."""
    validate_name(name)
    validate_name(stage, kind="stage name")
    if (version is None) == (from_stage is None):
        raise RegistryError(f"forge promote {name}", "needs the version to promote: --version vX.Y.Z, or --from "
                                                     "STAGE for the version a stage points at (one of them).",
                            f"e.g. forge promote {name} --version v1.0.0 --to {stage}.")
    registry = open_registry(registry_url, timeout_s)
    resolved = registry.resolve(name, version=version, stage=from_stage)
    previous = registry.stages(name).get(stage)
    if previous == resolved:
        return Promotion(name, stage, resolved, previous)
    registry.assign_stage(name, resolved, stage)
    log.info("%s: %s -> %s (was %s)", name, stage, resolved, previous or "unassigned")
    tag = None
    if tag_repo is not None:
        tag = tag_stage(tag_repo, name, stage, f"forge promote {name} {resolved} -> {stage}", version=resolved).tag
    return Promotion(name, stage, resolved, previous, tag)
