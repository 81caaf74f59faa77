"""Stage `gpu-compare`: the comparison users came for, with no weights needed (runs in `make repro`).

Every shipped real-model recipe (models without `default_pipeline`) planned on H100 / H200 FP8 and
B200 NVFP4: predicted tok/s (total and per GPU), $/Mtok, J/token at TDP, the B200/H200 ratio, and
NVIDIA's published trtllm-bench measurement with forge's error where one exists
(pipeline/reporting/gpu_comparison.py). Out: `<out>/gpu_compare.json`, `<out>/gpu_compare.md` (the report stage
includes it) and `<out>/figures/*.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.cliargs import add_verb, arg, runner
from pipeline.core.gpus import DEFAULT_CATALOG, GpuSpec, load_catalog
from pipeline.planning.dvc_plan import compared_recipes
from pipeline.planning.validate import Definitions, validate_recipe
from pipeline.recipe.loading import RECIPES_DIR, Recipe
from pipeline.reporting.gpu_comparison import compare, markdown
from pipeline.reporting.plots import plot_pareto, slug
from pipeline.sizing.plan import Plan
from pipeline.sizing.published import CALIBRATION_ROWS, HELDOUT_ROWS, load_rows

log = logging.getLogger(__name__)
JSON_FILE, MARKDOWN_FILE, FIGURES_DIR = "gpu_compare.json", "gpu_compare.md", "figures"


@dataclass(frozen=True)
class GpuCompareArgs:
    """`forge gpu-compare`'s arguments, declared once (pipeline/core/cliargs.py)."""

    out_dir: Path = arg(required=True, flag="out")
    recipes_dir: Path = arg(RECIPES_DIR, flag="recipes")
    catalog_path: Path = arg(DEFAULT_CATALOG, flag="catalog")


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "gpu-compare", runner(GpuCompareArgs, main),
             help="predicted tok/s, $/Mtok, J/token of the real-model recipes on H100/H200/B200",
             epilog="example: forge gpu-compare --out reports/gpu-compare")


def main(out_dir: Path, recipes_dir: Path = RECIPES_DIR, catalog_path: Path = DEFAULT_CATALOG) -> int:
    catalog = load_catalog(Path(catalog_path))
    planned = real_model_recipes(Path(recipes_dir), catalog)
    result = compare(planned, catalog, load_rows(CALIBRATION_ROWS) + load_rows(HELDOUT_ROWS))
    out_dir = Path(out_dir)
    (out_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    figures = plot(result, out_dir / FIGURES_DIR)
    (out_dir / JSON_FILE).write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / MARKDOWN_FILE).write_text(markdown(result, [f.relative_to(out_dir) for f in figures]))
    log.info("gpu-compare: %d targets of %d recipes -> %s", len(result["rows"]), len(planned), out_dir)
    return 0


def real_model_recipes(recipes_dir: Path, catalog: dict[str, GpuSpec]) -> list[tuple[Recipe, dict[str, Plan]]]:
    """The real-model recipes (no `default_pipeline`; dvc.yaml's generated deps name the same ones),
    each validated, with its targets' plans."""
    return [(recipe, validate_recipe(recipe, catalog, Definitions())) for recipe in compared_recipes(recipes_dir)]


def plot(result: dict[str, Any], figures: Path) -> list[Path]:
    """Three figures (tok/s per GPU, $/Mtok, J/token), one panel per model with its own scale, one
    bar per GPU + format (hatched: predicted); a published measurement is a black bar beside it. Then
    one throughput-per-GPU vs tok/s-per-user figure per model, from the SLO scenario's configurations."""
    from matplotlib.figure import Figure

    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = (("predicted_output_tok_s_per_gpu", "output tok/s per GPU", "tok_s_per_gpu.png", "{:,.0f}"),
              ("predicted_usd_per_mtok", "$ per million output tokens", "usd_per_mtok.png", "{:.3f}"),
              ("predicted_joules_per_token", "J per output token (at TDP)", "joules_per_token.png", "{:.3f}"))
    out = []
    for key, label, name, fmt in panels:
        fig = Figure(figsize=(4.2 * len(models) + 1, 4.2), dpi=100, layout="constrained")
        axes = fig.subplots(1, len(models), squeeze=False)[0]
        for ax, model in zip(axes, models):
            mine = [r for r in rows if r["model"] == model and r[key] is not None]
            names = [f"{r['gpu']} {r['format']}\nTP{r['tp']}" for r in mine]
            bars = ax.bar(range(len(mine)), [r[key] for r in mine], width=0.6, hatch="..", edgecolor="white",
                          color=["tab:blue", "tab:orange", "tab:green", "tab:red"][:len(mine)], label="forge predicted")
            ax.bar_label(bars, labels=[fmt.format(r[key]) for r in mine], fontsize=8)
            if key == "predicted_output_tok_s_per_gpu":
                published = [(i, r["published_output_tok_s"] / r["tp"]) for i, r in enumerate(mine)
                             if r["published_output_tok_s"]]
                if published:
                    ax.bar([i + 0.33 for i, _ in published], [v for _, v in published], width=0.15, color="black",
                           label="published trtllm-bench (1000/1000)")
                ax.legend(fontsize=7, loc="upper left")
            ax.set_xticks(range(len(mine)), names, fontsize=8)
            ax.set_title(model.split("/")[-1], fontsize=10)
            ax.set_ylabel(label)
            ax.margins(y=0.15)
        fig.suptitle(f"{label} (predicted, trtllm-bench offline scenario at the recipe's ISL/OSL)", fontsize=10)
        path = figures / name
        fig.savefig(path)
        out.append(path)
    for model in dict.fromkeys(r["model"] for r in result["serving"]):
        curves = [(f"{r['gpu']} {r['format']} {r['parallelism']}", r["pareto"]) for r in result["serving"]
                  if r["model"] == model]
        name = model.split("/")[-1]
        path = plot_pareto(curves, f"{name}: tok/s per GPU vs per user, 1000/1000 (predicted)",
                           figures / f"pareto_{slug(name)}.png")
        if path:
            out.append(path)
    return out
