"""`forge new` (issue 12, item 21): a Hub model id + its config.json + a pinned revision become
recipes/<name>/ with model.yaml, config.json and a recipe per format, validated before they appear."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.core.gpus import load_catalog
from pipeline.planning.validate import Definitions, validate_recipe
from pipeline.recipe.loading import load_recipe
from pipeline.verbs.newmodel import format_for, model_name

ROOT = Path(__file__).resolve().parents[2]
REVISION = "0e9e39f249a16976918f6564b8830bc894c89659"
CONFIG_8B = ROOT / "recipes/llama-3-1-8b-instruct/config.json"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    for name in ("recipes", "calibration", "eval"):
        shutil.copytree(ROOT / name, tmp_path / name)
    for name in ("dvc.yaml", "plan.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_new_writes_a_model_and_a_recipe_per_format(repo, capsys):
    code, out, err = _run(capsys, "new", "meta-llama/Llama-3.1-8B-Instruct", "--revision", REVISION,
                          "--config", str(CONFIG_8B), "--gpu", "h200", "--gpu", "h100", "--gpu", "b200",
                          "--name", "llama-test")
    assert code == 0, err
    model_dir = repo / "recipes/llama-test"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "fp8.yaml", "model.yaml", "nvfp4.yaml"]
    assert json.loads((model_dir / "config.json").read_text()) == json.loads(CONFIG_8B.read_text())
    model = yaml.safe_load((model_dir / "model.yaml").read_text())
    assert model["source"] == {"kind": "hf", "repo_id": "meta-llama/Llama-3.1-8B-Instruct", "revision": REVISION}
    fp8, nvfp4 = (load_recipe(model_dir / f"{v}.yaml") for v in ("fp8", "nvfp4"))
    assert set(fp8.spec.targets) == {"h200", "h100"} and set(nvfp4.spec.targets) == {"b200"}
    catalog = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
    for recipe in (fp8, nvfp4):
        assert all(p.fits for p in validate_recipe(recipe, catalog, Definitions.of_checkout(repo)).values())
    assert "regenerated plan.yaml" in out and "forge plan --dvc --all --model llama-test" in out
    assert main(["plan", "--dvc", "--check"]) == 0  # the plan was regenerated, so it is fresh
    assert not list((repo / "recipes").glob(".llama-test.new-*"))


def test_new_picks_the_smallest_tp_that_fits(repo, capsys):
    config = ROOT / "recipes/llama-3-3-70b-instruct/config.json"
    code, _, err = _run(capsys, "new", "meta-llama/Llama-3.3-70B-Instruct", "--revision", REVISION,
                        "--config", str(config), "--gpu", "l40s", "--name", "llama-70b-test")
    assert code == 0, err
    recipe = load_recipe(repo / "recipes/llama-70b-test/fp8.yaml")
    # 72.7 GB of FP8 weights: more than one 48 GB L40S; 36.3 GB each on two leaves room for KV.
    assert recipe.spec.targets["l40s"].tp == 2


def test_format_for_each_gpu_derives_from_the_registry():
    catalog = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
    assert format_for(catalog["h200"]) == "fp8" and format_for(catalog["b200"]) == "nvfp4"
    assert model_name("meta-llama/Llama-3.1-8B-Instruct") == "llama-3-1-8b-instruct"


@pytest.mark.parametrize("argv, expected", [
    (["--revision", "main"], ("error: --revision: 'main' is not a 40-hex commit (branch names drift). "
                              "Fix: copy the commit from https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/commits/main.")),
    (["--revision", REVISION, "--gpu", "a100"], "error: --gpu: unknown GPU a100. Fix: pass --gpu one or more of h100"),
    (["--revision", REVISION], "error: --gpu: no target GPU given."),
])
def test_new_refuses_bad_arguments(repo, capsys, argv, expected):
    code, _, err = _run(capsys, "new", "meta-llama/Llama-3.1-8B-Instruct", "--config", str(CONFIG_8B), *argv)
    assert code == 2 and err.startswith(expected), err
    assert not (repo / "recipes/llama-3-1-8b-instruct-x").exists()


def test_new_refuses_remote_code_and_existing_models(repo, capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads(CONFIG_8B.read_text()), "auto_map": {"AutoModel": "m.M"}}))
    code, _, err = _run(capsys, "new", "org/custom", "--revision", REVISION, "--config", str(config), "--gpu", "h200")
    assert code == 2
    assert "config.json has auto_map ['AutoModel']: the model needs its own Python code. " \
           "Fix: review that code, then pass --trust-remote-code." in err
    assert not (repo / "recipes/custom").exists()
    code, _, err = _run(capsys, "new", "meta-llama/Llama-3.1-8B-Instruct", "--revision", REVISION,
                        "--config", str(CONFIG_8B), "--gpu", "h200")
    assert code == 2 and "recipes/llama-3-1-8b-instruct: already exists." in err


def test_new_outside_a_checkout_names_what_is_missing_and_the_fix(tmp_path, monkeypatch, capsys):
    """Issue 26 item 8: run from any other directory, `forge new` ended in a FileNotFoundError traceback."""
    monkeypatch.chdir(tmp_path)
    argv = ("new", "meta-llama/Llama-3.1-8B-Instruct", "--revision", REVISION, "--config", str(CONFIG_8B),
            "--gpu", "h200")
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert err == (f"error: forge new: {tmp_path.resolve()} is not a forge checkout: it has no recipes/, calibration/, "
                   "eval/suites/, dvc.yaml (the recipes `forge new` adds to, the calibration sets and eval suites it "
                   "validates them against, the DVC pipeline it regenerates). Fix: cd into a clone of the forge "
                   "repository (the directory holding recipes/ and dvc.yaml) and run `forge new` again.\n")
    for name in ("recipes", "calibration", "eval"):  # a partial checkout: only what is missing is named
        shutil.copytree(ROOT / name, tmp_path / name)
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "it has no dvc.yaml (" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration", "eval", "recipes"]  # nothing written
    assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == sorted(p.name for p in (ROOT / "recipes").iterdir())
