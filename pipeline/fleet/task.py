"""One stage on one worker: a fresh clone at the driver's commit, inputs from the DVC remote,
`dvc repro --single-item`, outputs and run cache pushed back, the stage's dvc.lock entry returned.

Why each step (DVC 3.67 source):
- the upstream stages' dvc.lock entries, collected by the driver, go into the clone's dvc.lock so
  `dvc pull <upstream>` fetches exactly the outputs those tasks pushed;
- `cache: false` outputs are never pushed (dvc/output.py: only `use_cache` outputs are collected for
  push), so the driver hands them over as small tarballs through Ray's object store;
- `dvc repro --pull` first pulls the whole run cache (dvc/repo/reproduce.py), then
  `stage_cache.restore` checks out a stage whose command + deps were seen before ("Stage '%s' is
  cached - skipping run", dvc/stage/cache.py) - the same skip a plain `dvc repro` makes;
- `dvc push --run-cache` sends the outputs and the run-cache entry (dvc/repo/push.py). The entry
  also names the `cache: false` outputs, which StageCache.save committed to the local cache, but
  push sends only the workspace's cached outputs, so `push_uncached` sends those objects too;
  without them a rerun elsewhere cannot restore the stage (measured with DVC 3.67.1).
A killed worker leaves only its own clone behind; Ray's retry starts over in a new one.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# dvc/stage/cache.py logs this when the run cache supplies a stage's outputs without running it.
RUN_CACHE_HIT = "is cached - skipping run"
REMOTE_NAME = "forge-fleet"
WORKER_PID_ENV = "FORGE_FLEET_WORKER_PID"  # the Ray worker running the stage (tests kill it)
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class TaskSpec:
    stage: str
    repo: str  # a path or git URL every worker can clone
    commit: str
    remote: str  # the DVC remote URL every worker reaches
    upstream_locks: dict[str, Any]  # dvc.lock entries of the stages this one needs
    uncached: dict[str, bytes]  # upstream stage -> tarball of its `cache: false` outputs
    uncached_outs: tuple[str, ...] = ()  # this stage's `cache: false` outputs, returned as a tarball
    link_dirs: tuple[str, ...] = ()  # paths written outside DVC (a directory registry): linked to the driver's
    env_links: tuple[str, ...] = ()  # untracked environment the commands need (.venv-serve): linked to the driver's
    driver_root: str = ""
    workdir: str | None = None  # where clones go (default: the system temp dir)


@dataclass
class TaskResult:
    stage: str
    node: str
    started: float
    seconds: float
    cached: bool
    lock_entry: dict[str, Any]
    uncached: bytes
    log_tail: str = ""


class StageFailed(Exception):
    """The stage's command (or DVC around it) failed: deterministic, so Ray must not retry it."""

    def __init__(self, stage: str, step: str, tail: str):
        self.stage, self.step, self.tail = stage, step, tail
        super().__init__(f"{stage}: {step} failed:\n{tail}")

    def __reduce__(self):  # Ray pickles the exception back to the driver
        return StageFailed, (self.stage, self.step, self.tail)


