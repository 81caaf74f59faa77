"""`forge build`: a TensorRT-LLM deployable bundle for one GPU SKU (one DVC stage per model x
format x GPU).

A bundle is the calibrate stage's unified checkpoint (hard-linked, not copied) plus what makes it
run well on one card: `llm_api_options.yaml` sized by the planner, the exact serve / benchmark
commands (and vLLM / SGLang equivalents), optionally a legacy TensorRT engine, and a manifest that
says whether it was load-tested. The bundle is staged in a temporary directory and renamed into
place at the end, so a failure never leaves half a bundle.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.cliargs import add_verb, arg, runner
from pipeline.core.errors import ForgeError, StageInputError
from pipeline.core.files import Timer, staged_output, write_json
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES, ComputeCapability
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.core.layout import CHECKPOINT_DIR, OPTIONS_FILE, QUANT_STATE_FILE
from pipeline.engines.checkpoint_check import compatibility_table
from pipeline.handoff.kpis import TIMINGS_HELP, write_kpis, write_timings
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.handoff.models import CalibrateDetails
from pipeline.handoff.reader import Opened, open_upstream
from pipeline.planning.validate import check_named_target
from pipeline.recipe.loading import Recipe, load_recipe
from pipeline.serving.serve_commands import serve_commands, serve_markdown, served_model_id
from pipeline.serving.trtllm import (
    LoadTestResult,
    LocalRuntime,
    build_legacy_engine,
    check_engine_environment,
    detect_runtime,
    not_run,
    run_load_test,
)
from pipeline.serving.trtllm_options import llm_api_options
from pipeline.sizing.plan import Plan

log = logging.getLogger(__name__)

COMMANDS_FILE = "commands.json"
SERVE_FILE = "SERVE.md"
LOAD_TEST_MODES = ("auto", "never", "require")

EXAMPLE = """example:
  forge build recipes/smollm2-135m-instruct/fp8.yaml --gpu h200 \\
      --quantized data/quantized/smollm2-135m-instruct-fp8 \\
      --out data/bundles/smollm2-135m-instruct-fp8-h200 \\
      --metrics metrics/build/smollm2-135m-instruct-fp8-h200.json
"""


# ---------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class BuildArgs:
    """`forge build`'s arguments, declared once (pipeline/core/cliargs.py); each field is a parameter of main."""

    recipe_path: Path = arg(positional="recipe", help="recipes/<model>/<variant>.yaml")
    gpu: str = arg(required=True, help="a target key of the recipe (a GPU of the catalog)")
    quantized_dir: Path = arg(required=True, flag="quantized", help="the calibrate stage's output directory")
    out_dir: Path = arg(required=True, flag="out", help="bundle directory (replaced atomically)")
    metrics_path: Path = arg(required=True, flag="metrics", help="flat JSON metrics for `dvc metrics show`")
    catalog_path: Path = arg(DEFAULT_CATALOG, flag="catalog", help="GPU catalog (default: %(default)s)")
    load_test: str = arg("auto", choices=LOAD_TEST_MODES,
                         help="auto: load-test when this machine has the target's GPU and tensorrt_llm; "
                              "require: fail otherwise; never: skip (default: %(default)s)")
    timings_path: Path | None = arg(flag="timings", help=TIMINGS_HELP)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_verb(subparsers, "build", runner(BuildArgs, main),
             help="TensorRT-LLM bundle for one GPU: checkpoint + planner-sized runtime options + commands",
             epilog=EXAMPLE)


# ---------------------------------------------------------------------------- the stage


def main(
    recipe_path: Path,
    gpu: str,
    quantized_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    catalog_path: Path = DEFAULT_CATALOG,
    load_test: str = "auto",
    timings_path: Path | None = None,
) -> Path:
    timer = Timer()
    recipe = load_recipe(Path(recipe_path))
    catalog = load_catalog(Path(catalog_path))
    plan = check_named_target(recipe, gpu, catalog)
    upstream = read_upstream(Path(quantized_dir), recipe)
    cc = catalog[gpu].cc
    engine = recipe.spec.build.engine
    runtime = detect_runtime()
    decision = decide_load_test(load_test, runtime, cc, engine, f"{recipe.path}: targets.{gpu}")
    if engine == "tensorrt":
        check_engine_environment(runtime, cc, f"{recipe.path}: build.engine")
    target = recipe.spec.targets[gpu]
    fmt, kv = recipe.spec.quant.format, recipe.spec.quant.kv_cache_dtype
    options = llm_api_options(plan, target, fmt, kv, engine)
    compatibility = [v.to_dict() for v in compatibility_table(upstream.checkpoint, gpu, cc)]
    commands = serve_commands(options, plan, served_model_id(recipe), engine_dir="engine" if engine == "tensorrt" else None,
                              engine_flags={r["engine"]: tuple(r["flags"]) for r in compatibility if r["loads"]})

    with staged_output(Path(out_dir)) as stage:
        with timer("link_checkpoint"):
            linked = link_tree(upstream.checkpoint, stage / CHECKPOINT_DIR)
        write_options(stage / OPTIONS_FILE, options, recipe, gpu)
        write_json(stage / COMMANDS_FILE, commands.to_json())
        (stage / SERVE_FILE).write_text(serve_markdown(recipe.artifact_name(gpu), commands, plan, compatibility))
        if engine == "tensorrt":
            with timer("engine"):
                build_legacy_engine(upstream.base_model_dir(), upstream.quant_state, stage, options, fmt, target.tp)
        with timer("load_test"):
            result = run_load_test(stage / CHECKPOINT_DIR, options) if decision.run else not_run(decision.reason)
        details = bundle_details(recipe, gpu, plan, options, upstream, linked, result, catalog[gpu].name)
        details["compatibility"] = compatibility
        manifest = build_manifest(
            "build", recipe.artifact_name(gpu), stage,
            inputs={"quantized": upstream.opened.input_entry()}, details=details,
            recipe=recipe.provenance("quant", f"targets.{gpu}", "build"),
        )
        write_manifest(stage, manifest)
    write_kpis(Path(metrics_path), "build", metrics(plan, linked, result))
    write_timings(timings_path, timer.seconds)
    log.info("bundle %s: %s, load_tested=%s", recipe.artifact_name(gpu), out_dir, result.tested)
    return Path(out_dir)


