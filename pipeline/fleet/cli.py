"""`forge fleet run`: the argv/env/disk side of the fleet (pipeline/fleet/driver.py does the work)."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cliargs import add_verb, arg, run_with
from pipeline.core.errors import ForgeError
from pipeline.core.gpus import DEFAULT_CATALOG
from pipeline.fleet.task import default_sigchld

INSTALL_HINT = "pip install 'forge-quant[fleet]'  (Ray; in this checkout: .venv/bin/python -m pip install -e '.[fleet]')"

EXAMPLES = """examples:
  forge fleet run --address ray://head:10001 --remote s3://bucket/forge-dvc
  forge fleet run --address 127.0.0.1:6379 --remote /shared/dvc-remote --targets 'publish@*-h200'
  forge fleet run --remote /tmp/remote --resources 'calibrate@*={"gpu-h200": 1}'   # override a stage's resources
Each stage runs as a Ray task in its own clone of this repository at HEAD; outputs travel through the
DVC remote, which every worker must reach. The driver writes dvc.lock and (unless --no-pull) pulls
the outputs here, so `dvc status` afterwards reports everything up to date.
"""


@dataclass(frozen=True, kw_only=True)
class FleetRunArgs:
    """`forge fleet run`'s arguments, declared once (pipeline/core/cliargs.py)."""

    address: str | None = arg(help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")
    targets: tuple[str, ...] | None = arg(
        metavar="PATTERN",
        help="stage name or fnmatch pattern (repeatable); their upstream stages run too (default: all)")
    remote: str = arg(required=True, help="DVC remote URL every worker reaches (s3://..., a shared directory)")
    repo: str | None = arg(help="git URL or path workers clone (default: this repository's directory, "
                                "which only workers on this machine or a shared filesystem can reach)")
    resources: tuple[str, ...] = arg((), metavar="PATTERN=JSON",
                                     help='override the Ray resources of matching stages, e.g. \'build@*={"gpu-h200": 1}\'')
    link: tuple[str, ...] = arg((), metavar="PATH",
                                help="an untracked path of this checkout every clone links to, e.g. .venv-serve (the "
                                     "vLLM serving venv); only for workers that share this filesystem")
    max_retries: int = arg(3, help="retries of a task whose worker died (default: 3)")
    node_wait: float = arg(0.0, metavar="SECONDS",
                           help="how long to wait for a node that offers a missing GPU kind (autoscaling; default: 0)")
    workdir: str | None = arg(help="where workers put their clones (default: the system temp dir)")
    no_pull: bool = arg(False, help="leave the outputs on the remote (dvc.lock still written)")
    catalog: Path = arg(DEFAULT_CATALOG, help="GPU catalog (default: %(default)s)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet", help="run the pipeline's stages as Ray tasks on a cluster (extra: [fleet])",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="fleet_verb", metavar="VERB")
    add_verb(verbs, "run", run_with(FleetRunArgs, cmd_fleet_run),
             help="expand plan.yaml + dvc.yaml and run every stage on Ray", epilog=EXAMPLES)
    p.set_defaults(func=lambda args: need_ray() and p.print_help())


def need_ray():
    try:
        import ray
    except ImportError as exc:
        raise ForgeError("forge fleet", "Ray is not installed.", f"install the fleet extra: {INSTALL_HINT}.") from exc
    return ray


def cmd_fleet_run(args: FleetRunArgs) -> int:
    ray = need_ray()
    from pipeline.fleet import driver
    from pipeline.fleet.dag import expand
    from pipeline.fleet.task import REMOTE_NAME

    root = Path.cwd()
    stages = expand(root, list(args.targets) if args.targets else None)
    resources = resources_for(root, stages, args.catalog, list(args.resources))
    for path in args.link:
        if not (root / path).exists():
            raise ForgeError("--link", f"{root / path} does not exist.", "build it first (make serve-env) or drop --link.")
    commit = clean_head(root)
    fleet = driver.FleetRun(root=root, stages=stages, resources=resources, repo=args.repo or str(root), commit=commit,
                            remote=remote_url(args.remote), link_dirs=driver_dirs(stages), env_links=tuple(args.link), max_retries=args.max_retries,
                            node_wait_s=args.node_wait, workdir=args.workdir)
    ray.init(address=args.address, log_to_driver=False, logging_level="WARNING")
    # The driver is a Ray core worker too: with the raylet subreaper on it ignores SIGCHLD, and the
    # `dvc pull` below (and anything the calling process runs later) would read every exit code as 0.
    default_sigchld()
    started = time.monotonic()
    try:
        outcomes = driver.run(fleet, echo=lambda line: print(line, flush=True))
    finally:
        ray.shutdown()
        default_sigchld()
    if not args.no_pull:
        done = [o.stage for o in outcomes if o.status in ("ran", "cached")]
        if done:
            _dvc(root, "remote", "add", "--local", "--force", REMOTE_NAME, fleet.remote)
            _dvc(root, "pull", "-r", REMOTE_NAME, *done)
    print(driver.summary(outcomes, time.monotonic() - started))
    return 0 if all(o.status in ("ran", "cached") for o in outcomes) else 1


def clean_head(root: Path) -> str:
    """HEAD's commit; refuse when tracked files differ from it (workers would not see the edits)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode:
        raise ForgeError(str(root), "not a git repository with a commit.", "run forge fleet from the repository root.")
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                            text=True).stdout.splitlines()
    # What `dvc repro` itself rewrites in a checkout: dvc.lock and the git-tracked metrics files (dvc.yaml's
    # `cache: false` outputs under metrics/), committed together after a run; workers need neither.
    dirty = [line[3:] for line in status if line[3:] != "dvc.lock" and not line[3:].startswith("metrics/")]
    if dirty:
        raise ForgeError(str(root), f"uncommitted changes to {', '.join(dirty[:5])}: workers run the commit "
                         f"{head.stdout.strip()[:12]}, not these edits.", "commit (or stash) them first.")
    return head.stdout.strip()


def remote_url(remote: str) -> str:
    """A local remote as an absolute path: workers run in their own clones, not in this directory."""
    return remote if "://" in remote else str(Path(remote).resolve())


def resources_for(root: Path, stages, catalog_path, overrides: list[str]):
    import fnmatch

    import yaml

    from pipeline.core.gpus import load_catalog
    from pipeline.fleet.resources import Resources, stage_resources

    plan_file = root / "plan.yaml"
    plan = yaml.safe_load(plan_file.read_text()) or {} if plan_file.exists() else {}
    catalog = load_catalog(catalog_path)
    result = {s.name: stage_resources(s, plan, catalog, root) for s in stages}
    for text in overrides:
        pattern, sep, spec = text.partition("=")
        try:
            custom = json.loads(spec) if sep else None
        except json.JSONDecodeError as exc:
            custom = exc
        if not isinstance(custom, dict) or not all(isinstance(v, (int, float)) for v in custom.values()):
            raise ForgeError("--resources", f"{text!r} is not PATTERN=JSON object of numbers.",
                             'write it like \'build@*={"gpu-h200": 1}\'.')
        gpus = int(custom.pop("GPU", 0))
        for name in result:
            if fnmatch.fnmatchcase(name, pattern):
                result[name] = Resources(num_gpus=gpus, custom=custom, why=f"--resources {pattern}")
    return result


def driver_dirs(stages) -> dict[str, tuple[str, ...]]:
    """Stages that write outside their DVC outputs into a directory of the repository (`forge publish`
    to a directory registry): they run on the driver's node with that directory linked to the driver's."""
    from pipeline.fleet.resources import forge_verb

    pinned = {}
    for stage in stages:
        verb, args = forge_verb(stage.cmd)
        if verb == "publish" and "--registry" in args:
            registry = args[args.index("--registry") + 1]
            if "://" not in registry and not registry.startswith("plain+") and not Path(registry).is_absolute():
                pinned[stage.name] = (registry,)
    return pinned


def _dvc(root: Path, *args: str) -> None:
    import sys

    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise ForgeError(f"dvc {args[0]}", (done.stderr or done.stdout).strip().splitlines()[-1],
                         "check that this machine reaches the DVC remote.")
