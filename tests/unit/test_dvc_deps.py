"""DVC sees every input a stage reads: its own code, measured ceilings, eval suites, calibration
definitions. Resolved by DVC itself (dvc.repo.Repo over dvc.yaml + plan.yaml), no pipeline run."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_OF_BUILD = ("download", "calibration-set", "calibrate", "baseline", "evaluate", "serve-baseline")


@pytest.fixture(scope="module")
def stages():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {s.addressing: ([d.def_path for d in s.deps], [o.def_path for o in s.outs]) for s in repo.index.stages}


def _reads(deps: list[str], path: str) -> bool:
    return any(PurePosixPath(path) == PurePosixPath(d) or PurePosixPath(d) in PurePosixPath(path).parents for d in deps)


def _overlap(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or a in b.parents or b in a.parents


def rerun_by(stages, path: str) -> set[str]:
    """Stages `dvc repro` re-runs after `path` changes: those that depend on it, then their consumers
    (a stage consumes another when one of its deps is, contains or lies inside one of the other's outs)."""
    deps = {name: [PurePosixPath(d) for d in d_] for name, (d_, _) in stages.items()}
    outs = {name: [PurePosixPath(o) for o in o_] for name, (_, o_) in stages.items()}
    consumers = {name: {other for other in stages if any(_overlap(o, d) for o in outs[name] for d in deps[other])}
                 for name in stages}
    changed = {name for name, (d_, _) in stages.items() if _reads(d_, path)}
    todo = list(changed)
    while todo:
        for other in consumers[todo.pop()] - changed:
            changed.add(other)
            todo.append(other)
    return changed


@pytest.mark.parametrize("module", ["shapes.py", "memory.py", "roofline.py", "perfmodel.py",
                                    "perfmodel_constants.json", "plan.py"])
def test_editing_sizing_reruns_build_and_throughput_and_nothing_upstream(stages, module):
    affected = rerun_by(stages, f"pipeline/sizing/{module}")
    families = {name.split("@")[0] for name in affected}
    assert {"build", "throughput"} <= families
    assert not families & set(UPSTREAM_OF_BUILD), sorted(families)
    builds = {n for n in stages if n.startswith("build@")}
    assert builds <= affected and {n for n in stages if n.startswith("throughput@")} <= affected


def test_every_stage_lists_its_own_code(stages):
    own = {"download": "pipeline/stages/download.py", "benchmark-data": "pipeline/stages/benchmark_data.py",
           "calibration-set": "pipeline/stages/calibration_set.py",
           "calibrate": "pipeline/stages/calibrate.py", "baseline": "pipeline/stages/baseline.py",
           "evaluate": "pipeline/stages/evaluate.py", "build": "pipeline/stages/build.py",
           "serve-baseline": "pipeline/stages/baseline.py", "serve-eval": "pipeline/stages/evaluate.py",
           "throughput": "pipeline/stages/throughput.py", "publish": "pipeline/stages/publish.py",
           "report": "pipeline/stages/report.py", "report-frontier": "pipeline/stages/report.py", "gpu-compare": "pipeline/reporting/gpu_comparison.py"}
    for name, (deps, _) in stages.items():
        assert own[name.split("@")[0]] in deps, f"{name} does not list its code {own[name.split('@')[0]]}"


def test_inputs_read_from_the_tree_are_deps(stages):
    needs = {"throughput": "recipes/measured", "evaluate": "eval", "baseline": "eval", "serve-eval": "eval",
             "calibration-set": "calibration"}
    for name, (deps, _) in stages.items():
        family = name.split("@")[0]
        if family in needs:
            assert needs[family] in deps, f"{name} reads {needs[family]} but does not depend on it"


def upstream_of(stages, name: str) -> set[str]:
    """The stages `dvc repro <name>` runs: `name` and, transitively, the stages whose outputs it reads."""
    deps = {n: [PurePosixPath(d) for d in d_] for n, (d_, _) in stages.items()}
    outs = {n: [PurePosixPath(o) for o in o_] for n, (_, o_) in stages.items()}
    wanted, todo = {name}, [name]
    while todo:
        mine = deps[todo.pop()]
        for other in stages:
            if other not in wanted and any(_overlap(o, d) for o in outs[other] for d in mine):
                wanted.add(other)
                todo.append(other)
    return wanted


def test_make_repro_runs_the_embedded_default_and_make_frontier_every_variant(stages):
    import yaml

    from pipeline.planning.dvc_plan import FRONTIER_REPORT_STAGE, REPORT_STAGE

    plan = yaml.safe_load((ROOT / "plan.yaml").read_text())
    frontier = {k for k, r in plan["recipes"].items() if r["frontier"]} | {
        k for k, t in plan["targets"].items() if t["frontier"]}
    assert frontier, "the embedded default has frontier variants (recipes with `frontier: true`)"
    default = upstream_of(stages, REPORT_STAGE)
    assert {n.split("@")[1] for n in default if "@" in n} & frontier == set()
    for key, target in plan["targets"].items():
        if not target["frontier"]:
            assert {f"publish@{key}", f"serve-eval@{key}", f"throughput@{key}",
                    f"evaluate@{target['recipe_id']}"} <= default
    # a model's baselines run with `make repro` when one of its targets does; a model whose recipes are
    # all frontier variants (the upcycled MoE) is baselined by `make frontier` only
    in_default = {t["model"] for t in plan["targets"].values() if not t["frontier"]}
    baselines = {n for n in stages if n.startswith(("serve-baseline@", "baseline@"))}
    assert {n for n in baselines if n.split("@")[1] in in_default} <= default
    frontier_only = {n for n in baselines if n.split("@")[1] not in in_default}
    assert frontier_only and not frontier_only & default
    assert frontier_only <= upstream_of(stages, FRONTIER_REPORT_STAGE)
    assert upstream_of(stages, FRONTIER_REPORT_STAGE) == set(stages) - {REPORT_STAGE}