# ---------------------------------------------------------------------------- checks before writing


@dataclass(frozen=True)
class Upstream:
    """The calibrate stage's output, verified."""

    opened: Opened[CalibrateDetails]
    checkpoint: Path
    quant_state: Path
    quant_algo: str
    kv_cache_quant_algo: str | None

    @property
    def modelopt_version(self) -> str | None:
        return self.opened.envelope.tools.get("nvidia-modelopt")

    def base_model_dir(self) -> Path:
        """The unquantized model the calibration ran on (the legacy engine path restores it)."""
        entry = self.opened.input_of_stage("download")
        if entry is not None:
            return Path(entry.path)
        raise StageInputError(
            str(self.opened.path / "manifest.json"),
            "no download-stage input recorded: the base model cannot be found for the engine export.",
            "re-run the calibrate stage (it records its model input).",
        )


def read_upstream(quantized_dir: Path, recipe: Recipe) -> Upstream:
    """Read and verify the calibrate output: made for this recipe's quant section, in its format."""
    opened = open_upstream(quantized_dir, "calibrate", recipe, ("quant",),
                           rerun=f"pass --quantized data/quantized/{recipe.id}, or re-run it: dvc repro calibrate@{recipe.id}")
    checkpoint = quantized_dir / CHECKPOINT_DIR
    quant_config_path = checkpoint / "hf_quant_config.json"
    if not quant_config_path.is_file():
        raise StageInputError(str(quant_config_path), "missing: not a ModelOpt unified checkpoint.",
                              "re-run the calibrate stage (its export writes hf_quant_config.json).")
    try:
        quantization = json.loads(quant_config_path.read_text()).get("quantization") or {}
    except json.JSONDecodeError as exc:
        raise StageInputError(str(quant_config_path), f"not valid JSON ({exc}).", "re-run the calibrate stage.") from None
    from pipeline.quant.algorithms import allowed_quant_algos

    algo = str(quantization.get("quant_algo"))
    fmt = FORMATS[recipe.spec.quant.format]
    allowed = allowed_quant_algos(recipe.spec.quant)
    if algo.lower() not in {str(a).lower() for a in allowed}:
        raise StageInputError(
            str(quant_config_path),
            f"quant_algo is {algo!r}, but {recipe.path} asks for {fmt.name} (quant_algo {' or '.join(map(repr, allowed))}).",
            f"pass the calibrate output of this recipe (data/quantized/{recipe.id}), or re-run its calibrate stage.",
        )
    kv_algo = quantization.get("kv_cache_quant_algo")
    expected_kv = KV_CACHE_DTYPES[recipe.spec.quant.kv_cache_dtype].kv_cache_quant_algo
    if (str(kv_algo).upper() if kv_algo else None) != (expected_kv.upper() if expected_kv else None):
        raise StageInputError(
            str(quant_config_path),
            f"kv_cache_quant_algo is {kv_algo!r}, but the recipe's kv_cache_dtype "
            f"{recipe.spec.quant.kv_cache_dtype} needs {expected_kv!r} (the KV scales come from calibration).",
            "re-run the calibrate stage with this recipe.",
        )
    return Upstream(opened, checkpoint, quantized_dir / QUANT_STATE_FILE, algo, kv_algo)


@dataclass(frozen=True)
class LoadTestDecision:
    run: bool
    reason: str | None


def decide_load_test(mode: str, runtime: LocalRuntime, cc: ComputeCapability, engine: str, where: str) -> LoadTestDecision:
    if mode not in LOAD_TEST_MODES:
        raise ForgeError("--load-test", f"unknown mode {mode!r}.", f"use one of {', '.join(LOAD_TEST_MODES)}.")
    if mode == "never":
        return LoadTestDecision(False, "skipped: --load-test never")
    if engine == "tensorrt":
        missing = ["a PyTorch-backend bundle (the load test uses the LLM API's PyTorch backend; this one is an engine)"]
    else:
        missing = runtime.missing_for(cc)
    if not missing:
        return LoadTestDecision(True, None)
    reason = f"not run: this machine lacks {', '.join(missing)}"
    if mode == "require":
        raise ForgeError(
            where,
            f"a load test is required, but this machine lacks {', '.join(missing)}.",
            f"run on a GPU node of compute capability {cc} with tensorrt_llm installed "
            "(NGC container nvcr.io/nvidia/tensorrt-llm/release), or pass --load-test auto.",
        )
    log.info("load test %s", reason)
    return LoadTestDecision(False, reason)


