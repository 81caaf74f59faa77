"""`forge fleet`'s DAG and resource mapping from the shipped dvc.yaml, plan and recipes (no Ray needed)."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.fleet.cli import driver_dirs
from pipeline.fleet.dag import StageNode, descendants, expand
from pipeline.fleet.resources import Resources, stage_resources, unschedulable
from pipeline.planning.dvc_plan import build_plan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(DEFAULT_CATALOG)


@pytest.fixture(scope="module")
def full_plan(catalog):
    return build_plan(catalog, include_all=True)  # the Hub models too, as on a GPU cluster


def node(name: str, cmd: str) -> StageNode:
    return StageNode(name=name, cmd=cmd, upstream=(), uncached_outs=())


def test_dag_is_dvcs_own_graph_of_the_shipped_pipeline():
    stages = expand(ROOT)
    names = [s.name for s in stages]
    by_name = {s.name: s for s in stages}
    import yaml

    plan = yaml.safe_load((ROOT / "plan.yaml").read_text())
    for key in plan["targets"]:
        assert f"publish@{key}" in names and f"build@{key}" in names
        # publish needs the bundle, both evaluations: the edges come from dvc.yaml's deps
        assert set(by_name[f"publish@{key}"].upstream) >= {f"build@{key}", f"serve-eval@{key}"}
        assert names.index(f"build@{key}") < names.index(f"publish@{key}")  # topological
    assert by_name["download@smollm2-135m-instruct"].upstream == ()
    assert "data/throughput/smollm2-135m-instruct-fp8-h200" in by_name[
        "throughput@smollm2-135m-instruct-fp8-h200"].uncached_outs
    assert "report" in descendants(stages, "download@smollm2-135m-instruct")


def test_targets_pattern_keeps_what_the_target_needs():
    stages = expand(ROOT, ["build@smollm2-135m-instruct-fp8-h200"])
    assert {s.name for s in stages} == {"download@smollm2-135m-instruct",
                                        "calibration-set@smollm2-135m-instruct-fp8",
                                        "calibrate@smollm2-135m-instruct-fp8", "build@smollm2-135m-instruct-fp8-h200"}


def test_targets_pattern_that_matches_nothing_is_one_clear_error(capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.chdir(ROOT)
    assert main(["fleet", "run", "--remote", "/tmp/x", "--targets", "nosuch@*"]) == 2
    err = capsys.readouterr().err
    assert "--targets: nosuch@* matches no stage of dvc.yaml." in err and "Fix: use stage names" in err


def test_gpu_stages_of_hub_models_ask_for_their_kind_and_count(full_plan, catalog):
    calibrate = node("calibrate@llama-3-3-70b-instruct-fp8",
                     "forge calibrate recipes/llama-3-3-70b-instruct/fp8.yaml --model m --calibration c --out o")
    # the calibration plan (pipeline/sizing/placement.py) puts the 70B BF16 model on 2 of the node's H100s
    assert stage_resources(calibrate, full_plan, catalog, ROOT).ray_options() == {
        "num_cpus": 1, "num_gpus": 2, "resources": {"gpu-h100": 2}}
    build = node("build@llama-3-3-70b-instruct-fp8-h100", "forge build r --gpu h100 --quantized q --out o")
    assert stage_resources(build, full_plan, catalog, ROOT).custom == {"gpu-h100": 2}  # TP 2 on H100
    served = node("serve-eval@llama-3-3-70b-instruct-nvfp4-b200", "forge evaluate r --bundle b --out o")
    assert stage_resources(served, full_plan, catalog, ROOT).custom == {"gpu-b200": 1}
    for cpu in (node("download@llama-3-3-70b-instruct", "forge download m --out o"),
                node("publish@llama-3-3-70b-instruct-fp8-h200", "forge publish r --gpu h200 --bundle b"),
                node("report", "forge report --plan plan.yaml"), node("x", "python train.py")):
        assert stage_resources(cpu, full_plan, catalog, ROOT) == Resources()


def test_the_embedded_default_asks_for_no_gpu(full_plan, catalog):
    for stage in expand(ROOT):
        got = stage_resources(stage, full_plan, catalog, ROOT)
        assert got.num_gpus == 0 and got.custom == {}, stage.name


def test_publish_to_a_directory_registry_is_pinned_to_the_driver():
    pinned = driver_dirs(expand(ROOT))
    assert pinned and all(name.startswith("publish@") for name in pinned)
    assert set(pinned.values()) == {("registry",)}
    assert driver_dirs([node("publish@x", "forge publish r --registry oci://host/ns --out o")]) == {}


def test_unschedulable_names_the_missing_kind_and_what_exists():
    nodes = [{"Alive": True, "Resources": {"CPU": 8, "GPU": 8, "gpu-h200": 8}},
             {"Alive": False, "Resources": {"CPU": 8, "GPU": 8, "gpu-b200": 8}}]
    assert unschedulable(Resources(num_gpus=2, custom={"gpu-h200": 2}), nodes) is None
    assert unschedulable(Resources(num_gpus=16, custom={"gpu-h200": 16}), nodes).startswith("no node offers")
    why = unschedulable(Resources(num_gpus=1, custom={"gpu-b200": 1}, why="build on the target GPU"), nodes)
    assert "no node offers CPU 1, GPU 1, gpu-b200 1 (build on the target GPU)" in why
    assert "the cluster's GPU kinds: gpu-h200" in why  # the dead node does not count


def test_without_ray_forge_fleet_says_how_to_install_it(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["fleet", "run", "--remote", "/tmp/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: forge fleet: Ray is not installed. Fix: install the fleet extra: pip install "
                   "'forge-quant[fleet]'  (Ray; in this checkout: .venv/bin/python -m pip install -e '.[fleet]').")
    assert len(err.splitlines()) == 1
