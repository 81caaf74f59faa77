"""The baseline and evaluate stages on the tiny Llama: a real baseline run, real ModelOpt
calibrations (FP8 on CPU, NVFP4 through the reference), the gate verdict and exit code, and every
refusal before a model is loaded."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core.errors import RecipeError, StageInputError
from pipeline.handoff.manifest import build_manifest, input_entry, read_manifest, write_manifest
from pipeline.recipe.loading import load_recipe
from pipeline.stages import baseline as baseline_stage
from pipeline.stages import evaluate

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 4  # documents per task: the stage's plumbing, not the tiny model's accuracy, is under test

VARIANT = """quant: {{format: {fmt}, kv_cache_dtype: fp8}}
targets:
  {gpu}: {{max_input_len: 256, max_output_len: 64, tp: 1}}
calibration: {{set: generated-en, num_samples: 4, seq_len: 32}}
eval:
  suite: smoke
  strict: {strict}
  gates: {{default_min_recovery: 0.5, overrides: {overrides}}}
"""


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes validate against calibration/ and eval/suites/ here


def write_recipe(models: Path, variant: str, fmt: str = "fp8", gpu: str = "h200", strict: bool = False,
                 overrides: dict | None = None) -> Path:
    path = models / "tiny-llama" / f"{variant}.yaml"
    path.write_text(VARIANT.format(fmt=fmt, gpu=gpu, strict=str(strict).lower(), overrides=json.dumps(overrides or {})))
    return path


def calibrate_into(directory: Path, recipe_path: Path, model_dir: Path) -> Path:
    """What the calibrate stage leaves, from a real ModelOpt calibration of the tiny model."""
    from pipeline.core.formats import FORMATS
    from pipeline.quant.modelopt_glue import calibrate
    from pipeline.quant.quant_config import build_quant_config
    from pipeline.quant.quant_state import save_quant_state
    from pipeline.sources.loading import load_checkpoint

    recipe = load_recipe(recipe_path)
    loaded = load_checkpoint(model_dir / "checkpoint")
    config = build_quant_config(FORMATS[recipe.spec.quant.format].modelopt_config, recipe.spec.quant.kv_cache_dtype, [])
    torch.manual_seed(0)
    ids = torch.randint(3, loaded.model.config.vocab_size, (4, 32))
    calibrate(loaded.model, config, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)
    save_quant_state(loaded.model, directory / "quant_state.pt")
    loaded.tokenizer.save_pretrained(directory / "checkpoint")
    shutil.copy(model_dir / "checkpoint" / "config.json", directory / "checkpoint" / "config.json")
    write_manifest(directory, build_manifest("calibrate", recipe.id, directory, {"model": input_entry(model_dir, "download")},
                                             recipe=recipe.provenance("model", "quant", "calibration")))
    return directory


@pytest.fixture(scope="module")
def world(tiny_llama, tmp_path_factory):
    """Recipes of a model `tiny-llama`, its download dir, an eval dir whose smoke suite is limited,
    a real baseline, and calibrations for an FP8 (strict) and an NVFP4 recipe."""
    root = tmp_path_factory.mktemp("world")
    models = root / "recipes"
    (models / "tiny-llama").mkdir(parents=True)
    (models / "tiny-llama" / "config.json").write_text((tiny_llama.model_dir / "config.json").read_text())
    (models / "tiny-llama" / "model.yaml").write_text(
        "source: {kind: local, path: /nonexistent}\neval: {suite: smoke}\n")
    model_dir = root / "models" / "tiny-llama"
    shutil.copytree(tiny_llama.model_dir, model_dir / "checkpoint")
    write_manifest(model_dir, build_manifest("download", "tiny-llama", model_dir, {}))

    eval_dir = root / "eval"
    shutil.copytree(ROOT / "eval" / "tasks", eval_dir / "tasks")
    shutil.copytree(ROOT / "eval" / "data", eval_dir / "data")
    (eval_dir / "suites").mkdir()
    smoke = yaml.safe_load((ROOT / "eval" / "suites" / "smoke.yaml").read_text())
    (eval_dir / "suites" / "smoke.yaml").write_text(yaml.safe_dump({**smoke, "limit": LIMIT, "batch_size": 4}))
    (eval_dir / "suites" / "other.yaml").write_text(yaml.safe_dump({**smoke, "limit": LIMIT, "tasks": smoke["tasks"][:1],
                                                                    "metrics": smoke["metrics"][:1]}))

    baseline = root / "eval-out" / "tiny-llama-baseline"
    assert baseline_stage.main(models / "tiny-llama" / "model.yaml", model_dir, baseline, eval_dir) == 0
    # FP8 asked to lose nothing at all on one metric (the strictest threshold a recovery ratio in
    # (0, 1] allows): FP8 noise on this seeded tiny model does lose a little, so the gate fails and
    # strict makes it exit 1.
    fp8 = write_recipe(models, "fp8", strict=True, overrides={"forge_prose/byte_perplexity,none": 1.0})
    nvfp4 = write_recipe(models, "nvfp4", fmt="nvfp4", gpu="b200")
    quantized = {r: calibrate_into(root / "quantized" / r, p, model_dir) for r, p in (("fp8", fp8), ("nvfp4", nvfp4))}
    return {"root": root, "models": models, "model_dir": model_dir, "eval_dir": eval_dir, "baseline": baseline,
            "recipes": {"fp8": fp8, "nvfp4": nvfp4}, "quantized": quantized}


def run_evaluate(world, variant: str, tmp_path: Path, **kwargs):
    args = {"recipe_path": world["recipes"][variant], "model_dir": world["model_dir"],
            "quantized_dir": world["quantized"][variant], "baseline_dir": world["baseline"], "out_dir": tmp_path / "out",
            "metrics_path": tmp_path / "metrics" / f"{variant}.json", "eval_dir": world["eval_dir"]}
    args.update(kwargs)
    return evaluate.main(**args)


@pytest.fixture
def no_model_work(monkeypatch):
    """Refusals must come before any model is loaded or scored."""
    import pipeline.accuracy.lm_eval_runner
    import pipeline.sources.loading

    def forbidden(*args, **kwargs):
        raise AssertionError("model work started before the inputs were checked")

    monkeypatch.setattr(pipeline.sources.loading, "load_checkpoint", forbidden)
    monkeypatch.setattr(pipeline.accuracy.lm_eval_runner, "run_suite", forbidden)


def rewrite(directory: Path, stage: str, change) -> None:
    """Edit a stage output and re-seal its manifest, so only the edited fact is wrong."""
    change(directory)
    manifest = read_manifest(directory, stage)
    write_manifest(directory, {**manifest, **build_manifest(stage, manifest["subject"], directory, manifest["inputs"],
                                                            recipe=manifest["recipe"])})


# ---------------------------------------------------------------------------- baseline


def test_baseline_metrics_and_manifest(world):
    metrics = json.loads((world["baseline"] / "metrics.json").read_text())
    assert metrics["suite"] == "smoke" and metrics["path"] == "unquantized-cpu" and metrics["dtype"] == "float32"
    assert list(metrics["metrics"]) == ["forge_mc/acc,none", "forge_mc/acc_norm,none", "forge_prose/word_perplexity,none",
                                        "forge_prose/byte_perplexity,none", "forge_prose/bits_per_byte,none"]
    assert metrics["samples"] == {"forge_mc": LIMIT, "forge_prose": LIMIT}
    assert metrics["suite_definition"]["limit"] == LIMIT
    manifest = read_manifest(world["baseline"], "baseline")
    assert manifest["subject"] == "tiny-llama"
    assert manifest["inputs"]["model"]["stage"] == "download"
    assert set(manifest["files"]) == {"metrics.json", "samples.json"}
    documents = json.loads((world["baseline"] / "samples.json").read_text())["tasks"]
    assert documents["forge_mc"]["doc_ids"] == list(range(LIMIT)) and len(documents["forge_mc"]["choices"]) == LIMIT
    assert documents["forge_prose"]["metrics"]["word_perplexity,none"]["aggregation"] == "weighted_perplexity"


# ---------------------------------------------------------------------------- evaluate


def test_unpublishable_gate_with_strict_writes_everything_and_exits_1(world, tmp_path, caplog):
    # byte perplexity must recover 1.0 (no loss at all): fake quant loses a little on every run, so
    # its interval on 4 documents is below 1.0 (FAIL) or straddles it (INCONCLUSIVE, which refuses to
    # publish by default); either way a strict run exits 1 after writing everything.
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.evaluate"):
        assert run_evaluate(world, "fp8", tmp_path) == 1
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gate_report.json", "gate_report.md", "manifest.json", "metrics.json",
                                                     "samples.json"]
    gate = json.loads((out / "gate_report.json").read_text())
    row = {r["metric"]: r for r in gate["rows"]}["forge_prose/byte_perplexity,none"]
    expected = "fail" if row["recovery_upper"] < 1.0 else "inconclusive"
    assert row["recovery_lower"] < 1.0 and row["threshold"] == 1.0 and row["form"] == "max_increase"
    assert row["verdict"] == expected and gate["verdict"] == expected and gate["inconclusive_publishes"] is False
    baseline = json.loads((world["baseline"] / "metrics.json").read_text())["metrics"]
    quantized = json.loads((out / "metrics.json").read_text())["metrics"]
    assert row["recovery"] == pytest.approx(baseline[row["metric"]] / quantized[row["metric"]])

    # The DVC metrics file: the evaluate KPIs only (pipeline/handoff/kpis.py); the rows are in gate_report.json.
    kpis = json.loads((tmp_path / "metrics" / "fp8.json").read_text())
    finite = [r["recovery"] for r in gate["rows"] if isinstance(r["recovery"], float)]
    failed = [r for r in gate["rows"] if r["verdict"] == "fail"]
    lows = [r["recovery_lower"] for r in gate["rows"] if isinstance(r["recovery_lower"], float)]
    unsure = [r for r in gate["rows"] if r["verdict"] == "inconclusive"]
    assert kpis == {"gate_pass": 0, "min_recovery": round(min(finite), 6), "min_recovery_lower": round(min(lows), 6),
                    "gates_failed": len(failed)}
    assert all(r["method"] == "paired percentile bootstrap" and r["n"] == LIMIT for r in gate["rows"])
    assert all(r["recovery_lower"] <= r["recovery"] <= r["recovery_upper"] for r in gate["rows"])
    assert [r["metric"] for r in failed + unsure] == ["forge_prose/byte_perplexity,none"]
    assert {r["metric"]: r for r in gate["rows"]}["forge_mc/acc,none"]["threshold"] == 0.5
    assert f"Verdict: **{expected.upper()}**" in (out / "gate_report.md").read_text()
    manifest = read_manifest(out, "evaluate")
    assert set(manifest["inputs"]) == {"model", "calibrate", "baseline"}
    assert manifest["details"]["simulation"]["routed"] == {"nvfp4": 0, "mxfp4": 0}  # FP8: ModelOpt's own CPU code
    # The FP8 KV cache computes what the target's engine computes (the contracts: TensorRT-LLM on H200,
    # k/v scales ignored), and the metrics say whose numerics they are.
    kv = manifest["details"]["simulation"]["kv_cache"]
    assert (kv["numerics"], kv["scale"], kv["rounding"]) == ("trtllm", "one", "nearest") and kv["routed"] > 0
    assert kv["numerics_of"] == {"numerics": "trtllm", "engine": "tensorrt-llm", "engine_version": "1.2.1", "gpu": "h200"}
    said = "FAILED" if expected == "fail" else "INCONCLUSIVE"
    assert f"accuracy gate {said} on forge_prose/byte_perplexity,none" in caplog.text
    assert "eval.strict: exit code 1" in caplog.text


def test_nvfp4_runs_through_the_reference_and_non_strict_exits_0(world, tmp_path):
    assert run_evaluate(world, "nvfp4", tmp_path) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["path"] == "simulated-cpu"
    assert metrics["simulation"]["applied"] is True
    assert metrics["simulation"]["routed"]["nvfp4"] > 0
    kpis = json.loads((tmp_path / "metrics" / "nvfp4.json").read_text())
    # default threshold 0.5 for every metric: the verdict follows the recoveries exactly
    recoveries = [g["recovery"] for g in json.loads((tmp_path / "out" / "gate_report.json").read_text())["rows"]]
    assert kpis["gate_pass"] == int(all(r >= 0.5 for r in recoveries))
    assert kpis["min_recovery"] == round(min(recoveries), 6)


# ---------------------------------------------------------------------------- refusals


def test_missing_baseline_is_refused(world, tmp_path, no_model_work):
    with pytest.raises(StageInputError) as err:
        run_evaluate(world, "fp8", tmp_path, baseline_dir=tmp_path / "no-baseline")
    assert str(err.value).startswith(f"{tmp_path / 'no-baseline'}: no baseline evaluation here: the quantized model's "
                                     "scores would have nothing to be compared with. Fix: run it first: "
                                     "dvc repro baseline@tiny-llama (or forge baseline ")
    assert not (tmp_path / "out").exists()


def test_baseline_on_another_suite_is_refused(world, tmp_path, no_model_work):
    baseline = tmp_path / "baseline"
    shutil.copytree(world["baseline"], baseline)

    def other_suite(d: Path) -> None:
        metrics = json.loads((d / "metrics.json").read_text())
        (d / "metrics.json").write_text(json.dumps({**metrics, "suite": "other"}))

    rewrite(baseline, "baseline", other_suite)
    with pytest.raises(StageInputError) as err:
        run_evaluate(world, "fp8", tmp_path, baseline_dir=baseline)
    assert str(err.value).startswith(
        f"{baseline / 'metrics.json'}: the baseline ran eval suite 'other', but {world['recipes']['fp8']} gates on "
        f"eval.suite 'smoke'. Fix: name the same suite in {world['models'] / 'tiny-llama' / 'model.yaml'} (eval.suite)")


def test_baseline_with_another_limit_is_refused(world, tmp_path, no_model_work):
    with pytest.raises(StageInputError, match=r"the baseline ran suite 'smoke' with other settings "
                                              r"\(limit: baseline 4, now 2\)\. Fix: evaluate with the baseline's settings"):
        run_evaluate(world, "fp8", tmp_path, limit=2)


def test_quantized_checkpoint_without_tokenizer_is_refused(world, tmp_path, no_model_work):
    quantized = tmp_path / "quantized"
    shutil.copytree(world["quantized"]["fp8"], quantized)
    rewrite(quantized, "calibrate", lambda d: [(d / "checkpoint" / n).unlink(missing_ok=True)
                                               for n in ("tokenizer.json", "tokenizer_config.json")])
    with pytest.raises(StageInputError) as err:
        run_evaluate(world, "fp8", tmp_path, quantized_dir=quantized)
    assert str(err.value) == (
        f"{quantized / 'checkpoint'}: the quantized checkpoint has no tokenizer (tokenizer_config.json, tokenizer.json "
        "or tokenizer.model or vocab.json missing): it cannot be served or evaluated. Fix: re-run the calibrate stage: "
        "dvc repro calibrate@tiny-llama-fp8 (it saves the tokenizer beside the export).")


def test_missing_quant_state_is_refused(world, tmp_path, no_model_work):
    quantized = tmp_path / "quantized"
    shutil.copytree(world["quantized"]["fp8"], quantized)
    (quantized / "quant_state.pt").unlink()
    with pytest.raises(StageInputError) as err:
        run_evaluate(world, "fp8", tmp_path, quantized_dir=quantized)
    assert str(err.value) == (f"{quantized / 'quant_state.pt'}: missing: the fake-quant model cannot be rebuilt for "
                              "evaluation. Fix: re-run the calibrate stage: dvc repro calibrate@tiny-llama-fp8.")


def test_calibration_of_another_quant_section_is_refused(world, tmp_path, no_model_work):
    quantized = tmp_path / "quantized"
    shutil.copytree(world["quantized"]["fp8"], quantized)
    manifest = read_manifest(quantized, "calibrate")
    manifest["recipe"]["sections"]["quant"] = "0" * 64
    write_manifest(quantized, manifest)
    with pytest.raises(StageInputError, match=r"was made from another `quant` section of .*fp8.yaml \(digest 000000000000…, now .*\)\. "
                                              r"Fix: .*re-run it: dvc repro calibrate@tiny-llama-fp8"):
        run_evaluate(world, "fp8", tmp_path, quantized_dir=quantized)


def test_another_recipes_calibration_is_refused(world, tmp_path, no_model_work):
    with pytest.raises(StageInputError, match=r"was made for recipe 'tiny-llama-nvfp4', not 'tiny-llama-fp8'"):
        run_evaluate(world, "fp8", tmp_path, quantized_dir=world["quantized"]["nvfp4"])


def test_gate_override_for_an_unknown_metric_is_refused_before_model_work(world, tmp_path, no_model_work):
    path = write_recipe(world["models"], "typo", overrides={"forge_mc/acc": 0.99})
    with pytest.raises(RecipeError) as err:
        run_evaluate(world, "fp8", tmp_path, recipe_path=path)
    assert str(err.value).startswith(f"{path}: eval.gates.overrides: no metric 'forge_mc/acc' in eval suite 'smoke'. "
                                     "Fix: use the suite's metric keys: forge_mc/acc,none, ")


def test_cli_verbs_are_registered(world, tmp_path, no_model_work, capsys):
    from pipeline import cli

    code = cli.main(["evaluate", str(world["recipes"]["fp8"]), "--model", str(world["model_dir"]),
                     "--quantized", str(world["quantized"]["fp8"]), "--baseline", str(tmp_path / "none"),
                     "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
                     "--eval-dir", str(world["eval_dir"])])
    assert code == 2
    assert "no baseline evaluation here" in capsys.readouterr().err
    args = cli.build_parser(cli.stage_verbs()).parse_args(["baseline", "m.yaml", "--model", "d", "--out", "o", "--limit", "3"])
    assert (args.func.__wrapped__, args.func.spec) == (baseline_stage.run_baseline, baseline_stage.BaselineArgs)
    assert (args.model_yaml, args.limit, args.eval_dir) == (Path("m.yaml"), 3, Path("eval"))


def test_exit_code_of_each_verdict(caplog):
    import logging as _logging

    from pipeline.accuracy.gates import GatePolicy, evaluate_gates
    from pipeline.accuracy.stats import Interval
    from pipeline.stages.evaluate import verdict_exit_code

    class _Recipe:  # what verdict_exit_code reads
        def __init__(self, strict, inconclusive):
            self.id = "m-fp8"
            self.spec = type("S", (), {"eval": type("E", (), {"strict": strict, "gates": type(
                "G", (), {"inconclusive": inconclusive})()})()})()

    metric = "forge_mc/acc,none"

    def report(interval, inconclusive="refuse"):
        return evaluate_gates({metric: 0.7}, {metric: 0.7 * interval.point}, {metric: "higher"},
                              GatePolicy(0.95, inconclusive=inconclusive), intervals={metric: interval})

    unsure = Interval(0.96, 0.94, 0.98, 1397)
    with caplog.at_level(_logging.WARNING, logger="pipeline.stages.evaluate"):
        assert verdict_exit_code(_Recipe(True, "refuse"), report(unsure)) == 1
        assert verdict_exit_code(_Recipe(True, "publish"), report(unsure, "publish")) == 0
        assert verdict_exit_code(_Recipe(False, "refuse"), report(unsure)) == 0
        assert verdict_exit_code(_Recipe(True, "refuse"), report(Interval(0.99, 0.97, 1.0, 1397))) == 0
        assert verdict_exit_code(_Recipe(True, "refuse"), report(Interval(0.9, 0.88, 0.92, 1397))) == 1
    assert ("m-fp8: accuracy gate INCONCLUSIVE on forge_mc/acc,none (recovery 0.9600 [0.9400, 0.9800] interval "
            "straddles 0.95); publish will refuse it (eval.gates.inconclusive: refuse) (eval.strict: exit code 1)") \
        in caplog.text
    assert "publish ships it (eval.gates.inconclusive: publish)" in caplog.text
