"""Stage `throughput`: how fast one bundle serves on its target GPU, and what a token costs.

Always: the throughput model's prediction of trtllm-bench's offline run for the target
(`predicted_output_tok_s`, per GPU, per user, TTFT, TPOT, the limits and bounds; pipeline/sizing/perfmodel.py),
J/token and $/Mtok at TDP from it (the one price basis), and the roofline's decode/prefill ceilings
beside it (keys `ceiling_*`, upper bounds, never priced), with the rates and serving shape they came from.
Per-user tok/s and TTFT include queue wait: trtllm-bench's offline run submits every request at once
and times each from submission, so below full concurrency most of a request's time is waiting
(`predicted_latency_includes`).
Only on the target GPU with TensorRT-LLM's `trtllm-bench` on PATH: a throughput run (streamed, for
TTFT/TPOT percentiles) and a latency run on a dataset generated for the recipe's input/output
lengths, NVML power sampled while they run, and measured / predicted. Elsewhere `measured` is null
and `measured_reason` says why; nothing is estimated in its place.

Out (`--out`): `throughput.json` (every number above, read by the report stage) and `manifest.json`;
the throughput KPIs of pipeline/handoff/kpis.py at `--metrics` for `dvc metrics show`. The bench dataset
and trtllm-bench reports go to `--workdir` (default: a temporary directory, removed afterwards).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.cliargs import add_verb, arg, runner
from pipeline.core.errors import ForgeError, RecipeError, StageInputError
from pipeline.core.files import staged_output, write_json
from pipeline.core.formats import FORMATS
from pipeline.core.gpus import DEFAULT_CATALOG, GpuSpec, load_catalog
from pipeline.core.layout import CHECKPOINT_DIR, OPTIONS_FILE, THROUGHPUT_FILE
from pipeline.core.local_gpu import LocalGpu, detect_local_gpu
from pipeline.handoff.kpis import write_kpis
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.handoff.models import BuildDetails
from pipeline.handoff.reader import Opened, open_upstream
from pipeline.measure.power import energy_and_cost
from pipeline.measure.probe import DEFAULT_MEASURED_DIR, load_ceilings
from pipeline.planning.targets import plan_target
from pipeline.planning.validate import Definitions, require_target, validate_recipe
from pipeline.recipe.loading import Recipe, load_recipe
from pipeline.serving.serve_commands import served_model_id
from pipeline.sizing.plan import Plan
from pipeline.sizing.roofline import Ceilings

log = logging.getLogger(__name__)

RUN_MODES = ("auto", "never", "require")
# The memory side of the plan the bundle's llm_api_options were sized from; ceilings (datasheet or
# probe) only move the roofline, so these must match exactly or the bundle is stale.
PLAN_AGREEMENT_KEYS = ("weights_bytes_per_gpu", "kv_capacity_tokens", "max_batch_at_seq_len", "decode_batch")
PERCENTILES = ("p50", "p90", "p99")
CEILING_IS = ("roofline upper bounds (pipeline/sizing/roofline.py), not a prediction and never priced; "
              "predicted_output_tok_s is the prediction of the run")
QUEUE_WAIT = ("queue wait: predicted_output_tok_s_per_user and predicted_ttft_ms are timed from submission, and "
              "trtllm-bench's offline run submits every request at once (pipeline/sizing/perfmodel.py)")
DEFAULT_NUM_REQUESTS = 512
BENCH_SEED = 0

EXAMPLE = """examples:
  forge throughput recipes/smollm2-135m-instruct/fp8.yaml --gpu h200 \\
      --bundle data/bundles/smollm2-135m-instruct-fp8-h200 \\
      --out data/throughput/smollm2-135m-instruct-fp8-h200 \
      --metrics metrics/throughput/smollm2-135m-instruct-fp8-h200.json
  forge throughput ... --price 2.10 --run require   # on the H200 node, with trtllm-bench
