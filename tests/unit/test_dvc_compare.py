"""Issue 26 item 12, with the real DVC (dvc 3.67.1 of .venv) in a scratch git repository holding this
checkout's dvc.yaml, plan.yaml, .gitignore and recipes, and two commits of metrics as the stages write
them (pipeline/handoff/kpis.py write_kpis): a `make frontier` run (every variant), then a `make repro`
run that changed the embedded default's numbers:
- metrics/ is tracked by git (metrics/run/, each run's timings, is not), so `dvc metrics diff` and
  `dvc exp show` compare two commits, and `dvc metrics show` on a checkout has every variant's row
  from the commit (before, metrics/ was git-ignored: 18 empty frontier rows and a warning);
- `make compare`'s `dvc exp show` keeps the deciding KPIs: a few dozen columns for every variant,
  where a plain `dvc exp show` prints hundreds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.handoff.kpis import deciding_columns, write_kpis, write_timings

ROOT = Path(__file__).resolve().parents[2]


def _run(repo: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(list(argv), cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    return done


def _write_run(repo: Path, plan: dict, recovery: float, tok_s: float, frontier: bool) -> None:
    """The KPI files `make repro` (`frontier`: `make frontier`) writes, and the timings."""
    for key, target in plan["targets"].items():
        if target["frontier"] and not frontier:
            continue
        recipe = target["recipe_id"]
        write_kpis(repo / f"metrics/calibrate/{recipe}.json", "calibrate",
                   {"perplexity_delta_pct": 3.1, "checkpoint_bytes": 1000, "effective_bits": 8.25})
        write_kpis(repo / f"metrics/evaluate/{recipe}.json", "evaluate",
                   {"gate_passed": True, "min_recovery": recovery, "min_recovery_lower": recovery - 0.02,
                    "gates_failed": 0})
        write_kpis(repo / f"metrics/serve/{key}.json", "evaluate",
                   {"gate_passed": True, "min_recovery": 0.97, "gates_failed": 0, "served": True})
        write_kpis(repo / f"metrics/build/{key}.json", "build",
                   {"predicted_weights_bytes_per_gpu": 10, "predicted_kv_capacity_tokens": 20})
        write_kpis(repo / f"metrics/throughput/{key}.json", "throughput",
                   {"predicted_output_tok_s": tok_s, "predicted_decode_tok_s_max_batch": 2 * tok_s,
                    "predicted_usd_per_mtok": 0.3})
        write_timings(repo / f"metrics/run/calibrate/{recipe}.json", {"calibrate": 41.5})


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvc-compare")
    for name in ("dvc.yaml", "plan.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "recipes", repo / "recipes")
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    plan = yaml.safe_load((ROOT / "plan.yaml").read_text())
    _run(repo, "git", "init", "-q")
    for recovery, tok_s, frontier in ((0.98, 1000.0, True), (0.96, 1100.0, False)):
        _write_run(repo, plan, recovery, tok_s, frontier)
        _run(repo, "git", "add", "-A")
        _run(repo, "git", "commit", "-qm", f"a run: recovery {recovery}")
    return repo, plan


def test_metrics_are_tracked_by_git_and_timings_are_not(repo):
    root, _ = repo
    tracked = _run(root, "git", "ls-files", "metrics").stdout.split()
    assert tracked and all(not path.startswith("metrics/run/") for path in tracked)
    assert (root / "metrics/run/calibrate").is_dir()  # written, but git-ignored (/metrics/run/)


def test_dvc_metrics_show_has_every_committed_row_without_a_warning(repo):
    root, plan = repo
    done = _run(root, sys.executable, "-m", "dvc", "metrics", "show")
    assert "failed to load" not in done.stdout + done.stderr
    shown = json.loads(_run(root, sys.executable, "-m", "dvc", "metrics", "show", "--json").stdout)[""]["data"]
    assert all("error" not in entry and entry["data"] for entry in shown.values())
    targets = {k for k, t in plan["targets"].items()}
    assert {p for p in shown if p.startswith("metrics/throughput/")} == {f"metrics/throughput/{k}.json" for k in targets}
    assert len([p for p in shown if p.startswith("metrics/run/")]) == len(plan["recipes"])  # timings, not in git


def test_a_checkout_without_frontier_metrics_shows_what_it_has(repo, tmp_path):
    """Before the first committed `make frontier` run, `dvc metrics show metrics` lists only what exists."""
    root, plan = repo
    for key, target in plan["targets"].items():
        if target["frontier"]:
            (root / f"metrics/throughput/{key}.json").rename(tmp_path / f"{key}.json")
    try:
        done = _run(root, sys.executable, "-m", "dvc", "metrics", "show", "metrics", "--json")
    finally:
        for key, target in plan["targets"].items():
            if target["frontier"]:
                (tmp_path / f"{key}.json").rename(root / f"metrics/throughput/{key}.json")
    shown = json.loads(done.stdout)[""]["data"]
    assert all("error" not in entry for entry in shown.values())
    assert {p for p in shown if p.startswith("metrics/throughput/")} == {
        f"metrics/throughput/{k}.json" for k, t in plan["targets"].items() if not t["frontier"]}


def test_two_commits_compare_in_a_few_columns(repo):
    root, plan = repo
    plain = _run(root, sys.executable, "-m", "dvc", "exp", "show", "--no-pager", "--rev", "HEAD", "-n", "1",
                 "--hide-workspace", "--csv").stdout.splitlines()[0].split(",")
    shown = _run(root, sys.executable, "-m", "dvc", "exp", "show", "--no-pager", "--rev", "HEAD~1", "--rev", "HEAD",
                 "-n", "1", "--hide-workspace", "--csv", "--drop", ".*", "--keep", deciding_columns()).stdout
    header, *rows = shown.splitlines()
    columns = header.split(",")
    assert len(plain) > 250 and len(columns) <= 3 + 5 * len(plan["targets"]) + 2 * len(plan["recipes"]), (
        len(plain), len(columns))
    kpis = {c.split(":")[1] for c in columns if ":" in c}
    assert kpis == {"effective_bits", "gate_pass", "min_recovery", "predicted_tok_s", "usd_per_mtok"}
    recovery = columns.index("metrics/evaluate/smollm2-135m-instruct-fp8.json:min_recovery")
    assert [row.split(",")[recovery] for row in rows] == ["0.98", "0.96"]
    diff = json.loads(_run(root, sys.executable, "-m", "dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json").stdout)
    assert diff["metrics/evaluate/smollm2-135m-instruct-fp8.json"]["min_recovery"] == {
        "old": 0.98, "new": 0.96, "diff": pytest.approx(-0.02)}


def test_make_compare_is_that_command():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ncompare: setup\n", 1)[1].split("\n\n", 1)[0]
    assert "dvc exp show --rev $(A) --rev $(B) -n 1 --hide-workspace" in recipe
    assert "--drop '.*'" in recipe and "deciding_columns()" in recipe


def test_a_fresh_clone_shows_the_committed_metrics_without_a_warning(repo, tmp_path):
    """metrics/run/ (git-ignored) is absent from a clone: dvc.yaml lists metrics/ whole, which the clone has."""
    root, plan = repo
    _run(tmp_path, "git", "clone", "-q", str(root), "clone")
    clone = tmp_path / "clone"
    assert not (clone / "metrics/run").exists()
    done = _run(clone, sys.executable, "-m", "dvc", "metrics", "show", "--json")
    shown = json.loads(done.stdout)[""]["data"]
    assert "failed to load" not in done.stderr and all("error" not in entry for entry in shown.values())
    assert len([p for p in shown if p.startswith("metrics/throughput/")]) == len(plan["targets"])


def test_forge_fleet_accepts_the_metrics_a_run_rewrote_but_not_other_edits(tmp_path):
    """`dvc repro` rewrites dvc.lock and the git-tracked metrics; workers need neither, so the fleet's
    clean-checkout check lets them pass (scripts/fleet_check.py reruns the fleet in a clone it ran in)."""
    from pipeline.core.errors import ForgeError
    from pipeline.fleet.cli import clean_head

    for path in ("dvc.lock", "metrics/calibrate/x.json", "recipes/x.yaml"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("{}\n")
    _run(tmp_path, "git", "init", "-q")
    _run(tmp_path, "git", "add", "-A")
    _run(tmp_path, "git", "commit", "-qm", "a run")
    (tmp_path / "dvc.lock").write_text("{1}\n")
    (tmp_path / "metrics/calibrate/x.json").write_text('{"effective_bits": 8.25}\n')
    assert len(clean_head(tmp_path)) == 40
    (tmp_path / "recipes/x.yaml").write_text("{2}\n")
    with pytest.raises(ForgeError, match=r"uncommitted changes to recipes/x.yaml: workers run the commit"):
        clean_head(tmp_path)
