"""`forge pull`: get the right published artifact onto a serving machine. pull verifies every file
against the registry manifest's sha256 before the destination appears (pipeline/registry/transfer.py), and
refuses an artifact this GPU cannot run (below its format's compute-capability floor; a TensorRT engine
built for another one) or built for another TensorRT-LLM version unless `--force`; one built for another
GPU is pulled with a caveat (its runtime options were sized for that GPU's memory). Pulling again into a
destination that holds the version, every file verified, is a no-op. `forge pull MODEL --gpu auto` picks
among a model's artifacts the way NVIDIA NIM picks a profile: the local SKU, then fewer bits per
weight, then the newest.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cliargs import add_verb, arg, included, run_with
from pipeline.core.errors import RegistryError
from pipeline.core.gpus import load_catalog
from pipeline.core.local_gpu import LocalGpu
from pipeline.registry.args import RegistryArgs
from pipeline.registry.artifacts import PullResult, validate_name
from pipeline.registry.backends import open_registry
from pipeline.registry.selection import (
    installed_version,
    profile_rows,
    resolve_gpu,
    select_for_gpu,
    why_compatible,
)
from pipeline.registry.waiting import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

PULL_EXAMPLE = """examples:
  forge pull smollm2-135m-instruct-fp8-h200 --dest /srv/models/smollm2      # newest version
  forge pull smollm2-135m-instruct-fp8-h200 --stage prod --dest /srv/models/smollm2
  forge pull smollm2-135m-instruct --gpu auto --dest /srv/models/smollm2    # best artifact for this GPU
  forge pull smollm2-135m-instruct --gpu h200 --dest out/                    # ... for a catalog GPU
  forge pull smollm2-135m-instruct-fp8-h200 --registry oci://registry.example.com/forge --dest out/
  forge pull smollm2-135m-instruct-fp8-h200 --registry https://models.example.com/forge --dest out/
registries: a directory or fsspec URL (s3://, gs://: extras forge-quant[s3], [gcs]); oci://HOST/NAMESPACE
(oci+http:// without TLS; credentials from the docker config or ORAS_USER/ORAS_PASS); plain+DIR (plain
layout); http(s):// (a plain layout served over HTTP, read only).
"""


@dataclass(frozen=True, kw_only=True)
class PullArgs:
    """`forge pull`'s arguments, declared once (pipeline/core/cliargs.py)."""

    target: str = arg(positional="target",
                      help="an artifact name, or with --gpu a model name to choose an artifact for")
    dest: Path = arg(required=True, help="a new (or empty) directory; one that holds this version already is "
                                         "verified and left as it is")
    version: str | None = arg(group="which", help="vX.Y.Z or X.Y.Z (default: the newest)")
    stage: str | None = arg(group="which", help="the version a stage label points at, e.g. prod")
    gpu: str | None = arg(help="'auto' (NVML) or a GPU catalog key: the GPU the artifact will run on. "
                               "Default: the local GPU when NVML finds one, else no compute-capability check")
    count: int | None = arg(help="GPUs of that kind available (default: as detected, or 1)")
    force: bool = arg(False, help="pull despite a GPU this artifact cannot run on, or another runtime version")
    where: RegistryArgs = included(RegistryArgs)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "pull", run_with(PullArgs, run_pull),
             help="download and verify an artifact (by name, or the best one for a GPU)",
             epilog=PULL_EXAMPLE)


def run_pull(args: PullArgs) -> int:
    validate_name(args.target, kind="artifact or model name")  # before anything else looks at it
    catalog = load_catalog(args.where.catalog)
    local_gpu = resolve_gpu(args.gpu, catalog, args.count)
    result = pull_main(args.target, args.dest, args.where.url, local_gpu, local_runtime_versions(),
                       version=args.version, stage=args.stage, select=args.gpu is not None, force=args.force,
                       progress=sys.stderr.isatty(), timeout_s=args.where.deadline_s)
    done = (f"already present, verified: {result.name} {result.version} in {result.dest}" if result.already_present
            else f"pulled {result.name} {result.version} into {result.dest}")
    print(f"{done}: {result.files} files, {result.total_bytes / 1e6:,.1f} MB, every file's sha256 verified against "
          "the registry manifest" + ("; nothing fetched" if result.already_present else "")
          + (f" (forced past: {'; '.join(result.overridden)})" if result.overridden else ""))
    for caveat in result.caveats:
        print(f"caveat: {caveat}")
    return 0


# ---------------------------------------------------------------------------- pull


def local_runtime_versions() -> dict[str, str | None]:
    """Runtimes a bundle is bound to, as installed here; None = not installed, so not compared."""
    return {"tensorrt_llm": installed_version("tensorrt-llm")}


def pull_main(target: str, dest: Path, registry_url: str, local_gpu: LocalGpu | None,
              runtime_versions: Mapping[str, str | None], *, version: str | None = None, stage: str | None = None,
              select: bool = False, force: bool = False, progress: bool = False,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> PullResult:
    registry = open_registry(registry_url, timeout_s)
    name, version = choose_artifact(registry, target, local_gpu, version, stage, select)
    return registry.pull(name, dest, version=version, stage=stage, force=force,
                         local_gpu=local_gpu, runtime_versions=runtime_versions, progress=progress)


def choose_artifact(registry, target: str, local_gpu: LocalGpu | None, version: str | None,
                    stage: str | None, select: bool) -> tuple[str, str | None]:
    """`target` names an artifact: pull it. Else, with `select` (a --gpu was given), it names a
    model: choose among its artifacts NIM-style (registry.select_for_gpu)."""
    validate_name(target, kind="artifact or model name")
    if target in registry.names():
        return target, version
    if not select:
        if registry.manifests(model=target):
            raise RegistryError(f"registry {registry.url}", f"{target!r} is a model, not an artifact.",
                                "pass --gpu auto (or --gpu <catalog key>) to choose one of its artifacts, or pull "
                                "an artifact by name (`forge list`).")
        registry.resolve(target)  # raises: no such artifact (lists those there are)
    if version is not None or stage is not None:  # chosen below, by GPU
        raise RegistryError(f"model {target}", "--version / --stage pick a version of one artifact; for a model "
                                               "the version is chosen by GPU.", "pull an artifact by name to pin one.")
    if local_gpu is None:
        raise RegistryError(f"model {target}", "no NVIDIA GPU detected; nothing to choose an artifact for.",
                            "pass --gpu <catalog key>.")
    candidates = registry.manifests(model=target)
    refused = [r for r in registry.refusals() if (r.get("metadata") or {}).get("model") == target]
    if not candidates and not refused:
        raise RegistryError(f"registry {registry.url}", f"has no artifact or model named {target!r} "
                                                        f"(artifacts: {', '.join(registry.names()) or 'none'}).",
                            "run `forge list` and pull one of those.")
    chosen = select_for_gpu(candidates, local_gpu)
    if chosen is None:
        reasons = "; ".join(f"{r.name}{' ' + r.version if r.version else ''}: {r.reason}"
                            for r in profile_rows(candidates, refused, local_gpu, model=target))
        raise RegistryError(f"model {target}", f"no artifact fits {local_gpu.name} "
                                               f"(compute capability {local_gpu.compute_capability}): {reasons}.",
                            "build one for this GPU (add a target to the recipe), or pull one by name with --force. "
                            f"`forge list --gpu {local_gpu.sku or '<key>'}` shows the same rows.")
    log.info("selected %s %s for %s: %s", chosen["name"], chosen["version"], local_gpu.name,
             why_compatible(chosen["metadata"], local_gpu))
    return chosen["name"], chosen["version"]