"""


# ---------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class ThroughputArgs:
    """`forge throughput`'s arguments, declared once (pipeline/core/cliargs.py); each field is a parameter of main."""

    recipe_path: Path = arg(positional="recipe", help="recipes/<model>/<variant>.yaml")
    gpu: str = arg(required=True, help="a target key of the recipe")
    bundle_dir: Path = arg(required=True, flag="bundle", help="build stage output for this target")
    out_dir: Path | None = arg(required=True, flag="out", help="output directory (throughput.json + manifest.json)")
    metrics_path: Path = arg(required=True, flag="metrics", help="the KPIs for `dvc metrics show`")
    price: float | None = arg(help="USD per GPU-hour (default: the target's price_per_gpu_hour_usd)")
    run_mode: str = arg("auto", flag="run", choices=RUN_MODES,
                        help="auto: benchmark when this machine has the target GPU and trtllm-bench; "
                             "require: fail otherwise; never: predicted only (default: %(default)s)")
    num_requests: int = arg(DEFAULT_NUM_REQUESTS, help="bench dataset size (default: %(default)s)")
    workdir: Path | None = arg(help="keep the bench dataset and trtllm-bench reports here")
    measured_dir: Path = arg(DEFAULT_MEASURED_DIR, help="`forge probe` results; a probe of the target GPU replaces "
                                                        "datasheet ceilings (default: %(default)s)")
    catalog_path: Path = arg(DEFAULT_CATALOG, flag="catalog")


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "throughput", runner(ThroughputArgs, main),
             help="predicted (always) and measured (on the target GPU) tok/s, J/token, $/Mtok",
             epilog=EXAMPLE)


# ---------------------------------------------------------------------------- the stage


def main(recipe_path: Path, gpu: str, bundle_dir: Path, metrics_path: Path, price: float | None = None,
         run_mode: str = "auto", num_requests: int = DEFAULT_NUM_REQUESTS, workdir: Path | None = None,
         measured_dir: Path = DEFAULT_MEASURED_DIR, catalog_path: Path = DEFAULT_CATALOG,
         out_dir: Path | None = None) -> int:
    recipe = load_recipe(Path(recipe_path))
    catalog = load_catalog(Path(catalog_path))
    plans = validate_recipe(recipe, catalog, Definitions())
    require_target(recipe, gpu)
    pricing = price_per_gpu_hour(recipe, gpu, price)
    ceilings = ceilings_for(recipe, gpu, catalog[gpu], Path(measured_dir))
    plan = plan_at(ceilings, plans[gpu], recipe, gpu, catalog)
    bundle = check_bundle(Path(bundle_dir), recipe, gpu, plan)
    decision = decide_measurement(run_mode, detect_local_gpu({k: s.nvml_names for k, s in catalog.items()}),
                                  gpu, catalog[gpu], recipe.spec.targets[gpu].tp, shutil.which("trtllm-bench"))

    metrics = predicted_metrics(recipe, gpu, plan, ceilings, catalog[gpu], pricing)
    metrics["bundle_manifest_sha256"] = bundle.digest
    if decision.run:
        metrics.update(measure(recipe, gpu, Path(bundle_dir), plan, catalog[gpu], pricing, num_requests, workdir))
    else:
        metrics.update(measured=None, measured_reason=decision.reason)
    if out_dir is not None:
        write_results(Path(out_dir), recipe, gpu, bundle, metrics)
    write_kpis(Path(metrics_path), "throughput", metrics)
    log.info("%s: predicted %s output tok/s at batch %s (%s rates); measured: %s", recipe.artifact_name(gpu),
             _fmt(metrics.get("predicted_output_tok_s")), plan.roofline.get("decode_batch"), ceilings.source,
             _fmt(metrics.get("measured_output_tok_s")) if decision.run else decision.reason)
    return 0


# ---------------------------------------------------------------------------- checks and inputs


def write_results(out_dir: Path, recipe: Recipe, gpu: str, bundle: Opened[BuildDetails], metrics: dict[str, Any]) -> None:
    with staged_output(out_dir) as tmp:
        write_json(tmp / THROUGHPUT_FILE, metrics)
        write_manifest(tmp, build_manifest("throughput", recipe.artifact_name(gpu), tmp,
                                           {"bundle": bundle.input_entry()},
                                           recipe=recipe.provenance(f"targets.{gpu}")))


