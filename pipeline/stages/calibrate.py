"""Stage `calibrate`: real ModelOpt post-training quantization of one model to one format.

Out (`--out`): `checkpoint/` (ModelOpt's unified HF checkpoint, verified after export),
`quant_state.pt` (ModelOpt state + calibrated quantizer buffers, to rebuild the fake-quant model
for evaluation), `recipe.resolved.yaml`, `manifest.json` whose `details.results` hold perplexity of
the BF16 baseline and of the quantized model on the same held-out tokens, time and peak memory.
Metrics (`--metrics`): the calibrate KPIs of pipeline/handoff/kpis.py.

Order matters: ModelOpt's export converts the in-memory weights to the packed format, after which
the model cannot run a forward pass (seen here with ModelOpt 0.47 on CPU), so perplexity and the state are taken first.

Placement: on CUDA the model is loaded as the recipe's calibration plan says (pipeline/sizing/placement.py:
the fewest GPUs of `calibration.node`, accelerate device map + max_memory, CPU offload if planned);
on CPU it is loaded whole unless `--cpu-memory-budget` asks for a dispatch within that many bytes,
the rest offloaded to disk. The manifest records the device map and the peak memory of each device.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.core.cliargs import add_verb, arg, runner
from pipeline.core.files import Timer, staged_output
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.core.heartbeat import Progress, heartbeat
from pipeline.core.layout import CALIBRATION_TENSORS_FILE, CHECKPOINT_DIR, QUANT_STATE_FILE
from pipeline.handoff.kpis import TIMINGS_HELP, write_kpis, write_timings
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.planning.validate import Definitions, validate_recipe
from pipeline.recipe.loading import Recipe, load_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CalibrateArgs:
    """`forge calibrate`'s arguments, declared once (pipeline/core/cliargs.py); each field is a parameter of main."""

    recipe_path: Path = arg(positional="recipe")
    model_dir: Path = arg(required=True, flag="model", help="download stage output")
    calibration_dir: Path = arg(required=True, flag="calibration", help="calibration-set stage output")
    out_dir: Path = arg(required=True, flag="out")
    metrics_path: Path = arg(required=True, flag="metrics")
    catalog_path: Path = arg(DEFAULT_CATALOG, flag="catalog")
    cpu_memory_budget: int | None = arg(
        metavar="BYTES", help="CPU only: dispatch the model within this much RAM, offloading the rest to disk")
    timings_path: Path | None = arg(flag="timings", help=TIMINGS_HELP)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "calibrate", runner(CalibrateArgs, main),
             help="quantize with ModelOpt, export the unified checkpoint, verify it",
             epilog="example: forge calibrate recipes/smollm2-135m-instruct/fp8.yaml "
                    "--model data/models/smollm2-135m-instruct --calibration data/calibration/smollm2-135m-instruct-fp8 "
                    "--out data/quantized/smollm2-135m-instruct-fp8 --metrics metrics/calibrate/smollm2-135m-instruct-fp8.json")


def main(recipe_path: Path, model_dir: Path, calibration_dir: Path, out_dir: Path, metrics_path: Path,
         catalog_path: Path = DEFAULT_CATALOG, cpu_memory_budget: int | None = None,
         timings_path: Path | None = None) -> int:
    from pipeline.calibration.tensors import load_materialized
    from pipeline.sources.loading import load_checkpoint

    recipe = load_recipe(recipe_path)
    catalog = load_catalog(catalog_path)
    validate_recipe(recipe, catalog, Definitions())  # its calibration set arrives as the calibration-set stage's output
    inputs = check_inputs(recipe, Path(model_dir), Path(calibration_dir))
    timer = Timer()
    # Disk-offloaded weights (CPU dispatch only) live here until the stage ends.
    with tempfile.TemporaryDirectory(prefix="forge-offload-") as offload_dir:
        with timer("load"):
            placement, planned = choose_placement(recipe, catalog, Path(model_dir) / CHECKPOINT_DIR,
                                                  cpu_memory_budget, Path(offload_dir))
            loaded = load_checkpoint(Path(model_dir) / CHECKPOINT_DIR, placement)
            tensors = load_materialized(Path(calibration_dir) / CALIBRATION_TENSORS_FILE)
        _calibrate_and_export(recipe, loaded, tensors, inputs, timer, Path(out_dir), Path(metrics_path), planned)
    # What the run cost, beside the output (never in it: pipeline/handoff/kpis.py).
    write_timings(timings_path, timer.seconds,
                  quantize_s=timer.seconds["calibrate"] + timer.seconds.get("auto_quantize", 0.0),
                  **{f"peak_{device.replace(':', '')}_bytes": peak for device, peak in peak_bytes_per_device().items()})
    return 0


