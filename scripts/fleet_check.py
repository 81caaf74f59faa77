"""CI check run after `make repro` (.ci/run, `make fleet-check`): the embedded default on Ray gives
the same outputs as the plain `dvc repro` that just ran here.

1. A fresh clone of HEAD in a temp dir, a local DVC remote beside it, a two-node local Ray cluster
   (one CPU each, on loopback); `forge fleet run` there.
2. Every stage's output digests in the clone's dvc.lock equal this checkout's dvc.lock (from `make repro`).
3. `dvc status` in the clone reports nothing changed; a second `forge fleet run` there is fully cached.
Wall times of both runs are printed for the closing note.

Usage: .venv/bin/python scripts/fleet_check.py [--cold-reference]
  --cold-reference: first run a plain `dvc repro` in another fresh clone (its own cache, timed) and
  compare against that instead of this checkout's dvc.lock (for measuring outside CI).
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


def fleet(clone: Path, address: str, remote: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run([str(BIN / "forge"), "fleet", "run", "--address", address, "--remote", str(remote),
                           "--link", ".venv-serve"], cwd=clone, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def fresh_clone(dest: Path, commit: str) -> Path:
    subprocess.run(["git", "clone", "-q", "--shared", str(ROOT), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", "--detach", commit], check=True)
    (dest / ".venv-serve").symlink_to(ROOT / ".venv-serve")  # make serve-env's venv, as make repro uses it
    return dest


def plain_repro(tmp: Path, commit: str) -> Path:
    clone = fresh_clone(tmp / "plain", commit)
    started = time.monotonic()
    done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=clone, capture_output=True, text=True,
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
    holder = tempfile.TemporaryDirectory(prefix="forge-fleet-ref-")
    reference_lock = plain_repro(Path(holder.name), commit) if "--cold-reference" in sys.argv else ROOT / "dvc.lock"
    reference = digests(reference_lock)
    os.environ["RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"] = "true"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": LOOPBACK})
    cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
    cluster.wait_for_nodes()
    failures = []
    try:
        with tempfile.TemporaryDirectory(prefix="forge-fleet-check-") as tmp:
            clone = fresh_clone(Path(tmp) / "clone", commit)
            code, out, first_s = fleet(clone, cluster.address, Path(tmp) / "remote")
            print(out)
            if code:
                failures.append(f"forge fleet run exited {code}")
            got = digests(clone / "dvc.lock")
            for name, outs in reference.items():
                if got.get(name) != outs:
                    failures.append(f"{name}: fleet {got.get(name)} != dvc repro {outs}")
            status = subprocess.run([str(BIN / "dvc"), "status"], cwd=clone, capture_output=True, text=True).stdout
            if "up to date" not in status:
                failures.append(f"dvc status in the fleet clone: {status.strip()[:400]}")
            code, out, second_s = fleet(clone, cluster.address, Path(tmp) / "remote")
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