@dataclass(frozen=True)
class Pricing:
    usd_per_gpu_hour: float | None
    source: str | None  # where the price came from; None when none was given


def price_per_gpu_hour(recipe: Recipe, gpu: str, override: float | None) -> Pricing:
    if override is not None:
        if override <= 0:
            raise RecipeError("--price", f"must be > 0 USD per GPU-hour, got {override}.", "pass a positive price.")
        return Pricing(override, "--price")
    recipe_price = recipe.spec.targets[gpu].price_per_gpu_hour_usd
    if recipe_price is None:
        return Pricing(None, None)
    return Pricing(recipe_price, f"{recipe.path}: targets.{gpu}.price_per_gpu_hour_usd")


def ceilings_for(recipe: Recipe, gpu: str, spec: GpuSpec, measured_dir: Path) -> Ceilings:
    """A `forge probe` of this GPU when one exists for the format's GEMM dtype, else the datasheet
    (the same default pipeline.sizing.plan.plan uses, spelled out so the metrics can show it)."""
    compute_dtype = FORMATS[recipe.spec.quant.format].compute_dtype
    measured = load_ceilings(gpu, compute_dtype, measured_dir)
    return measured or Ceilings(spec.memory_bandwidth_bytes_per_s, spec.peak_flops(compute_dtype), "datasheet")


def plan_at(ceilings: Ceilings, validated: Plan, recipe: Recipe, gpu: str, catalog: dict[str, GpuSpec]) -> Plan:
    """The target's plan at these ceilings: the one validation made (datasheet rates), or, where
    `forge probe` measured this GPU, re-planned at the measured rates (only the roofline and the
    predicted run move; the runtime limits and memory come from datasheet rates either way)."""
    return validated if ceilings.source == "datasheet" else plan_target(recipe, gpu, catalog, ceilings)


def check_bundle(bundle_dir: Path, recipe: Recipe, gpu: str, plan: Plan) -> Opened[BuildDetails]:
    """The bundle is intact, is this recipe's target, and was sized by the plan made now."""
    opened: Opened[BuildDetails] = open_upstream(bundle_dir, "build")
    made_for = (opened.recipe_id, opened.details.gpu)
    if made_for != (recipe.id, gpu):
        raise StageInputError(str(bundle_dir), f"is the bundle of {made_for[0]!r} for {made_for[1]!r}, not of "
                              f"{recipe.id!r} for {gpu!r}.", f"pass --bundle data/bundles/{recipe.artifact_name(gpu)}.")
    sized, now = opened.details.plan, plan.to_json()
    differs = [f"{k} {getattr(sized, k)} (bundle) vs {now.get(k)} (now)" for k in PLAN_AGREEMENT_KEYS
               if getattr(sized, k) != now.get(k)]
    if differs:
        raise StageInputError(str(bundle_dir / "manifest.json"),
                              f"the bundle was sized by another plan than {recipe.path} gives now: {'; '.join(differs)}.",
                              f"re-run its build: dvc repro build@{recipe.artifact_name(gpu)}")
    return opened


@dataclass(frozen=True)
class MeasureDecision:
    run: bool
    reason: str | None


def decide_measurement(mode: str, local: LocalGpu | None, gpu: str, spec: GpuSpec, tp: int,
                       trtllm_bench: str | None) -> MeasureDecision:
    """Measure only on the target SKU itself: an H100 shares the H200's compute capability but not
    its memory bandwidth, so its tok/s would be labelled with the wrong GPU."""
    if mode not in RUN_MODES:
        raise ForgeError("--run", f"unknown mode {mode!r}.", f"use one of {', '.join(RUN_MODES)}.")
    if mode == "never":
        return MeasureDecision(False, "not run: --run never")
    missing = []
    if local is None:
        missing.append(f"a {spec.name} (no NVIDIA GPU visible through NVML)")
    elif local.sku != gpu:
        missing.append(f"a {spec.name} (this machine has {local.name})")
    elif local.count < tp:
        missing.append(f"{tp} x {spec.name} for TP {tp} (this machine has {local.count})")
    if trtllm_bench is None:
        missing.append("trtllm-bench on PATH (TensorRT-LLM)")
    if not missing:
        return MeasureDecision(True, None)
    reason = f"not run: this machine lacks {' and '.join(missing)}"
    if mode == "require":
        raise ForgeError(f"{gpu}: --run require", f"a measurement is required, but this machine lacks {' and '.join(missing)}.",
                         f"run on a {spec.name} node inside the NGC container nvcr.io/nvidia/tensorrt-llm/release, "
                         "or pass --run auto.")
    log.info("throughput measurement %s", reason)
    return MeasureDecision(False, reason)


