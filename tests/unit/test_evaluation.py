import json
import math
from pathlib import Path

import pytest
import yaml

from pipeline.accuracy.lm_eval_runner import remote_model_args, run_suite
from pipeline.accuracy.lm_eval_tasks import local_task_config, local_task_files, task_specs
from pipeline.accuracy.suites import EvalSuite, list_suites, load_suite
from pipeline.core.errors import RecipeError, StageInputError

ROOT = Path(__file__).resolve().parents[2]
SUITES = ROOT / "eval" / "suites"
TASKS = ROOT / "eval" / "tasks"
DATA = ROOT / "eval" / "data"


def _write_suite(tmp_path: Path, name: str, body: dict) -> Path:
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(body))
    return tmp_path


def _smoke_body() -> dict:
    return yaml.safe_load((SUITES / "smoke.yaml").read_text())


# ---------------------------------------------------------------------------------- suites


@pytest.mark.parametrize("name", list_suites(SUITES))
def test_every_shipped_suite_loads(name):
    suite = load_suite(name, SUITES)
    assert suite.name == name
    assert suite.directions()
    if suite.source == "local":
        assert set(task_specs(suite, TASKS)) == {t.name for t in suite.tasks}


def test_shipped_suites_are_smoke_and_standard():
    assert {"smoke", "standard"} <= set(list_suites(SUITES))
    smoke = load_suite("smoke", SUITES)
    assert smoke.source == "local"
    assert smoke.directions() == {
        "forge_mc/acc,none": "higher",
        "forge_mc/acc_norm,none": "higher",
        "forge_prose/word_perplexity,none": "lower",
        "forge_prose/byte_perplexity,none": "lower",
        "forge_prose/bits_per_byte,none": "lower",
    }
    standard = load_suite("standard", SUITES)
    assert standard.source == "installed"
    assert {t.name: t.num_fewshot for t in standard.tasks} == {
        "mmlu": 5,
        "hellaswag": 10,
        "arc_challenge": 25,
        "winogrande": 5,
    }
    assert list(standard.directions()) == [
        "mmlu/acc,none",
        "hellaswag/acc_norm,none",
        "arc_challenge/acc_norm,none",
        "winogrande/acc,none",
    ]


def _lm_eval_task_yaml(relative: str) -> dict:
    import lm_eval

    class _TagTolerantLoader(yaml.SafeLoader):
        pass

    # lm-eval YAMLs use `!function module.name`; their value does not matter here.
    _TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    path = Path(lm_eval.__file__).parent / "tasks" / relative
    return yaml.load(path.read_text(), Loader=_TagTolerantLoader)


def test_standard_metric_names_match_the_installed_lm_eval_task_yamls():
    standard = load_suite("standard", SUITES)
    hellaswag = _lm_eval_task_yaml("hellaswag/hellaswag.yaml")
    arc = _lm_eval_task_yaml("arc/arc_easy.yaml")  # arc_challenge.yaml includes it
    mmlu = _lm_eval_task_yaml("mmlu/default/_mmlu.yaml")
    winogrande = _lm_eval_task_yaml("winogrande/default.yaml")
    reported = {
        "mmlu": {f"{m['metric']},none" for m in mmlu["aggregate_metric_list"]},
        "hellaswag": {f"{m['metric']},none" for m in hellaswag["metric_list"]},
        "arc_challenge": {f"{m['metric']},none" for m in arc["metric_list"]},
        "winogrande": {f"{m['metric']},none" for m in winogrande["metric_list"]},
    }
    assert _lm_eval_task_yaml("arc/arc_challenge.yaml")["include"] == "arc_easy.yaml"
    for spec in standard.metrics:
        assert spec.metric in reported[spec.task], (spec.task, spec.metric, reported[spec.task])


def test_unknown_suite_name_lists_the_available_ones():
    with pytest.raises(RecipeError) as err:
        load_suite("smokey", SUITES)
    assert str(err.value) == (
        f"{SUITES / 'smokey.yaml'}: no eval suite named 'smokey'. "
        f"Fix: use one of the suites in {SUITES}: {', '.join(list_suites(SUITES))}."
    )


def test_unknown_key_names_file_and_field(tmp_path):
    body = _smoke_body()
    body["metrics"][1]["treshold"] = 0.9
    _write_suite(tmp_path, "typo", body)
    with pytest.raises(RecipeError) as err:
        load_suite("typo", tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'typo.yaml'}: metrics.1.treshold: unknown field (not allowed).")

    body = _smoke_body()
    body["batchsize"] = 4
    _write_suite(tmp_path, "typo2", body)
    with pytest.raises(RecipeError, match=r"typo2.yaml: batchsize: unknown field \(not allowed\)\."):
        load_suite("typo2", tmp_path)