def run_stage(spec: TaskSpec, node: str) -> TaskResult:
    default_sigchld()
    started = time.time()
    clone = Path(tempfile.mkdtemp(prefix="forge-fleet-", dir=spec.workdir))
    try:
        checkout(spec, clone)
        for path in spec.link_dirs:
            link_to_driver(clone, Path(spec.driver_root), path, create=True)
        for path in spec.env_links:
            link_to_driver(clone, Path(spec.driver_root), path, create=False)
        write_locks(clone / "dvc.lock", spec.upstream_locks, drop=spec.stage)
        if spec.upstream_locks:
            dvc(clone, spec.stage, "pull", "-r", REMOTE_NAME, *sorted(spec.upstream_locks))
        for blob in spec.uncached.values():
            unpack(blob, clone)
        log = dvc(clone, spec.stage, "repro", "--pull", "--single-item", spec.stage)
        dvc(clone, spec.stage, "push", "--run-cache", "-r", REMOTE_NAME, spec.stage)
        entry = read_lock(clone / "dvc.lock").get(spec.stage)
        if entry is None:
            raise StageFailed(spec.stage, "dvc repro", tail(log) + "\n(left no dvc.lock entry for the stage)")
        push_uncached(clone, entry, spec.uncached_outs)
        return TaskResult(stage=spec.stage, node=node, started=started, seconds=time.time() - started,
                          cached=RUN_CACHE_HIT in log, lock_entry=entry, uncached=pack(clone, spec.uncached_outs),
                          log_tail=tail(log))
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def push_uncached(clone: Path, entry: dict[str, Any], paths: tuple[str, ...]) -> None:
    """Push the objects of the stage's `cache: false` outputs, which its run-cache entry names."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo

    objs = [HashInfo("md5", out["md5"]) for out in entry.get("outs", []) if out["path"] in paths and "md5" in out]
    if objs:
        with Repo(str(clone)) as repo:
            failed = repo.cloud.push(objs, remote=REMOTE_NAME).failed
        if failed:
            raise StageFailed(entry.get("cmd", "?"), "push of cache: false outputs", f"{len(failed)} object(s) failed")


def default_sigchld() -> None:
    """Exit codes need SIGCHLD at its default. With the raylet subreaper on, Ray's core worker sets
    it to SIG_IGN (ray src/ray/core_worker/core_worker.cc, PR #42992). Children are then reaped by
    the kernel, waitpid fails with ECHILD, and Python's subprocess reports exit code 0, so a failed
    stage would look like a success. Children inherit the disposition, so DVC itself is affected too."""
    import signal

    # Unconditionally: Ray sets it from C++ after Python started, so signal.getsignal() still says SIG_DFL.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # Ray runs a task on the worker's main thread


def checkout(spec: TaskSpec, clone: Path) -> None:
    local = Path(spec.repo).is_dir()
    git(["clone", "--quiet", "--no-checkout", *(["--shared"] if local else []), spec.repo, str(clone)], spec.stage)
    git(["-C", str(clone), "checkout", "--quiet", "--detach", spec.commit], spec.stage)
    # The default remote: `dvc repro --pull` fetches the run cache from the default (StageCache.pull(None)).
    dvc(clone, spec.stage, "remote", "add", "--local", "--force", "--default", REMOTE_NAME, spec.remote)


def link_to_driver(clone: Path, driver_root: Path, path: str, create: bool) -> None:
    target = (driver_root / path).resolve()
    if create:
        target.mkdir(parents=True, exist_ok=True)
    elif not target.exists():
        raise StageFailed(str(clone), f"--link {path}", f"{driver_root / path} does not exist on this worker's machine")
    link = clone / path
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        shutil.rmtree(link) if link.is_dir() and not link.is_symlink() else link.unlink()
    link.symlink_to(target, target_is_directory=True)


def read_lock(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {})


def write_locks(path: Path, entries: dict[str, Any], drop: str | None = None) -> None:
    """Merge `entries` into the dvc.lock at `path` (DVC's lockfile schema 2.0), removing `drop`."""
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    data = data or {"schema": "2.0", "stages": {}}
    stages = data.setdefault("stages", {})
    stages.update(entries)
    stages.pop(drop, None)
    tmp = path.with_suffix(".lock.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def pack(root: Path, paths: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in paths:
            if (root / path).exists():
                tar.add(root / path, arcname=path)
    return buffer.getvalue()


def unpack(blob: bytes, root: Path) -> None:
    """Replace each packed output (a file or a whole directory) with the tarball's copy."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        names = [m.name for m in tar.getmembers()]
        for top in [n for n in names if not any(n.startswith(o + "/") for o in names if o != n)]:
            path = root / top
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        tar.extractall(root, filter="data")


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def stage_env(clone: Path) -> dict[str, str]:
    """The worker's environment, with this clone's `pipeline` package first on the import path
    (an editable install would otherwise run the driver checkout's code) and this Python's
    scripts (forge, dvc) on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(clone), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[WORKER_PID_ENV] = str(os.getpid())
    return env


def git(args: list[str], stage: str) -> None:
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    if done.returncode:
        raise StageFailed(stage, "git " + args[0] if args[0] != "-C" else "git " + args[2], tail(done.stderr))


def dvc(clone: Path, stage: str, *args: str) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=clone, env=stage_env(clone),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise StageFailed(stage, f"dvc {args[0]}", tail(done.stdout))
    return done.stdout