# ---------------------------------------------------------------------------- numbers


def predicted_metrics(recipe: Recipe, gpu: str, plan: Plan, ceilings: Ceilings, spec: GpuSpec,
                      pricing: Pricing) -> dict[str, Any]:
    """The predicted run (`predicted_*`, priced) and the roofline's ceilings (`ceiling_*`), with their inputs."""
    tp = plan.inputs["tp"]
    out: dict[str, Any] = {
        "recipe": recipe.id, "target": recipe.artifact_name(gpu), "model": recipe.model.name,
        "format": recipe.spec.quant.format, "kv_cache_dtype": recipe.spec.quant.kv_cache_dtype, "gpu": gpu, "tp": tp,
        "ceilings_source": ceilings.source,
        "predicted_inputs": {
            "memory_bandwidth_bytes_per_s": ceilings.memory_bandwidth_bytes_per_s,
            "peak_flops": ceilings.peak_flops, "tdp_watts": spec.tdp_watts,
            **{k: plan.inputs[k] for k in ("max_input_len", "max_output_len", "seq_len", "concurrency", "max_num_tokens",
                                           "kv_cache_free_gpu_memory_fraction")},
        },
        "predicted_weights_bytes": plan.weights_bytes,
        "predicted_kv_capacity_tokens": plan.kv_capacity_tokens,
        "ceiling_decode_batch": plan.roofline.get("decode_batch"),
        "ceiling_decode_tok_s_batch1": plan.decode_tok_s_batch1,
        "ceiling_decode_tok_s_max_batch": plan.decode_tok_s_max_batch,
        "ceiling_decode_tok_s_per_user_max_batch": plan.roofline.get("decode_tok_s_per_user_max_batch"),
        "ceiling_decode_bound_max_batch": plan.roofline.get("decode_bound_max_batch"),
        "ceiling_prefill_tok_s": plan.roofline.get("prefill_tok_s"),
        "ceiling_is": CEILING_IS,
        "price_per_gpu_hour_usd": pricing.usd_per_gpu_hour,
        "price_source": pricing.source,
    }
    out.update(predicted_run(plan))
    tok_s = out.get("predicted_output_tok_s")
    if tok_s:  # J/token and $/Mtok of the predicted run, not of the ceiling
        energy = energy_and_cost(tok_s, None, spec.tdp_watts, tp, pricing.usd_per_gpu_hour)
        out.update({f"predicted_{k}": energy[k] for k in ("power_source", "joules_per_token", "gpu_hours_per_mtok",
                                                            "usd_per_mtok")})
    return out


def predicted_run(plan: Plan) -> dict[str, Any]:
    """trtllm-bench's offline run at the plan's limits, as the throughput model predicts it."""
    t = plan.throughput
    if not t:
        return {"predicted_output_tok_s": None}
    keys = ("predicted_output_tok_s", "predicted_output_tok_s_per_gpu", "predicted_output_tok_s_per_user",
            "predicted_ttft_ms", "predicted_tpot_ms")
    return {**{k: t[k] for k in keys}, "predicted_max_batch_size": t["max_batch_size"],
            "predicted_max_num_tokens": t["max_num_tokens"], "predicted_bound_prefill": t["bound_prefill"],
            "predicted_bound_decode": t["bound_decode"], "predicted_hardware_source": t["hardware_source"],
            "predicted_latency_includes": QUEUE_WAIT}


