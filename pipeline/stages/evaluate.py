"""Stage `evaluate`: lm-eval accuracy of a quantized model against its model's baseline
(pipeline/stages/baseline.py), judged by the recipe's gates.

Out (`--out`): `metrics.json`, `samples.json`, `gate_report.json`, `gate_report.md`, `manifest.json`;
and the evaluate KPIs of pipeline/handoff/kpis.py at `--metrics` for `dvc metrics show`. Two ways to
score the quantized model, named in the metrics' `path`:
  simulated-cpu / modelopt-cuda  the base checkpoint + the calibrate stage's quant state rebuilt
                                 as ModelOpt's fake-quant model in memory; on CPU the NVFP4/MXFP4
                                 quantizers run through forge's reference (ModelOpt's are CUDA-only).
                                 The exported checkpoint itself cannot be scored through transformers
                                 5.14, which drops ModelOpt's scales (seen here loading an FP8 export).
                                 (pipeline/accuracy/scoring.py)
  served-<engine>                `--bundle`: forge serves the bundle with the engine that runs it here
                                 (vLLM CPU, or trtllm-serve on the target GPU) and scores it through
                                 lm-eval's local-completions model; `--serve-url`: a server already
                                 running. Either way the server must serve this checkpoint's files
                                 (pipeline/serving/identity.py). Where no engine here runs the format,
                                 `--bundle` records "not served here: <reason>" (exit 0).
                                 (pipeline/accuracy/served_scoring.py)
A failed gate is a result, not a crash: every file is written, a WARNING names the failing
metrics, and the exit code is 0 unless the recipe sets `eval.strict` (then 1, after writing).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.accuracy.evaluation_args import ServeArgs, SuiteArgs
from pipeline.accuracy.evaluation_inputs import check_inputs, gate_policy
from pipeline.accuracy.evaluation_outputs import (
    GATE_MARKDOWN,
    METRICS_FILE,
    flat_metrics,
    gate_intervals,
    gate_markdown,
    suite_metrics,
    write_documents,
)
from pipeline.accuracy.gates import GateReport, evaluate_gates
from pipeline.accuracy.scoring import DEFAULT_KV_NUMERICS, KV_NUMERICS_CHOICES, resolve_kv_numerics, score_fake_quant
from pipeline.accuracy.served_scoring import (
    ServeOptions,
    baseline_not_served,
    check_bundle,
    engine_here,
    engine_log_path,
    record_not_served,
    score_served,
    serve_and_score,
    simulate_as_served,
)
from pipeline.accuracy.suites import EVAL_DIR, load_eval_suite
from pipeline.core.cliargs import add_verb, arg, included, run_with
from pipeline.core.errors import RecipeError
from pipeline.core.files import Timer, staged_output, write_json
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.core.layout import CHECKPOINT_DIR, GATE_REPORT_FILE
from pipeline.handoff.kpis import TIMINGS_HELP, write_kpis, write_timings
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.planning.validate import Definitions, validate_recipe
from pipeline.recipe.loading import Recipe, load_recipe

log = logging.getLogger(__name__)

EXAMPLE = """examples:
  forge evaluate recipes/smollm2-135m-instruct/fp8.yaml --model data/models/smollm2-135m-instruct \\
      --quantized data/quantized/smollm2-135m-instruct-fp8 --baseline data/eval/smollm2-135m-instruct-baseline \\
      --out data/eval/smollm2-135m-instruct-fp8 --metrics metrics/evaluate/smollm2-135m-instruct-fp8.json
  # on a GPU node, against the bundle served by `trtllm-serve checkpoint ...` (see the bundle's SERVE.md):
  forge evaluate ... --serve-url http://127.0.0.1:8000
"""


# ---------------------------------------------------------------------------- CLI


@dataclass(frozen=True, kw_only=True)
class EvaluateArgs:
    """`forge evaluate`'s arguments, declared once (pipeline/core/cliargs.py)."""

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
                                "engine that serves the target GPU per pipeline/engines/contracts.py; "
                                "pipeline/quant/kv_numerics.py engine_kv_numerics)")
    catalog: Path = arg(DEFAULT_CATALOG)
    timings: Path | None = arg(help=TIMINGS_HELP)
    engine: ServeArgs = included(ServeArgs)
    suite: SuiteArgs = included(SuiteArgs)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "evaluate", run_with(EvaluateArgs, run_evaluate),
             help="lm-eval a quantized model and gate it against the baseline",
             epilog=EXAMPLE)


