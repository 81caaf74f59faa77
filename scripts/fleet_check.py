"""CI check run after `make repro` (.ci/run, `make fleet-check`): the embedded default on Ray gives
the same outputs as the plain `dvc repro` that just ran here.

1. A fresh clone of HEAD in a temp dir, a local DVC remote beside it, a two-node local Ray cluster
   (one CPU each, on loopback); `forge fleet run` there.
2. Every file of every stage output in the clone is byte-identical (sha256) to this checkout's (from
   `make repro`), manifests and metrics files included (no stage writes a wall-clock byte into its
   output: pipeline/handoff/manifest.py, kpis.py), and so are the outputs' dvc.lock digests: the run
   in the clone would leave this checkout's dvc.lock unchanged.
3. `dvc status` in the clone reports nothing changed; a second `forge fleet run` there is fully cached.
Wall times of both runs are printed for the closing note.

Usage: .venv/bin/python scripts/fleet_check.py [--cold-reference] [--targets PATTERN]
  --cold-reference: first run a plain `dvc repro` in another fresh clone (its own cache, timed) and
  compare against that instead of this checkout's dvc.lock (for measuring outside CI).
  --targets PATTERN: only those stages and what they need (`dvc repro --glob`, `forge fleet run --targets`).
Exit code 0 when everything holds, 1 otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.2"  # not 127.0.0.1: ray.init rewrites that to the host's IP (services.resolve_ip_for_localhost)


def digests(lock: Path) -> dict[str, dict[str, str]]:
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {name: {o["path"]: o.get("md5", "") for o in entry.get("outs", [])} for name, entry in stages.items()}


def out_files(root: Path, out: str) -> dict[str, str]:
    """{relpath: sha256} of every file of one DVC output, its manifest.json included."""
    from pipeline.core.files import file_digests, sha256_file

    path = root / out
    if path.is_file():
        return {out: sha256_file(path)}
    if not path.is_dir():
        return {}
    return {f"{out}/{rel}": d["sha256"] for rel, d in file_digests(path, exclude=()).items()}


def compare(reference_root: Path, clone: Path, stages: dict[str, dict[str, str]]) -> list[str]:
    failures = []
    for name, outs in stages.items():
        for out in outs:
            want, got = out_files(reference_root, out), out_files(clone, out)
            if not want:
                failures.append(f"{name}: {out} missing in the reference")
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            if diff:
                failures.append(f"{name}: {len(diff)} file(s) differ: {', '.join(diff[:4])}")
    return failures


def fleet(clone: Path, address: str, remote: Path, targets: list[str]) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run([str(BIN / "forge"), "fleet", "run", "--address", address, "--remote", str(remote),
                           "--link", ".venv-serve", *[a for t in targets for a in ("--targets", t)]], cwd=clone, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def fresh_clone(dest: Path, commit: str) -> Path:
    subprocess.run(["git", "clone", "-q", "--shared", str(ROOT), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", "--detach", commit], check=True)
    (dest / ".venv-serve").symlink_to(ROOT / ".venv-serve")  # make serve-env's venv, as make repro uses it
    return dest


def plain_repro(tmp: Path, commit: str, targets: list[str]) -> Path:
    clone = fresh_clone(tmp / "plain", commit)
    started = time.monotonic()
    done = subprocess.run([str(BIN / "dvc"), "repro", *(["--glob", *targets] if targets else [])], cwd=clone, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    print(f"fleet-check: plain dvc repro (fresh clone, cold cache) exited {done.returncode} in "
          f"{time.monotonic() - started:.0f} s")
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:])
    return clone / "dvc.lock"


def main() -> int:
    from ray.cluster_utils import Cluster

    if not (ROOT / ".venv-serve" / ".serve-installed").exists():
        print(f"fleet-check: {ROOT / '.venv-serve'} is missing; run `make serve-env` first (make repro used it).")
        return 1
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    targets = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--targets"]
    holder = tempfile.TemporaryDirectory(prefix="forge-fleet-ref-")
    cold = "--cold-reference" in sys.argv
    reference_lock = plain_repro(Path(holder.name), commit, targets) if cold else ROOT / "dvc.lock"
    from pipeline.fleet.dag import expand

    wanted = {s.name for s in expand(ROOT, targets or None)}
    reference = {name: outs for name, outs in digests(reference_lock).items() if name in wanted}
    reference_root = reference_lock.parent
    os.environ["RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"] = "true"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": LOOPBACK})
    cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
    cluster.wait_for_nodes()
    failures = []
    try:
        with tempfile.TemporaryDirectory(prefix="forge-fleet-check-") as tmp:
            clone = fresh_clone(Path(tmp) / "clone", commit)
            code, out, first_s = fleet(clone, cluster.address, Path(tmp) / "remote", targets)
            print(out)
            if code:
                failures.append(f"forge fleet run exited {code}")
            got = digests(clone / "dvc.lock")
            differ = sorted(name for name, outs in reference.items() if got.get(name) != outs)
            print(f"fleet-check: dvc.lock output digests equal for {len(reference) - len(differ)} of {len(reference)} stages")
            failures += [f"{name}: dvc.lock output digests differ: {reference[name]} here, {got.get(name)} in the clone"
                         for name in differ]
            failures += compare(reference_root, clone, reference)
            # Only what the fleet ran: the targets and their upstream stages (`dvc status` on its own
            # checks the whole pipeline, and stages outside --targets never ran in this clone).
            status = subprocess.run([str(BIN / "dvc"), "status", "--with-deps", *sorted(wanted)], cwd=clone,
                                    capture_output=True, text=True).stdout
            if "up to date" not in status:
                failures.append(f"dvc status in the fleet clone: {status.strip()[:400]}")
            code, out, second_s = fleet(clone, cluster.address, Path(tmp) / "remote", targets)
            print(out)
            if code or " 0 ran," not in out:
                failures.append("the second fleet run was not fully cached")
            print(f"fleet-check: first run {first_s:.0f} s, rerun {second_s:.0f} s, {len(reference)} stages compared")
    finally:
        cluster.shutdown()
        holder.cleanup()
    for failure in failures:
        print(f"FAIL {failure}")
    print("fleet-check: ok" if not failures else f"fleet-check: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
