"""Cross-checks a schema cannot express: names that must exist elsewhere (GPUs, calibration sets,
eval suites), format x compute capability, and whether each target fits its GPU. Run before any
expensive work, by `forge validate` and at the start of every stage."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import RecipeError
from pipeline.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.gpus import GpuSpec
from pipeline.recipe import Recipe, Target
from pipeline.sizing import Plan, ServingShape, plan

CALIBRATION_DIR = Path("calibration")
EVAL_SUITES_DIR = Path("eval/suites")


def serving_shape(target: Target) -> ServingShape:
    return ServingShape(
        max_input_len=target.max_input_len,
        max_output_len=target.max_output_len,
        seq_len=target.seq_len,
        max_num_tokens=target.max_num_tokens,
        kv_cache_free_gpu_memory_fraction=target.kv_cache_free_gpu_memory_fraction,
        concurrency=target.concurrency,
        price_per_gpu_hour_usd=target.price_per_gpu_hour_usd,
    )


def plan_target(recipe: Recipe, gpu_key: str, catalog: dict[str, GpuSpec], ceilings=None) -> Plan:
    target = recipe.spec.targets[gpu_key]
    return plan(
        recipe.model.architecture(),
        FORMATS[recipe.spec.quant.format],
        KV_CACHE_DTYPES[recipe.spec.quant.kv_cache_dtype],
        catalog[gpu_key],
        gpu_key,
        serving_shape(target),
        tp=target.tp,
        ceilings=ceilings,
    )


def _gpus_supporting(cc_needed, catalog: dict[str, GpuSpec]) -> list[str]:
    return [key for key, gpu in catalog.items() if cc_needed <= gpu.cc]


def check_target(recipe: Recipe, gpu_key: str, catalog: dict[str, GpuSpec]) -> Plan:
    """Raise the first problem with one target; return its plan when it is servable."""
    where = f"{recipe.path}: targets.{gpu_key}"
    if gpu_key not in catalog:
        raise RecipeError(where, f"unknown GPU '{gpu_key}'.", f"use one of {', '.join(catalog)} (pipeline/data/gpus.yaml).")
    gpu = catalog[gpu_key]
    fmt = FORMATS[recipe.spec.quant.format]
    if not fmt.min_compute_capability <= gpu.cc:
        alternatives = [f.name for f in FORMATS.values() if f.quantized and f.min_compute_capability <= gpu.cc]
        raise RecipeError(
            where,
            f"{fmt.name} needs compute capability >= {fmt.min_compute_capability}, {gpu_key} is {gpu.cc}.",
            f"target {' or '.join(_gpus_supporting(fmt.min_compute_capability, catalog))}, "
            f"or use {' or '.join(alternatives) or 'another GPU'}.",
        )
    kv = KV_CACHE_DTYPES[recipe.spec.quant.kv_cache_dtype]
    if not kv.min_compute_capability <= gpu.cc:
        raise RecipeError(
            f"{recipe.path}: quant.kv_cache_dtype",
            f"a {kv.name} KV cache needs compute capability >= {kv.min_compute_capability}, {gpu_key} is {gpu.cc}.",
            "use kv_cache_dtype: fp8 or auto for this target.",
        )
    check_engines_load(recipe, gpu_key, gpu.cc)
    target_plan = plan_target(recipe, gpu_key, catalog)
    if not target_plan.fits:
        target = recipe.spec.targets[gpu_key]
        if target_plan.min_tp is not None:
            fix = f"set tp: {target_plan.min_tp} (the smallest TP that fits), or a smaller format or max_seq_len."
        else:
            fix = "no TP up to 8 fits: use a 4-bit format, a GPU with more memory, or a shorter max_seq_len."
        raise RecipeError(where, f"{recipe.model.name} {fmt.name} does not fit: {target_plan.why_not} "
                          f"(max_seq_len {target.seq_len}).", fix)
    return target_plan


def check_engines_load(recipe: Recipe, gpu_key: str, cc) -> list[str]:
    """Refuse a format no serving engine loads on this GPU (contracts in pipeline/engines.py)."""
    from pipeline.engines import engines_loading_format

    fmt = FORMATS[recipe.spec.quant.format]
    if not fmt.quantized:
        return []
    kv = KV_CACHE_DTYPES[recipe.spec.quant.kv_cache_dtype]
    names = engines_loading_format(fmt.name, kv.kv_cache_quant_algo, cc)
    if names:
        return names
    usable = [f.name for f in FORMATS.values()
              if f.quantized and engines_loading_format(f.name, kv.kv_cache_quant_algo, cc)]
    raise RecipeError(
        f"{recipe.path}: quant.format",
        f"no serving engine loads {fmt.name} (quant_algo {fmt.quant_algo!r}, as ModelOpt writes it) on "
        f"{gpu_key} (TensorRT-LLM, vLLM and SGLang contracts, pipeline/engines.py).",
        f"use {' or '.join(usable) or 'another format'} for {gpu_key}.",
    )


def check_named_target(recipe: Recipe, gpu_key: str, catalog: dict[str, GpuSpec]) -> Plan:
    """`check_target` for a GPU named on the command line, which must be one of the recipe's targets."""
    if gpu_key not in recipe.spec.targets:
        raise RecipeError(
            f"{recipe.path}: targets",
            f"no target '{gpu_key}' in this recipe.",
            f"pass --gpu {' or --gpu '.join(recipe.spec.targets)}, or add a targets.{gpu_key} section.",
        )
    return check_target(recipe, gpu_key, catalog)


def validate_recipe(recipe: Recipe, catalog: dict[str, GpuSpec], root: Path = Path(".")) -> dict[str, Plan]:
    """Every check for one recipe; returns the plan of each target. Raises the first problem."""
    calib = root / CALIBRATION_DIR / f"{recipe.spec.calibration.set}.yaml"
    if not calib.is_file():
        known = sorted(p.stem for p in (root / CALIBRATION_DIR).glob("*.yaml"))
        raise RecipeError(
            f"{recipe.path}: calibration.set",
            f"unknown calibration set '{recipe.spec.calibration.set}'.",
            f"use one of {', '.join(known)} or add {calib}.",
        )
    from pipeline.evaluation import load_suite

    for where, name in (
        (f"{recipe.path}: eval.suite", recipe.spec.eval.suite),
        (f"{recipe.model.directory / 'model.yaml'}: eval.suite", recipe.model.spec.eval.suite),
    ):
        if not (root / EVAL_SUITES_DIR / f"{name}.yaml").is_file():
            known = sorted(p.stem for p in (root / EVAL_SUITES_DIR).glob("*.yaml"))
            raise RecipeError(where, f"unknown eval suite '{name}'.", f"use one of {', '.join(known)}.")
        load_suite(name, root / EVAL_SUITES_DIR)
    suite = load_suite(recipe.spec.eval.suite, root / EVAL_SUITES_DIR)
    unknown = sorted(set(recipe.spec.eval.gates.overrides) - set(suite.directions()))
    if unknown:
        raise RecipeError(f"{recipe.path}: eval.gates.overrides",
                          f"no metric {', '.join(repr(u) for u in unknown)} in eval suite {suite.name!r}.",
                          f"use the suite's metric keys: {', '.join(suite.directions())}.")
    plans = {gpu_key: check_target(recipe, gpu_key, catalog) for gpu_key in recipe.spec.targets}
    from pipeline.placement import plan_recipe_calibration

    plan_recipe_calibration(recipe, catalog)  # the calibration node holds the BF16 model, or a fix is raised
    return plans
