"""A real local Ray cluster (two raylets on 127.0.0.1, one offering the fake custom resource
gpu-h200, the other gpu-b200) and a tiny synthetic DVC project in a temp git repo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.fleet.task import default_sigchld

ray = pytest.importorskip("ray", reason="the fleet extra is not installed: pip install -e '.[fleet]'")

LOOPBACK = "127.0.0.2"
DVC = str(Path(sys.executable).parent / "dvc")

DVC_YAML = """
stages:
  seed:
    cmd: python gen.py seed
    deps: [gen.py]
    outs: [data/seed.txt]
  square:
    foreach: [1, 2, 3]
    do:
      cmd: python gen.py square ${item}
      deps: [gen.py, data/seed.txt]
      outs: ["data/sq/${item}.txt"]
  survivor:
    cmd: python gen.py survivor
    deps: [gen.py, data/seed.txt]
    outs: [data/survivor.txt]
  total:
    cmd: python gen.py total
    deps: [gen.py, data/sq, data/survivor.txt]
    outs: [data/total.txt]
    metrics:
      - metrics/total.json:
          cache: false
  report:
    cmd: python gen.py report
    deps: [gen.py, data/total.txt, metrics/total.json]
    outs:
      - reports/report.txt:
          cache: false
"""

# `survivor` kills the Ray worker running it the first time (a node lost mid-stage), tracked by
# a marker outside the repository; FAIL_ON names a stage that fails deterministically.
GEN_PY = """
import json, os, pathlib, signal, sys, time
MARKER = pathlib.Path({marker!r})
FAIL_ON = {fail_on!r}
verb = sys.argv[1]
if verb == FAIL_ON:
    sys.exit("deterministic failure in " + verb)
time.sleep(1.0)  # long enough that independent stages overlap on two workers
pathlib.Path("data/sq").mkdir(parents=True, exist_ok=True)
if verb == "seed":
    pathlib.Path("data/seed.txt").write_text("7\\n")
elif verb == "square":
    n = int(sys.argv[2]) * int(pathlib.Path("data/seed.txt").read_text())
    pathlib.Path(f"data/sq/{{sys.argv[2]}}.txt").write_text(f"{{n * n}}\\n")
elif verb == "survivor":
    if MARKER.exists() is False and {kill!r}:
        MARKER.write_text("killed once")
        os.kill(int(os.environ["FORGE_FLEET_WORKER_PID"]), signal.SIGKILL)
        time.sleep(5)
        sys.exit("the worker should be gone")
    pathlib.Path("data/survivor.txt").write_text("alive\\n")
elif verb == "total":
    total = sum(int(p.read_text()) for p in sorted(pathlib.Path("data/sq").glob("*.txt")))
    pathlib.Path("data/total.txt").write_text(f"{{total}}\\n")
    pathlib.Path("metrics").mkdir(exist_ok=True)
    pathlib.Path("metrics/total.json").write_text(json.dumps({{"total": total}}))
elif verb == "report":
    pathlib.Path("reports").mkdir(exist_ok=True)
    pathlib.Path("reports/report.txt").write_text("total " + pathlib.Path("data/total.txt").read_text())
"""


def sh(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def make_project(root: Path, marker: Path, fail_on: str = "", kill: bool = False) -> Path:
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    (root / "gen.py").write_text(GEN_PY.format(marker=str(marker), fail_on=fail_on, kill=kill))
    sh(["git", "init", "-q", "-b", "main"], root)
    sh(["git", "config", "user.email", "t@example.com"], root)
    sh(["git", "config", "user.name", "t"], root)
    sh([DVC, "init", "-q"], root)
    sh([DVC, "config", "core.analytics", "false"], root)
    (root / ".gitignore").write_text("/data\n/metrics\n/reports\n")
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "tiny pipeline"], root)
    return root


@pytest.fixture(scope="session")
def cluster():
    from ray.cluster_utils import Cluster

    # Ray kills a dead worker's grandchildren (the stage's shell and command) only with this on
    # (docs.ray.io, "Lifetimes of a User-Spawn Process"); the raylets inherit it from here.
    before = os.environ.get("RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper")
    os.environ["RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"] = "true"
    # Loopback, but 127.0.0.2: ray.init rewrites "127.0.0.1"/"localhost" addresses to the host's
    # routable IP (ray/_private/services.py `resolve_ip_for_localhost`), where nothing listens.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"gpu-h200": 1},
                                                      "node_ip_address": LOOPBACK})
    c.b200_node_id = c.add_node(num_cpus=1, resources={"gpu-b200": 1}, node_ip_address=LOOPBACK).node_id
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()
    # Later tests in this pytest process run subprocesses whose exit codes they check.
    default_sigchld()
    if before is None:
        os.environ.pop("RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", None)
    else:
        os.environ["RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"] = before