def run_evaluate(args: EvaluateArgs) -> int:
    if args.bundle and args.serve_url:
        raise RecipeError("forge evaluate", "give --bundle (forge serves it) or --serve-url (already served), not both.",
                          "drop one.")
    serving = ServeOptions(args.engine.serve_python, args.engine.ready_timeout, args.bundle, args.served_device)
    return main(args.recipe, args.model, args.quantized, args.baseline, args.out, args.metrics,
                args.serve_url, args.served_model_name, args.catalog, args.suite.eval_dir, args.suite.limit,
                serving, args.kv_numerics, args.timings, benchmarks_dir=args.suite.benchmarks)


# ---------------------------------------------------------------------------- the stage


def main(recipe_path: Path, model_dir: Path, quantized_dir: Path, baseline_dir: Path, out_dir: Path,
         metrics_path: Path, serve_url: str | None = None, served_model_name: str = CHECKPOINT_DIR,
         catalog_path: Path = DEFAULT_CATALOG, eval_dir: Path = EVAL_DIR, limit: int | None = None,
         serving: ServeOptions | None = None, kv_numerics: str = DEFAULT_KV_NUMERICS,
         timings_path: Path | None = None, benchmarks_dir: Path | None = None) -> int:
    recipe = load_recipe(Path(recipe_path))
    catalog = load_catalog(Path(catalog_path))
    validate_recipe(recipe, catalog, Definitions(suites_dir=Path(eval_dir) / "suites"))
    kv_choice = resolve_kv_numerics(recipe, catalog, kv_numerics)
    suite = load_eval_suite(recipe.spec.eval.suite, Path(eval_dir), limit, benchmarks_dir)
    policy = gate_policy(recipe)
    bundle = check_bundle(serving.bundle, recipe) if serving and serving.bundle else None
    if bundle is not None:
        choice = engine_here(recipe.spec.quant.format, recipe.spec.quant.kv_cache_dtype, bundle.compute_capability,
                             serving, bundle.checkpoint)
        not_served = choice.reason if not choice.served else baseline_not_served(Path(baseline_dir))
        if not_served:
            return record_not_served("evaluate", recipe.id, Path(out_dir), Path(metrics_path), suite,
                                     {"bundle": bundle.input}, not_served, recipe)
    inputs = check_inputs(recipe, suite, Path(model_dir), Path(quantized_dir), Path(baseline_dir))
    timer = Timer()
    if bundle is not None:
        inputs.inputs["bundle"] = bundle.input
        scored = serve_and_score(choice, bundle.checkpoint, inputs.checkpoint, suite, Path(eval_dir), timer,
                                 serving, engine_log_path(Path(out_dir)), bundle.options_file)
        as_served = simulate_as_served(recipe, choice, inputs, suite, Path(eval_dir))
    elif serve_url:
        scored = score_served(serve_url, served_model_name, inputs, suite, Path(eval_dir), timer,
                              serving.served_device if serving else None)
    else:
        scored = score_fake_quant(inputs, suite, Path(eval_dir), timer, kv_choice)
    intervals, agreement = gate_intervals(inputs.baseline_metrics, inputs.baseline_documents, scored.result,
                                         suite, Path(out_dir))
    report = evaluate_gates(inputs.baseline_metrics, scored.result.metrics, suite.directions(), policy,
                            where=f"{recipe.path}: eval.gates", intervals=intervals, reported=suite.reported())

    metrics = suite_metrics(scored.result, suite, scored.path, scored.device, scored.dtype)
    metrics["simulation"] = scored.simulation
    metrics["agreement"] = agreement
    if bundle is not None:
        metrics["simulated_as_served"] = as_served
    with staged_output(Path(out_dir)) as tmp:
        write_json(tmp / METRICS_FILE, metrics)
        write_documents(tmp, scored.result)
        (tmp / GATE_REPORT_FILE).write_text(report.to_json() + "\n")
        (tmp / GATE_MARKDOWN).write_text(gate_markdown(recipe, scored.path, report))
        write_manifest(tmp, build_manifest(
            "evaluate", recipe.id, tmp, inputs.inputs,
            details={"suite": suite.name, "path": scored.path, "verdict": report.verdict,
                     "failed": [r.metric for r in report.failed], "simulation": scored.simulation,
                     **({"served": scored.result.extra["served"]} if "served" in scored.result.extra else {})},
            recipe=recipe.provenance("quant", "eval"),
        ))
    write_kpis(Path(metrics_path), "evaluate",
               flat_metrics(recipe, scored.result, scored.path, report, sum(timer.seconds.values()), agreement))
    write_timings(timings_path, timer.seconds, **(scored.measured or {}))
    return verdict_exit_code(recipe, report)


# ---------------------------------------------------------------------------- exit code


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