def measure(recipe: Recipe, gpu: str, bundle_dir: Path, plan: Plan, spec: GpuSpec, pricing: Pricing,
            num_requests: int, workdir: Path | None) -> dict[str, Any]:
    """trtllm-bench throughput + latency on a dataset of the recipe's lengths; flat measured keys."""
    if workdir is not None:
        return _measure_in(recipe, gpu, bundle_dir, plan, spec, pricing, num_requests, Path(workdir))
    with tempfile.TemporaryDirectory(prefix="forge-bench-") as tmp:
        return _measure_in(recipe, gpu, bundle_dir, plan, spec, pricing, num_requests, Path(tmp))


def _measure_in(recipe: Recipe, gpu: str, bundle_dir: Path, plan: Plan, spec: GpuSpec, pricing: Pricing,
                num_requests: int, work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from pipeline.measure.bench import NotRun, measured_summary, run_bench
    from pipeline.measure.bench_io import bench_commands, make_bench_dataset

    target = recipe.spec.targets[gpu]
    tokenizer = AutoTokenizer.from_pretrained(bundle_dir / CHECKPOINT_DIR)
    dataset = make_bench_dataset(tokenizer, num_requests, target.max_input_len, target.max_output_len, BENCH_SEED,
                                 work / "bench_dataset.jsonl")
    commands = bench_commands(served_model_id(recipe), bundle_dir / CHECKPOINT_DIR, dataset.path, bundle_dir / OPTIONS_FILE,
                              target.tp, work / "reports", work / "workspace",
                              concurrency=plan.roofline.get("decode_batch") or None, num_requests=num_requests)
    # measured / predicted: the throughput run against the model's prediction of that run; the
    # latency run (batch 1) against the batch-1 roofline ceiling, which the model does not predict.
    predicted = {"throughput": (plan.throughput or {}).get("predicted_output_tok_s") or plan.decode_tok_s_max_batch,
                 "latency": plan.decode_tok_s_batch1}
    runs: dict[str, Any] = {}
    for command in commands:
        outcome = run_bench(command)
        if isinstance(outcome, NotRun):
            runs[command.mode] = {"not_run": outcome.reason}
            continue
        runs[command.mode] = measured_summary(outcome, predicted[command.mode], spec.tdp_watts, pricing.usd_per_gpu_hour)
    # its file name, not its path: `work` is a fresh temporary directory unless --workdir is given
    dataset_info = {"path": dataset.path.name, "num_requests": dataset.num_requests, "input_len": dataset.input_len,
                    "output_len": dataset.output_len, "seed": dataset.seed, "sha256": dataset.sha256}
    return {"measured": {"dataset": dataset_info, **runs}, **flat_measured(runs)}


def flat_measured(runs: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys for `dvc metrics show`; percentiles in ms, throughputs in output tok/s."""
    out: dict[str, Any] = {}
    throughput = runs.get("throughput") or {}
    if "measured" in throughput:
        m = throughput["measured"]
        out.update(measured_output_tok_s=m["output_tok_s"], measured_output_tok_s_per_gpu=m["output_tok_s_per_gpu"],
                   measured_output_tok_s_per_user=m["output_tok_s_per_user"],
                   measured_request_throughput_req_s=m["request_throughput_req_s"],
                   measured_over_predicted=throughput["measured_over_predicted"])
        for name in ("ttft_ms", "tpot_ms"):
            for p in PERCENTILES:
                out[f"measured_{name}_{p}"] = (m.get(name) or {}).get(p)
        energy = throughput["energy"]
        out.update({f"measured_{k}": energy[k] for k in ("power_source", "watts", "joules_per_token",
                                                          "gpu_hours_per_mtok", "usd_per_mtok")})
    latency = runs.get("latency") or {}
    if "measured" in latency:
        m = latency["measured"]
        out.update(measured_latency_output_tok_s=m["output_tok_s"],
                   measured_latency_over_predicted_batch1=latency["measured_over_predicted"],
                   measured_latency_ttft_ms_p50=(m.get("ttft_ms") or {}).get("p50"),
                   measured_latency_tpot_ms_p50=(m.get("tpot_ms") or {}).get("p50"))
    not_run = {mode: r["not_run"] for mode, r in runs.items() if "not_run" in r}
    if not_run:
        out["measured_reason"] = "; ".join(f"{mode}: {why}" for mode, why in not_run.items())
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"