def test_suite_cross_checks(tmp_path):
    body = _smoke_body()
    body["metrics"].append({"task": "hellaswag", "metric": "acc,none", "direction": "higher"})
    _write_suite(tmp_path, "a", body)
    with pytest.raises(
        RecipeError, match=r"a.yaml: metrics.5.task: 'hellaswag' is not in tasks \(forge_mc, forge_prose\)"
    ):
        load_suite("a", tmp_path)

    body = _smoke_body()
    body["metrics"][0]["metric"] = "acc"  # lm-eval reports "acc,none"
    _write_suite(tmp_path, "b", body)
    with pytest.raises(RecipeError, match=r"b.yaml: metrics.0.metric: String should match pattern"):
        load_suite("b", tmp_path)

    body = _smoke_body()
    body["metrics"][0]["direction"] = "up"
    _write_suite(tmp_path, "c", body)
    with pytest.raises(RecipeError, match=r"c.yaml: metrics.0.direction: Input should be 'higher' or 'lower'"):
        load_suite("c", tmp_path)

    body = _smoke_body()
    body["tasks"].append({"name": "forge_mc", "num_fewshot": 5})
    _write_suite(tmp_path, "d", body)
    with pytest.raises(RecipeError, match=r"d.yaml: tasks: task\(s\) listed twice: forge_mc"):
        load_suite("d", tmp_path)

    body = _smoke_body() | {"name": "other"}
    _write_suite(tmp_path, "e", body)
    with pytest.raises(RecipeError, match=r"e.yaml: name: the suite's name is its file name"):
        load_suite("e", tmp_path)


# ---------------------------------------------------------------------------------- local tasks and data


def test_local_task_data_files_resolve_against_the_yaml_not_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = local_task_files(TASKS)
    assert set(files) == {"forge_mc", "forge_prose"}
    cfg = local_task_config(files["forge_mc"])
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str((DATA / "forge_mc.jsonl").resolve())}
    # the YAML on disk keeps its relative path (readable, relocatable)
    assert (
        yaml.safe_load(files["forge_mc"].read_text())["dataset_kwargs"]["data_files"]["test"]
        == "../data/forge_mc.jsonl"
    )


def test_local_task_with_missing_data_is_a_clear_error(tmp_path):
    task = tmp_path / "t.yaml"
    task.write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\n")
    with pytest.raises(StageInputError) as err:
        local_task_config(task)
    assert str(err.value).startswith(
        f"{task}: dataset_kwargs.data_files: 'nowhere.jsonl' resolves to {tmp_path / 'nowhere.jsonl'}, which does not exist."
    )


def test_missing_local_task_fails_before_any_model_work(tmp_path):
    body = _smoke_body()
    body["tasks"][0]["name"] = "forge_nope"
    body["metrics"] = [{"task": "forge_nope", "metric": "acc,none", "direction": "higher"}]
    suite = load_suite("x", _write_suite(tmp_path, "x", body))
    with pytest.raises(
        StageInputError, match=r"local task\(s\) forge_nope not found under .*\(found: forge_mc, forge_prose\)"
    ):
        run_suite(object(), None, suite, TASKS, "cpu")


