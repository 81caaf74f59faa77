"""The evaluate stage's inputs, checked before any model is loaded: the download, the baseline (run on
that download and on exactly this suite, with its per-document results), the calibrate stage's
quantized checkpoint and quant state, and the recipe's gates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.accuracy.evaluation_outputs import METRICS_FILE
from pipeline.accuracy.gates import GatePolicy
from pipeline.accuracy.suites import EvalSuite, suite_definition
from pipeline.core.errors import StageInputError
from pipeline.core.layout import CHECKPOINT_DIR, MANIFEST_NAME, QUANT_STATE_FILE
from pipeline.handoff.manifest import manifest_digest, read_manifest
from pipeline.handoff.reader import open_upstream
from pipeline.recipe.loading import MODEL_FILE, Model, Recipe

# What AutoTokenizer needs: the config plus one vocabulary file (fast tokenizer, SentencePiece or BPE).
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def gate_policy(recipe: Recipe) -> GatePolicy:
    """The recipe's gates (validate_recipe already refused overrides for metrics the suite lacks)."""
    gates = recipe.spec.eval.gates
    return GatePolicy(gates.default_min_recovery, dict(gates.overrides), gates.default_max_increase,
                      dict(gates.max_increase), gates.inconclusive)


def check_model_dir(model_dir: Path, model: Model) -> dict[str, Any]:
    opened = open_upstream(model_dir, "download")
    if opened.envelope.subject != model.name:
        raise StageInputError(str(model_dir), f"holds model {opened.envelope.subject!r}, not {model.name!r}.",
                              f"pass --model data/models/{model.name}.")
    return opened.input_entry()


@dataclass(frozen=True)
class EvaluationInputs:
    """Verified inputs of the evaluate stage (`inputs`: how its manifest records each upstream output)."""

    model_dir: Path
    checkpoint: Path  # the quantized checkpoint (its tokenizer is the one that ships)
    quant_state: Path
    baseline_metrics: dict[str, float]
    inputs: dict[str, dict[str, Any]]
    baseline_documents: dict[str, Any] | None = None


def check_inputs(recipe: Recipe, suite: EvalSuite, model_dir: Path, quantized_dir: Path,
                 baseline_dir: Path) -> EvaluationInputs:
    """Everything evaluate reads exists, is intact and belongs together, before a model is loaded."""
    model_input_entry = check_model_dir(model_dir, recipe.model)
    baseline, baseline_input = check_baseline(baseline_dir, recipe, suite, model_dir)
    check_quantized_files(quantized_dir, recipe)
    calibrated = open_upstream(quantized_dir, "calibrate", recipe, ("quant",),
                               rerun=f"pass --quantized data/quantized/{recipe.id}, or re-run it: dvc repro calibrate@{recipe.id}")
    model_input = calibrated.envelope.inputs.get("model")
    if model_input is None or model_input.manifest_sha256 != manifest_digest(model_dir):
        # The quant state holds amax values of those weights; on other weights they are wrong.
        raise StageInputError(str(quantized_dir), f"was calibrated on another download of the model than {model_dir}.",
                              f"re-run it: dvc repro calibrate@{recipe.id}")
    return EvaluationInputs(model_dir, quantized_dir / CHECKPOINT_DIR, quantized_dir / QUANT_STATE_FILE, baseline,
                            {"model": model_input_entry, "calibrate": calibrated.input_entry(), "baseline": baseline_input},
                            read_documents(baseline_dir, f"dvc repro baseline@{recipe.model.name}"))


def check_baseline(baseline_dir: Path, recipe: Recipe, suite: EvalSuite,
                   model_dir: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """The baseline exists, was run on this model's download and on exactly this suite; returns its
    metrics and how the consumer records it as an input."""
    model = recipe.model.name
    rerun = f"dvc repro baseline@{model} (or forge baseline {recipe.model.directory / MODEL_FILE} --model {model_dir} --out {baseline_dir})"
    if not (baseline_dir / MANIFEST_NAME).is_file():
        raise StageInputError(str(baseline_dir), "no baseline evaluation here: the quantized model's scores would have "
                              "nothing to be compared with.", f"run it first: {rerun}.")
    opened = open_upstream(baseline_dir, "baseline")
    if opened.envelope.subject != model:
        raise StageInputError(str(baseline_dir), f"is the baseline of {opened.envelope.subject!r}, not of {model!r}.",
                              f"pass --baseline data/eval/{model}-baseline.")
    model_input = opened.envelope.inputs.get("model")
    if model_input is None or model_input.manifest_sha256 != manifest_digest(model_dir):
        raise StageInputError(str(baseline_dir), f"was evaluated on another download of {model} than {model_dir}.",
                              f"re-run it: {rerun}.")
    metrics = json.loads((baseline_dir / METRICS_FILE).read_text())
    if metrics.get("suite") != suite.name:
        raise StageInputError(
            str(baseline_dir / METRICS_FILE),
            f"the baseline ran eval suite {metrics.get('suite')!r}, but {recipe.path} gates on eval.suite {suite.name!r}.",
            f"name the same suite in {recipe.model.directory / MODEL_FILE} (eval.suite) and in {recipe.path}, "
            f"then re-run: {rerun}.",
        )
    differences = _differences(metrics.get("suite_definition") or {}, suite_definition(suite))
    if differences:
        raise StageInputError(
            str(baseline_dir / METRICS_FILE),
            f"the baseline ran suite {suite.name!r} with other settings ({'; '.join(differences)}).",
            f"evaluate with the baseline's settings (e.g. the same --limit), or re-run: {rerun}.",
        )
    return {k: float(v) for k, v in metrics["metrics"].items()}, opened.input_entry()


def check_quantized_files(quantized_dir: Path, recipe: Recipe) -> None:
    """The tokenizer ships with the quantized checkpoint (the bundle serves it); the quant state
    rebuilds the fake-quant model. Named here so the refusal says exactly what is missing."""
    rerun = f"re-run the calibrate stage: dvc repro calibrate@{recipe.id}"
    if not (quantized_dir / MANIFEST_NAME).is_file():
        read_manifest(quantized_dir, "calibrate")  # raises the standard "has not run" error
    checkpoint = quantized_dir / CHECKPOINT_DIR
    missing = [] if (checkpoint / TOKENIZER_CONFIG).is_file() else [TOKENIZER_CONFIG]
    if not any((checkpoint / name).is_file() for name in TOKENIZER_VOCABS):
        missing.append(" or ".join(TOKENIZER_VOCABS))
    if missing:
        raise StageInputError(str(checkpoint), f"the quantized checkpoint has no tokenizer ({', '.join(missing)} missing): "
                              "it cannot be served or evaluated.", f"{rerun} (it saves the tokenizer beside the export).")
    if not (quantized_dir / QUANT_STATE_FILE).is_file():
        raise StageInputError(str(quantized_dir / QUANT_STATE_FILE),
                              "missing: the fake-quant model cannot be rebuilt for evaluation.", rerun + ".")


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(before) | set(now))
    return [f"{k}: baseline {before.get(k)!r}, now {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def read_documents(baseline_dir: Path, rerun: str) -> dict[str, Any]:
    """The baseline's per-document results; a baseline from before gates had intervals has none."""
    from pipeline.accuracy.samples import SAMPLES_FILE

    path = Path(baseline_dir) / SAMPLES_FILE
    if not path.is_file():
        raise StageInputError(str(path), "missing: the baseline has no per-document results, so the gates' paired "
                              "bootstrap has nothing to pair with (it ran before forge kept them).", f"re-run it: {rerun}.")
    return json.loads(path.read_text())
