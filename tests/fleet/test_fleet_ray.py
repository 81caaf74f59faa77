"""`forge fleet run` on a real two-node local Ray cluster with a DVC remote in a temp dir."""

from __future__ import annotations

import time

import pytest
import yaml

from pipeline.cli import main
from tests.fleet.conftest import DVC, make_project, sh

pytestmark = pytest.mark.slow


def lock_outs(root) -> dict[str, dict[str, str]]:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in entry["outs"]} for name, entry in stages.items()}


def rows(out: str) -> dict[str, tuple[str, str]]:
    """The closing summary: stage -> (status, the rest of its line)."""
    summary = out[out.index("fleet: "):].splitlines()[1:]
    return {line.split()[0]: (line.split()[1], " ".join(line.split()[2:])) for line in summary}


def fleet(root, cluster, remote, *extra, monkeypatch, capsys):
    monkeypatch.chdir(root)
    work = root.parent / "clones"  # a killed worker leaves its clone behind: keep it in tmp_path
    work.mkdir(exist_ok=True)
    code = main(["fleet", "run", "--address", cluster.address, "--remote", str(remote), "--workdir", str(work), *extra])
    return code, capsys.readouterr().out


def test_parallel_run_matches_plain_repro_then_is_cached(tmp_path, cluster, monkeypatch, capsys):
    root = make_project(tmp_path / "repo", tmp_path / "marker")
    plain = tmp_path / "plain"
    sh(["git", "clone", "-q", str(root), str(plain)], tmp_path)
    sh([DVC, "repro", "-q"], plain)

    started = time.monotonic()
    code, out = fleet(root, cluster, tmp_path / "remote", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, out
    assert lock_outs(root) == lock_outs(plain)
    assert "7 stage(s)" in out and "7 ran" in out
    nodes = {line.split(" on ")[1].split(":")[0] for line in out.splitlines() if line.startswith("end ")}
    assert len(nodes) == 2, out  # both workers ran stages
    assert "start   square@1" in out
    # After the driver's pull, plain DVC finds everything up to date here.
    assert "up to date" in sh([DVC, "status"], root)
    assert (root / "reports/report.txt").read_text() == (plain / "reports/report.txt").read_text()
    first_s = time.monotonic() - started

    code, out = fleet(root, cluster, tmp_path / "remote", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, out
    assert "7 cached" in out and "0 ran" in out, out  # like a second `dvc repro` here
    assert lock_outs(root) == lock_outs(plain)

    fresh = tmp_path / "fresh"  # a machine that has nothing: the remote's run cache decides
    sh(["git", "clone", "-q", str(root), str(fresh)], tmp_path)
    code, out = fleet(fresh, cluster, tmp_path / "remote", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, out
    # DVC never run-caches a stage with a `cache: false` out that is no metric (report), so that one
    # reruns, exactly as a plain `dvc repro` on a fresh clone would rerun it.
    assert "6 cached" in out and "1 ran" in out, out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  ") and " ran " in line] == ["report"]
    assert lock_outs(fresh) == lock_outs(plain)
    print(f"tiny pipeline: first fleet run {first_s:.1f} s")


def test_killed_worker_is_retried_with_the_same_digests(tmp_path, cluster, monkeypatch, capsys):
    marker = tmp_path / "marker"
    root = make_project(tmp_path / "repo", marker, kill=True)
    plain = tmp_path / "plain"
    sh(["git", "clone", "-q", str(root), str(plain)], tmp_path)
    marker.write_text("plain repro must not be killed")
    sh([DVC, "repro", "-q"], plain)
    marker.unlink()

    code, out = fleet(root, cluster, tmp_path / "remote", "--targets", "survivor", monkeypatch=monkeypatch,
                      capsys=capsys)
    assert code == 0, out
    assert marker.read_text() == "killed once"  # the first attempt really died
    assert out.count("start   survivor") == 2, out  # and Ray started it again
    assert lock_outs(root)["survivor"] == lock_outs(plain)["survivor"]


def test_deterministic_failure_stops_only_downstream(tmp_path, cluster, monkeypatch, capsys):
    root = make_project(tmp_path / "repo", tmp_path / "marker", fail_on="square")
    code, out = fleet(root, cluster, tmp_path / "remote", "--no-pull", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1
    summary = rows(out)
    assert "deterministic failure in square" in out  # the stage's own words, in the failure block
    for stage in ("square@1", "square@2", "square@3"):
        assert summary[stage][0] == "failed" and f"failed to reproduce '{stage}'" in summary[stage][1]
        # the command's own exit code reached DVC (SIGCHLD at its default in the worker)
        assert summary[stage][1].endswith(f"failed to run: python gen.py square {stage[-1]}, exited with 1"), summary

    assert summary["seed"][0] == "ran" and summary["survivor"][0] == "ran"  # not downstream: unaffected
    assert summary["total"] == ("skipped", "upstream square@1 failed")
    assert summary["report"] == ("skipped", "upstream total skipped")
    assert out.count("start   square@1") == 1  # an application error is not retried


def test_gpu_kind_resources_place_and_unschedulable_is_bounded(tmp_path, cluster, monkeypatch, capsys):
    root = make_project(tmp_path / "repo", tmp_path / "marker")
    started = time.monotonic()
    code, out = fleet(root, cluster, tmp_path / "remote", "--no-pull", "--node-wait", "2",
                      "--resources", 'square@*={"gpu-b200": 1}', "--resources", 'survivor={"gpu-b300": 1}',
                      monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1
    # Bounded, not hung: a few seconds of --node-wait plus the schedulable stages (minutes on a loaded 2-core box).
    assert time.monotonic() - started < 300
    b200_node = cluster.b200_node_id[:8]
    for i in (1, 2, 3):
        line = next(line for line in out.splitlines() if line.startswith(f"end     square@{i}"))
        assert b200_node in line, out
    assert "unschedulable survivor: no node offers CPU 1, gpu-b300 1" in out
    assert "the cluster's GPU kinds: gpu-b200, gpu-h200" in out
    summary = rows(out)
    assert summary["survivor"][0] == "unschedulable"
    assert summary["total"] == ("skipped", "upstream survivor unschedulable")
    assert summary["seed"][0] == "ran"