def test_shipped_data_is_reproducible_and_small(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", ROOT / "eval" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write(tmp_path)
    for path in written.values():
        shipped = DATA / path.name
        assert path.read_bytes() == shipped.read_bytes(), f"{shipped} is stale: run python eval/make_data.py"
        # 1,397 questions; the one committed data file above the 100 kB norm (README "Accuracy gates")
        assert shipped.stat().st_size < 200_000
    mc = [json.loads(line) for line in (DATA / "forge_mc.jsonl").read_text().splitlines()]
    assert len(mc) >= 150
    for row in mc:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert 0 <= row["gold"] < 4
    assert {r["query"]: r["choices"][r["gold"]] for r in mc}["The capital of France is"] == "Paris"
    assert len(mc) >= 1300
    # the generated items never repeat a question (the original 151 have a few repeated sums)
    assert len({r["query"] for r in mc[151:]} - {r["query"] for r in mc[:151]}) == len(mc) - 151
    prose = [json.loads(line) for line in (DATA / "forge_prose.jsonl").read_text().splitlines()]
    assert len(prose) >= 90 and all(len(p["text"].split()) >= 25 for p in prose)
    assert all(p["source"].startswith("python3.11-doc 3.11.2-6+deb12u9: ") for p in prose)
    assert (DATA / "forge_prose.jsonl").stat().st_size < 100_000
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in (DATA / "forge_prose.LICENSE").read_text()


# ---------------------------------------------------------------------------------- running lm-eval


def test_run_smoke_suite_on_tiny_model(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative data_files would break here if not resolved
    suite = load_suite("smoke", SUITES).model_copy(update={"limit": 6})
    result = run_suite(tiny_llama.model, tiny_llama.tokenizer, suite, TASKS, "cpu", batch_size=4)
    assert set(result.metrics) == set(suite.directions())
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.samples == {"forge_mc": 6, "forge_prose": 6}
    assert result.num_fewshot == {"forge_mc": 0, "forge_prose": 0}
    assert result.lm_eval_version == "0.4.13"
    assert 0.0 <= result.metrics["forge_mc/acc,none"] <= 1.0
    # six 4-way questions: accuracy is a multiple of 1/6, with a binomial stderr
    assert round(result.metrics["forge_mc/acc,none"] * 6, 6).is_integer()
    assert result.stderr["forge_mc/acc,none"] > 0
    assert result.stderr["forge_prose/word_perplexity,none"] is None  # lm-eval reports N/A
    # lm-eval's definitions tie these together: bits_per_byte = log2(byte_perplexity)
    assert result.metrics["forge_prose/bits_per_byte,none"] == pytest.approx(
        math.log2(result.metrics["forge_prose/byte_perplexity,none"]), rel=1e-9
    )
    # a random 500-token model is far worse than chance on bytes of English
    assert result.metrics["forge_prose/byte_perplexity,none"] > 5
    assert json.loads(json.dumps(result.to_dict()))["suite"] == "smoke"


def test_declared_direction_is_checked_against_lm_eval(tiny_llama, tmp_path):
    body = _smoke_body()
    body["limit"] = 2
    body["tasks"] = [body["tasks"][1]]
    body["metrics"] = [{"task": "forge_prose", "metric": "word_perplexity,none", "direction": "higher"}]
    suite = load_suite("wrong", _write_suite(tmp_path, "wrong", body))
    with pytest.raises(StageInputError) as err:
        run_suite(tiny_llama.model, tiny_llama.tokenizer, suite, TASKS, "cpu")
    assert str(err.value) == (
        "eval suite 'wrong': metrics.0.direction: forge_prose/word_perplexity,none is declared 'higher' "
        "but lm-eval says higher_is_better=False. Fix: fix the direction in the suite."
    )


# ---------------------------------------------------------------------------------- remote


def test_remote_model_args(tiny_llama):
    args = remote_model_args("http://127.0.0.1:8000", "llama-fp8", tiny_llama.model_dir)
    assert args == {
        "model": "llama-fp8",
        "base_url": "http://127.0.0.1:8000/v1/completions",
        "tokenizer": str(tiny_llama.model_dir.resolve()),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "num_concurrent": 8,
        "max_retries": 3,
        "timeout": 300,
    }
    for url in ("http://h:1/v1", "http://h:1/v1/", "http://h:1/v1/completions"):
        assert remote_model_args(url, "m", tiny_llama.model_dir)["base_url"] == "http://h:1/v1/completions"
    assert remote_model_args("http://h:1", "m", tiny_llama.model_dir, max_length=4096)["max_length"] == 4096
    with pytest.raises(StageInputError, match=r"eval.remote.base_url: '127.0.0.1:8000' is not an http\(s\) URL"):
        remote_model_args("127.0.0.1:8000", "m", tiny_llama.model_dir)


def test_remote_args_build_lm_evals_local_completions_model(tiny_llama, tmp_path):
    pytest.importorskip("tenacity", reason="lm-eval's [api] extra is not installed")
    from lm_eval.api.registry import get_model

    args = remote_model_args("http://127.0.0.1:8000/v1", "llama-fp8", tiny_llama.model_dir)
    lm = get_model("local-completions").create_from_arg_obj(args, {"batch_size": 1})
    assert (lm.base_url, lm.model, lm.tokenizer_backend) == (
        "http://127.0.0.1:8000/v1/completions",
        "llama-fp8",
        "huggingface",
    )
    text = "The capital of France is"
    assert lm.tok_encode(text) == tiny_llama.tokenizer(text, add_special_tokens=False).input_ids
    with pytest.raises(StageInputError, match="no tokenizer files"):
        remote_model_args("http://h:1", "m", tmp_path)


def test_eval_suite_schema_is_closed():
    assert EvalSuite.model_config["extra"] == "forbid"