def _calibrate_and_export(recipe: Recipe, loaded, tensors, inputs: dict, timer: Timer, out_dir: Path,
                          metrics_path: Path, planned: dict | None) -> None:
    import torch

    from pipeline.quant import mixed
    from pipeline.quant.algorithms import allowed_quant_algos
    from pipeline.quant.bits import checkpoint_bits
    from pipeline.quant.experts import coverage
    from pipeline.quant.hf_export import export_unified
    from pipeline.quant.modelopt_glue import calibrate
    from pipeline.quant.quant_state import save_quant_state
    from pipeline.quant.simulate import reference_fp4_simulation
    from pipeline.sources.loading import perplexity
    from pipeline.sources.routing import count_routing

    rows = recipe.spec.calibration.num_samples
    calibration_ids, heldout_ids = tensors.input_ids[:rows], tensors.input_ids[rows:]
    progress = Progress(f"calibrate {recipe.id}")
    # One forward call = one calibration batch or one held-out row (perplexity runs batch_size=1).
    hook = loaded.model.register_forward_hook(lambda *_: progress.advance())
    with heartbeat(progress):
        progress.phase("baseline perplexity", total=int(heldout_ids.shape[0]), unit="rows")
        with timer("baseline_perplexity"):
            baseline_ppl = perplexity(loaded.model, heldout_ids, batch_size=1)

        quant = recipe.spec.quant
        fmt, kv = FORMATS[quant.format], KV_CACHE_DTYPES[quant.kv_cache_dtype]
        batch = recipe.spec.calibration.batch_size
        batches = [{"input_ids": calibration_ids[i:i + batch], "attention_mask": tensors.attention_mask[i:i + batch]}
                   for i in range(0, rows, batch)]
        auto = None
        if quant.auto is not None:
            progress.phase("auto_quantize search", unit="forward passes")
            with timer("auto_quantize"):
                auto = mixed.search_auto(loaded.model, quant, batches, torch.device(loaded.device))
        config = mixed.quant_config_for(quant, auto.entries if auto else None)
        progress.phase("calibration", total=len(batches), unit="batches")
        with timer("calibrate"), count_routing(loaded.model) as routing:
            result = calibrate(loaded.model, config, batches, progress=sys.stderr.isatty(),
                               input_device=loaded.device, before_calibration=mixed.check_fused_groups,
                               around_calibration=routing.counting())
        experts = coverage(routing, loaded.model)  # before export, which splits the fused experts it reads
        layer_formats = mixed.layer_formats(loaded.model)
        progress.phase("quantized perplexity", total=int(heldout_ids.shape[0]), unit="rows")
        with timer("quantized_perplexity"), reference_fp4_simulation(loaded.model) as simulation:
            quantized_ppl = perplexity(loaded.model, heldout_ids, batch_size=1)
        hook.remove()  # before export: only the forward passes above are counted
        progress.phase("export")

        with staged_output(out_dir) as tmp:
            save_quant_state(loaded.model, tmp / QUANT_STATE_FILE)
            with timer("export"):
                export_unified(loaded.model, tmp / CHECKPOINT_DIR)
            loaded.tokenizer.save_pretrained(tmp / CHECKPOINT_DIR)
            export = verify_export(tmp / CHECKPOINT_DIR, fmt.name, kv.name, allowed_quant_algos(quant))
            bits = checkpoint_bits(tmp / CHECKPOINT_DIR, fmt.name)
            (tmp / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
            results = {
                "perplexity_baseline": baseline_ppl,
                "perplexity_quantized": quantized_ppl,
                "perplexity_delta_pct": 100 * (quantized_ppl / baseline_ppl - 1),
                "heldout_tokens": int(heldout_ids.numel()),
                "calibration_tokens": int(calibration_ids.numel()),
                "checkpoint_bytes": export["total_bytes"],
                # pipeline/quant/bits.py: decoder Linears, scales counted; and over the whole checkpoint.
                "effective_bits": bits.effective_bits,
                "whole_checkpoint_bits": bits.whole_checkpoint_bits,
                # Which numerics produced perplexity_quantized: ModelOpt's fake quant (FP8 on CPU or
                # anything on CUDA), or forge's FP4 reference on CPU (pipeline/quant/simulate.py).
                "path": "forge-fp4-reference-cpu" if simulation.routed else f"modelopt-fake-quant-{loaded.device}",
            }
            details = {
                "results": results,
                "format": fmt.name, "kv_cache_dtype": kv.name, "quant_algo": fmt.quant_algo,
                "kv_cache_quant_algo": kv.kv_cache_quant_algo, "modelopt_config": fmt.modelopt_config,
                "exclude": list(quant.exclude), "device": loaded.device, "dtype": loaded.dtype,
                "algorithm": quant.algorithm, "overrides": dict(quant.overrides),
                "auto": auto.to_dict() if auto else None, "layer_formats": mixed.format_counts(layer_formats),
                "bits": bits.to_dict(),
                "calibration_batches": result.batches_seen, "quantizers": result.quantizer_summary.to_dict(),
                # MoE only: tokens routed to each expert during calibration, the starved ones and how
                # their ranges were set (pipeline/quant/experts.py); null for a dense model.
                "experts": experts,
                "simulation": {"applied": simulation.applied, "reason": simulation.reason, "routed": simulation.routed},
                "export": export,
                "placement": {"device_map": loaded.device_map, "planned": planned},
            }
            write_manifest(tmp, build_manifest("calibrate", recipe.id, tmp, inputs, details=details,
                                               recipe=recipe.provenance("model", "quant", "calibration")))

    write_kpis(Path(metrics_path), "calibrate", results)
    log.info("%s: perplexity %.3f -> %.3f (%+.1f%%), calibrate %.1f s", recipe.id, baseline_ppl, quantized_ppl,
             results["perplexity_delta_pct"], timer.seconds["calibrate"])


def check_inputs(recipe: Recipe, model_dir: Path, calibration_dir: Path) -> dict:
    """Upstream outputs exist, are intact, and were made for this recipe's calibration section."""
    from pipeline.handoff.reader import open_upstream

    model = open_upstream(model_dir, "download")
    calibration = open_upstream(calibration_dir, "calibration-set", recipe, ("calibration",), any_recipe_id=True,
                                rerun="re-run it: dvc repro calibration-set@" + recipe.id)
    return {"model": model.input_entry(), "calibration": calibration.input_entry()}


def verify_export(checkpoint_dir: Path, format_name: str, kv_name: str, allowed_algos: list[str] | None = None) -> dict:
    """Check the export against the recipe: its quant_algo is one the recipe may produce
    (`allowed_quant_algos`: the format's, its AWQ spelling, or MIXED_PRECISION), and its tensors
    follow that algo's rules."""
    from pipeline.engines.export_rules import EXPORT_RULES, KV_EXPORT_RULES, read_quant_config, verify_unified_export

    fmt, kv = FORMATS[format_name], KV_CACHE_DTYPES[kv_name]
    expected = fmt.quant_algo
    if allowed_algos:
        written = str(read_quant_config(checkpoint_dir).get("quant_algo"))
        expected = next((a for a in allowed_algos if a.upper() == written.upper()), fmt.quant_algo)
    report = verify_unified_export(checkpoint_dir, expected, kv.kv_cache_quant_algo, EXPORT_RULES[format_name],
                                   KV_EXPORT_RULES.get(kv_name))
    return report.to_dict()


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def choose_placement(recipe: Recipe, catalog: dict, checkpoint_dir: Path, cpu_memory_budget: int | None,
                     offload_dir: Path):
    """The Placement to load with (None: whole model on one device) and the plan it follows."""
    import torch

    from pipeline.core.errors import StageInputError
    from pipeline.sizing.placement import plan_recipe_calibration
    from pipeline.sources.loading import Placement, cpu_placement

    if not torch.cuda.is_available():
        if cpu_memory_budget is None:
            return None, None
        placement = cpu_placement(checkpoint_dir, cpu_memory_budget, offload_dir)
        return placement, {"cpu_memory_budget": cpu_memory_budget}
    if cpu_memory_budget is not None:
        raise StageInputError("--cpu-memory-budget", "is for CPU-only machines; this one has CUDA.",
                              "drop it: on CUDA the recipe's calibration.node plan places the model.")
    plan = plan_recipe_calibration(recipe, catalog)
    have = torch.cuda.device_count()
    small = [i for i in range(min(have, plan.gpus))
             if torch.cuda.get_device_properties(i).total_memory < plan.per_gpu_bytes[i]]
    if have < plan.gpus or small:
        raise StageInputError(
            f"{recipe.path}: calibration.node",
            f"the plan needs {plan.gpus} GPU(s) of {plan.node['gpu']} ({max(plan.per_gpu_bytes) / 1e9:,.1f} GB each); "
            f"this machine has {have}" + (f", GPU {small[0]} too small" if small else "") + ".",
            "run on the planned node, or set calibration.node to this machine (forge plan shows what fits).")
    return Placement(plan.device_map, plan.max_memory()), plan.to_json()


def peak_bytes_per_device() -> dict[str, int]:
    """Peak allocated bytes on each CUDA device since the process started, and the peak RSS."""
    import torch

    peaks = {"cpu_rss": peak_rss_bytes()}
    if torch.cuda.is_available():
        peaks.update({f"cuda:{i}": int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())})
    return peaks