# ---------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class LinkedTree:
    files: int
    bytes: int
    method: str  # "hardlink", "copy" or "mixed"


def link_tree(src: Path, dst: Path) -> LinkedTree:
    """Hard-link every file of src into dst (same inode: the bundle costs no second copy of the
    weights, and DVC's cache links behave the same way). Across filesystems a hard link is
    impossible (EXDEV), so fall back to a copy and say so."""
    methods: set[str] = set()
    count = total = 0
    for path in sorted(src.rglob("*")):
        if path.is_symlink():
            raise StageInputError(str(path), "symbolic links are not allowed in a checkpoint.", "re-run the calibrate stage.")
        if not path.is_file():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
            methods.add("hardlink")
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            log.warning("cannot hard-link %s into %s (%s): copying instead", path, dst, exc.strerror)
            shutil.copy2(path, target)
            methods.add("copy")
        count += 1
        total += path.stat().st_size
    if count == 0:
        raise StageInputError(str(src), "the checkpoint directory is empty.", "re-run the calibrate stage.")
    return LinkedTree(count, total, methods.pop() if len(methods) == 1 else "mixed")


def write_options(path: Path, options: dict[str, Any], recipe: Recipe, gpu: str) -> None:
    header = (
        f"# TensorRT-LLM LLM-API options for {recipe.artifact_name(gpu)}, sized by the forge planner\n"
        f"# (forge plan {recipe.path}). Generated by `forge build`; edit the recipe, not this file.\n"
        f"# Use: trtllm-serve checkpoint --extra_llm_api_options {path.name}\n"
    )
    path.write_text(header + yaml.safe_dump(options, sort_keys=False))


def bundle_details(recipe: Recipe, gpu: str, plan: Plan, options: dict[str, Any], upstream: Upstream,
                   linked: LinkedTree, result: LoadTestResult, gpu_name: str) -> dict[str, Any]:
    load = result.to_json()
    load["predicted_kv_capacity_tokens"] = plan.kv_capacity_tokens
    if result.runtime_kv_capacity_tokens is not None and plan.kv_capacity_tokens:
        load["runtime_over_predicted"] = round(result.runtime_kv_capacity_tokens / plan.kv_capacity_tokens, 4)
    return {
        "model": recipe.model.name,
        "format": recipe.spec.quant.format,
        "kv_cache_dtype": recipe.spec.quant.kv_cache_dtype,
        "gpu": gpu,
        "gpu_name": gpu_name,
        "compute_capability": plan.inputs["compute_capability"],
        "tp": plan.inputs["tp"],
        "engine": recipe.spec.build.engine,
        "made_for": {
            "tensorrt_llm": recipe.spec.build.tensorrt_llm_version,
            "nvidia-modelopt": upstream.modelopt_version,
        },
        "quant_algo": upstream.quant_algo,
        "kv_cache_quant_algo": upstream.kv_cache_quant_algo,
        "checkpoint": {"files": linked.files, "bytes": linked.bytes, "linked": linked.method},
        "llm_api_options": options,
        "plan": plan.to_json(),
        "load_tested": result.tested,
        "load_test": load,
    }


def metrics(plan: Plan, linked: LinkedTree, result: LoadTestResult) -> dict[str, Any]:
    """The numbers the build KPIs are chosen from (pipeline/handoff/kpis.py). `predicted_*` come from the planner's
    arithmetic and its model of the run (priced at that run), `ceiling_*` from the roofline (upper bounds);
    `checkpoint_bytes` is measured on disk; `runtime_*` only exists after a load test."""
    return {
        "predicted_weights_bytes": plan.weights_bytes,
        "predicted_weights_bytes_per_gpu": plan.weights_bytes_per_gpu,
        "predicted_kv_capacity_tokens": plan.kv_capacity_tokens,
        "predicted_max_batch_at_seq_len": plan.max_batch_at_seq_len,
        "ceiling_decode_batch": plan.roofline.get("decode_batch"),
        "ceiling_decode_tok_s_batch1": plan.decode_tok_s_batch1,
        "ceiling_decode_tok_s_max_batch": plan.decode_tok_s_max_batch,
        "ceiling_prefill_tok_s": plan.roofline.get("prefill_tok_s"),
        "predicted_output_tok_s": plan.throughput.get("predicted_output_tok_s"),
        "predicted_joules_per_token": plan.joules_per_token,
        "predicted_usd_per_mtok": plan.usd_per_mtok,
        "checkpoint_bytes": linked.bytes,
        "load_tested": result.tested,
        "runtime_kv_capacity_tokens": result.runtime_kv_capacity_tokens,
    }
