"""Cross-checks a schema cannot express: names that must exist elsewhere (GPUs, calibration sets,
eval suites), format x compute capability, whether each target fits its GPU and whether the
calibration node holds the BF16 model. Run before any expensive work, by `forge validate` and at
the start of every stage; `validate_recipe` returns each target's plan (pipeline/planning/targets.py),
so a stage plans its targets once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.accuracy.suites import load_suite
from pipeline.core.errors import ForgeError, RecipeError, raise_all
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.core.gpus import GpuSpec
from pipeline.core.yamlio import excerpt
from pipeline.engines.contracts import engines_loading_format
from pipeline.planning.targets import TargetSpec, plan_spec, target_spec
from pipeline.recipe.loading import Recipe
from pipeline.sizing.memory import Alternative, fitting_alternatives
from pipeline.sizing.parallel import Parallelism, parallel_choices, parallelism_problem, tp_is_valid
from pipeline.sizing.placement import plan_recipe_calibration
from pipeline.sizing.plan import Plan
from pipeline.sizing.shapes import TP_CHOICES, ModelShape, max_positions


@dataclass(frozen=True)
class Definitions:
    """Where the calibration sets and eval suites that recipes name are defined. A stage passes the
    directories it reads, the same ones dvc.yaml lists as its deps (evaluate: its --eval-dir's
    suites); None leaves that name unchecked by a stage that never reads it (calibrate reads the
    calibration-set stage's output, not the definitions). Nothing here reads the working directory."""

    calibration_dir: Path | None = None
    suites_dir: Path | None = None

    @classmethod
    def of_checkout(cls, root: Path) -> Definitions:
        """The checkout's own: what `forge validate`, `forge plan` and `forge new` check against."""
        return cls(root / "calibration", root / "eval" / "suites")


def spec_problems(spec: TargetSpec, catalog: dict[str, GpuSpec]) -> list[ForgeError]:
    """Every problem with a target that planning cannot get past: unknown GPU, format or KV cache
    the GPU cannot run, a TP the heads do not split into, a sequence past the model's positions."""
    if spec.gpu not in catalog:
        return [RecipeError(spec.where, f"unknown GPU {excerpt(spec.gpu)}.", f"use one of {', '.join(catalog)} (pipeline/core/data/gpus.yaml).")]
    problems: list[ForgeError] = []
    gpu = catalog[spec.gpu]
    fmt = FORMATS[spec.format]
    if not fmt.min_compute_capability <= gpu.cc:
        alternatives = [f.name for f in FORMATS.values() if f.quantized and f.min_compute_capability <= gpu.cc]
        problems.append(RecipeError(
            spec.where,
            f"{fmt.name} needs compute capability >= {fmt.min_compute_capability}, {spec.gpu} is {gpu.cc}.",
            f"target {' or '.join(_gpus_supporting(fmt.min_compute_capability, catalog))}, "
            f"or use {' or '.join(alternatives) or 'another GPU'}.",
        ))
    kv = KV_CACHE_DTYPES[spec.kv_cache_dtype]
    if not kv.min_compute_capability <= gpu.cc:
        usable = [k.name for k in KV_CACHE_DTYPES.values() if k.min_compute_capability <= gpu.cc]
        problems.append(RecipeError(
            spec.at("kv"),
            f"a {kv.name} KV cache needs compute capability >= {kv.min_compute_capability}, {spec.gpu} is {gpu.cc}.",
            f"use {' or '.join(spec.spell('kv', k) for k in usable)} for this target.",
        ))
    shape = ModelShape.from_hf_config(spec.config, spec.where)
    if tp_problem := parallelism_problem(shape, Parallelism(spec.tp)):
        problems.append(RecipeError(
            spec.at("tp"),
            f"{shape.heads} attention heads / {shape.kv_heads} KV heads cannot be split {spec.tp} ways."
            if "heads" in tp_problem else f"{tp_problem}.",
            f"use {' or '.join(spec.spell('tp', t) for t in TP_CHOICES if tp_is_valid(shape, t))}.",
        ))
    elif problem := parallelism_problem(shape, spec.parallelism):
        setting = "attention_dp" if "attention data parallelism" in problem else "ep"
        valid = parallel_choices(shape, spec.tp)
        fix = (f"set {spec.spell('attention_dp', 'off' if spec.flags else 'false')}" if setting == "attention_dp" else
               f"set {' or '.join(spec.spell('ep', e) for e in sorted({p.ep for p in valid}))}")
        problems.append(RecipeError(spec.at(setting), f"{problem}.",
                                    f"{fix} (the splits at TP {spec.tp}: {'; '.join(str(p) for p in valid)})."))
    problems += engine_problems(spec, catalog)
    positions = max_positions(spec.config)
    if positions is not None and spec.serving.seq_len > positions:
        problems.append(RecipeError(
            spec.at("seq"),
            f"max_seq_len {spec.serving.seq_len:,} exceeds the {positions:,} positions {spec.model}'s config allows "
            "(max_position_embeddings, with any rope_scaling).",
            f"set {spec.spell('seq', positions)} or less.",
        ))
    return problems


def engine_problems(spec: TargetSpec, catalog: dict[str, GpuSpec]) -> list[ForgeError]:
    """A format no serving engine loads on this GPU (contracts in pipeline/engines/contracts.py)."""
    fmt, gpu = FORMATS[spec.format], catalog[spec.gpu]
    if not fmt.quantized or not fmt.min_compute_capability <= gpu.cc:
        return []  # unquantized, or already refused for compute capability
    kv = KV_CACHE_DTYPES[spec.kv_cache_dtype]
    if engines_loading_format(fmt.name, kv.kv_cache_quant_algo, gpu.cc):
        return []
    usable = [f.name for f in FORMATS.values()
              if f.quantized and engines_loading_format(f.name, kv.kv_cache_quant_algo, gpu.cc)]
    return [RecipeError(
        spec.at("format"),
        f"no serving engine loads {fmt.name} (quant_algo {fmt.quant_algo!r}, as ModelOpt writes it) on "
        f"{spec.gpu} (TensorRT-LLM, vLLM and SGLang contracts, pipeline/engines/contracts.py).",
        f"use {' or '.join(usable) or 'another format'} for {spec.gpu}.",
    )]


def _gpus_supporting(cc_needed, catalog: dict[str, GpuSpec]) -> list[str]:
    return [key for key, gpu in catalog.items() if cc_needed <= gpu.cc]


def would_fit(spec: TargetSpec, catalog: dict[str, GpuSpec]) -> list[Alternative]:
    """What fits, among (format, GPU) pairs some serving engine loads (pipeline/engines/contracts.py)."""
    kv = KV_CACHE_DTYPES[spec.kv_cache_dtype]
    formats = [FORMATS[spec.format]] + [f for f in FORMATS.values() if f.quantized and f.name != spec.format]
    return [a for a in fitting_alternatives(spec.config, formats, kv, catalog, spec.serving)
            if not FORMATS[a.format].quantized
            or engines_loading_format(a.format, kv.kv_cache_quant_algo, catalog[a.gpu].cc)]


def fit_problem(spec: TargetSpec, target_plan: Plan, catalog: dict[str, GpuSpec]) -> RecipeError | None:
    """None when the plan fits; otherwise the problem, with what would fit (computed)."""
    if target_plan.fits:
        return None
    elsewhere = [a for a in would_fit(spec, catalog) if (a.gpu, a.format) != (spec.gpu, spec.format)]
    also = f"; also fits: {', '.join(str(a) for a in elsewhere[:3])}" if elsewhere else ""
    if target_plan.min_tp is not None:
        fix = (f"set {spec.spell('tp', target_plan.min_tp)} (the smallest TP that fits on {spec.gpu}), "
               f"or a smaller format or max_seq_len{also}.")
    elif elsewhere:
        fix = f"no TP up to 8 fits {spec.format} on {spec.gpu}; what fits: {', '.join(str(a) for a in elsewhere[:4])}."
    else:
        fix = (f"no TP up to 8 fits on any catalog GPU in any format: use a shorter max_seq_len "
               f"({spec.serving.seq_len:,} now).")
    return RecipeError(spec.where, f"{spec.model} {spec.format} does not fit: {target_plan.why_not} "
                       f"(max_seq_len {spec.serving.seq_len}).", fix)


def check_spec(spec: TargetSpec, catalog: dict[str, GpuSpec]) -> Plan:
    """Every check for one target, raised together; the plan when it is servable."""
    raise_all(spec_problems(spec, catalog))
    target_plan = plan_spec(spec, catalog)
    problem = fit_problem(spec, target_plan, catalog)
    if problem:
        raise problem
    return target_plan


def check_target(recipe: Recipe, gpu_key: str, catalog: dict[str, GpuSpec]) -> Plan:
    """Raise every problem with one target; return its plan when it is servable."""
    return check_spec(target_spec(recipe, gpu_key), catalog)


def require_target(recipe: Recipe, gpu_key: str) -> None:
    """A GPU named on the command line must be one of the recipe's targets."""
    if gpu_key not in recipe.spec.targets:
        raise RecipeError(
            f"{recipe.path}: targets",
            f"no target '{gpu_key}' in this recipe.",
            f"pass --gpu {' or --gpu '.join(recipe.spec.targets)}, or add a targets.{gpu_key} section.",
        )


def check_named_target(recipe: Recipe, gpu_key: str, catalog: dict[str, GpuSpec]) -> Plan:
    """`check_target` for a GPU named on the command line, which must be one of the recipe's targets."""
    require_target(recipe, gpu_key)
    return check_target(recipe, gpu_key, catalog)


def validate_recipe(recipe: Recipe, catalog: dict[str, GpuSpec], definitions: Definitions, *,
                    placement: bool = True) -> dict[str, Plan]:
    """Every check for one recipe; returns the plan of each target. Raises all problems found.
    `placement=False` leaves the calibration node out: `forge plan` answers placement apart, beside
    the serving plan it never blocks."""
    problems: list[ForgeError] = []
    problems += _names_problems(recipe, definitions)
    problems += _calibration_length_problems(recipe)
    plans: dict[str, Plan] = {}
    for gpu_key in recipe.spec.targets:
        try:
            plans[gpu_key] = check_target(recipe, gpu_key, catalog)
        except ForgeError as exc:
            problems.append(exc)
    node = recipe.spec.calibration.node
    if placement and (node is not None or next(iter(recipe.spec.targets)) in catalog):  # else: the target's says it
        try:  # the calibration node holds the BF16 model, or a fix is raised
            plan_recipe_calibration(recipe, catalog)
        except ForgeError as exc:
            problems.append(exc)
    raise_all(problems)
    return plans


def _names_problems(recipe: Recipe, definitions: Definitions) -> list[ForgeError]:
    """The calibration set and eval suites a recipe names exist; gate overrides name suite metrics."""
    problems: list[ForgeError] = []
    if definitions.calibration_dir is not None:
        problems += _calibration_set_problems(recipe, definitions.calibration_dir)
    if definitions.suites_dir is not None:
        problems += _suite_problems(recipe, definitions.suites_dir)
    return problems


def _calibration_set_problems(recipe: Recipe, calibration_dir: Path) -> list[ForgeError]:
    calib = calibration_dir / f"{recipe.spec.calibration.set}.yaml"
    if calib.is_file():
        return []
    known = sorted(p.stem for p in calibration_dir.glob("*.yaml"))
    return [RecipeError(
        f"{recipe.path}: calibration.set",
        f"unknown calibration set '{recipe.spec.calibration.set}'.",
        f"use one of {', '.join(known)} or add {calib}.",
    )]


def _suite_problems(recipe: Recipe, suites_dir: Path) -> list[ForgeError]:
    problems: list[ForgeError] = []
    for where, name in (
        (f"{recipe.path}: eval.suite", recipe.spec.eval.suite),
        (f"{recipe.model.directory / 'model.yaml'}: eval.suite", recipe.model.spec.eval.suite),
    ):
        if not (suites_dir / f"{name}.yaml").is_file():
            known = sorted(p.stem for p in (suites_dir).glob("*.yaml"))
            problems.append(RecipeError(where, f"unknown eval suite '{name}'.", f"use one of {', '.join(known)}."))
            continue
        try:
            load_suite(name, suites_dir)
        except ForgeError as exc:
            problems.append(exc)
    if (suites_dir / f"{recipe.spec.eval.suite}.yaml").is_file():
        suite = load_suite(recipe.spec.eval.suite, suites_dir)
        unknown = sorted(set(recipe.spec.eval.gates.overrides) - set(suite.directions()))
        if unknown:
            problems.append(RecipeError(
                f"{recipe.path}: eval.gates.overrides",
                f"no metric {', '.join(repr(u[:60]) for u in unknown)} in eval suite {suite.name!r}.",
                f"use the suite's metric keys: {', '.join(suite.directions())}.",
            ))
        gates = recipe.spec.eval.gates
        lower = [m for m, d in suite.directions().items() if d == "lower"]
        not_lower = sorted(set(gates.max_increase) - set(lower))
        if not_lower:
            problems.append(RecipeError(
                f"{recipe.path}: eval.gates.max_increase",
                f"{', '.join(repr(u[:60]) for u in not_lower)} is not a lower-is-better metric of eval suite "
                f"{suite.name!r} (a maximum increase is for perplexity-type metrics).",
                f"use one of: {', '.join(lower) or '(none in this suite)'}; gate the others with overrides.",
            ))
        both = sorted(set(gates.max_increase) & set(gates.overrides))
        if both:
            problems.append(RecipeError(f"{recipe.path}: eval.gates.max_increase",
                                        f"{', '.join(both)} also has an override (a minimum recovery).",
                                        "state each metric's threshold once: keep max_increase or the override."))
    return problems


def _calibration_length_problems(recipe: Recipe) -> list[ForgeError]:
    positions = max_positions(recipe.model.architecture())
    seq_len = recipe.spec.calibration.seq_len
    if positions is not None and seq_len > positions:
        return [RecipeError(f"{recipe.path}: calibration.seq_len",
                            f"{seq_len:,} tokens exceeds the {positions:,} positions {recipe.model.name}'s config allows.",
                            f"set seq_len: {positions} or less (ModelOpt's examples calibrate at 512-4096).")]
    return []
