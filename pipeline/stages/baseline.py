"""Stage `baseline`: lm-eval accuracy of the unquantized model, once per model, on its model.yaml's
eval suite; every quantized recipe of the model is gated against it (pipeline/stages/evaluate.py).

Out (`--out`): `metrics.json` (the suite result, the suite's definition, how it ran), `samples.json`
(the per-document results the gates' paired bootstrap pairs with) and `manifest.json`.
  unquantized-<device>   the download stage's checkpoint, scored in memory.
  `--serve`              served with the engine that runs it here (vLLM CPU, trtllm-serve) and scored
                         through lm-eval's local-completions model (path served-<engine>); where no
                         engine here runs it, "not served here: <reason>" is recorded (exit 0).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.accuracy.evaluation_args import ServeArgs, SuiteArgs
from pipeline.accuracy.evaluation_inputs import check_model_dir
from pipeline.accuracy.evaluation_outputs import METRICS_FILE, json_digest, suite_metrics, write_documents
from pipeline.accuracy.scoring import score_unquantized
from pipeline.accuracy.served_scoring import (
    ServeOptions,
    engine_here,
    engine_log_path,
    record_not_served,
    serve_and_score,
)
from pipeline.accuracy.suites import EVAL_DIR, load_eval_suite
from pipeline.core.cliargs import add_verb, arg, included, run_with
from pipeline.core.files import Timer, staged_output, write_json
from pipeline.core.layout import CHECKPOINT_DIR
from pipeline.handoff.kpis import TIMINGS_HELP, write_timings
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.recipe.loading import load_model

log = logging.getLogger(__name__)

EXAMPLE = """example:
  forge baseline recipes/smollm2-135m-instruct/model.yaml --model data/models/smollm2-135m-instruct \\
      --out data/eval/smollm2-135m-instruct-baseline
"""


@dataclass(frozen=True, kw_only=True)
class BaselineArgs:
    """`forge baseline`'s arguments, declared once (pipeline/core/cliargs.py)."""

    model_yaml: Path = arg(positional="model_yaml", help="recipes/<model>/model.yaml")
    model: Path = arg(required=True, help="download stage output")
    out: Path = arg(required=True)
    serve: bool = arg(False, help="serve the model with the engine that runs it here (vLLM CPU, trtllm-serve) "
                                  "and score through it")
    timings: Path | None = arg(help=TIMINGS_HELP)
    engine: ServeArgs = included(ServeArgs)
    suite: SuiteArgs = included(SuiteArgs)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "baseline", run_with(BaselineArgs, run_baseline),
             help="lm-eval the unquantized model on its model.yaml's eval suite",
             epilog=EXAMPLE)


def run_baseline(args: BaselineArgs) -> int:
    serving = ServeOptions(args.engine.serve_python, args.engine.ready_timeout) if args.serve else None
    return main(args.model_yaml, args.model, args.out, args.suite.eval_dir, args.suite.limit, serving, args.timings,
                benchmarks_dir=args.suite.benchmarks)


def main(model_yaml: Path, model_dir: Path, out_dir: Path, eval_dir: Path = EVAL_DIR,
         limit: int | None = None, serving: ServeOptions | None = None, timings_path: Path | None = None,
         benchmarks_dir: Path | None = None) -> int:
    model = load_model(Path(model_yaml).parent)
    suite = load_eval_suite(model.spec.eval.suite, Path(eval_dir), limit, benchmarks_dir)
    inputs = {"model": check_model_dir(Path(model_dir), model)}
    timer = Timer()
    checkpoint = Path(model_dir) / CHECKPOINT_DIR
    if serving is None:
        scored = score_unquantized(checkpoint, suite, Path(eval_dir), timer)
    else:
        choice = engine_here(None, "auto", None, serving, checkpoint)
        if not choice.served:
            return record_not_served("baseline", model.name, Path(out_dir), None, suite, inputs, choice.reason)
        scored = serve_and_score(choice, checkpoint, checkpoint, suite, Path(eval_dir), timer, serving,
                                 engine_log_path(Path(out_dir)))
    result, path = scored.result, scored.path
    metrics = suite_metrics(result, suite, path, scored.device, scored.dtype)

    with staged_output(Path(out_dir)) as tmp:
        write_json(tmp / METRICS_FILE, metrics)
        write_documents(tmp, result)
        write_manifest(tmp, build_manifest(
            "baseline", model.name, tmp, inputs,
            details={"suite": suite.name, "suite_sha256": metrics["suite_sha256"], "path": path,
                     "metrics": result.metrics},
            recipe={"model": model.name, "path": str(Path(model_yaml)),
                    "sections": {"eval": json_digest(model.spec.eval.model_dump(mode="json"))}},
        ))
    write_timings(timings_path, timer.seconds, **(scored.measured or {}))
    log.info("%s baseline on %s (%s): %s in %.1f s", model.name, suite.name, path, _summary(result.metrics),
             timer.seconds["evaluate"])
    return 0


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
