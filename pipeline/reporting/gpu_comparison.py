"""Which GPU, at which precision, gives what: every shipped real-model recipe planned on H100 / H200
(FP8) and B200 (NVFP4), needing no weights. All throughput figures are *predicted* by the
throughput model (pipeline/sizing/perfmodel.py); NVIDIA's published trtllm-bench measurements sit beside
them where one exists for the same model, GPU, precision and TP (at its ISL/OSL 1000/1000).

J/token is at TDP (an upper bound on power); $/Mtok at the recipe's price_per_gpu_hour_usd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.gpus import GpuSpec
from pipeline.recipe.loading import Recipe
from pipeline.sizing.perfmodel import Efficiency
from pipeline.sizing.plan import Plan
from pipeline.sizing.published import Row, predict_row

# (format, GPU) pairs the comparison covers: the seed's question is Hopper FP8 against Blackwell FP4.
COMPARED = (("fp8", "h100"), ("fp8", "h200"), ("nvfp4", "b200"))
# Published-table names (bench/data/*.csv) for the shipped models' Hugging Face repos.
PUBLISHED_MODEL = {"meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B", "meta-llama/Llama-3.3-70B-Instruct": "Llama-3.3-70B"}
PUBLISHED_GPU = {"h100": "H100", "h200": "H200", "b200": "B200"}
PUBLISHED_PRECISION = {"fp8": "FP8", "nvfp4": "FP4"}
PUBLISHED_ISL_OSL = (1000, 1000)
# The seed brief's claims, shown with forge's predicted figure beside them.
CLAIM_SPEEDUP = 2.5  # "up to 2.5x throughput" (B200 over H200)
CLAIM_JOULES_PER_TOKEN = 0.4  # "0.4 J/token"


def compare(planned: Sequence[tuple[Recipe, Mapping[str, Plan]]], catalog: Mapping[str, GpuSpec],
            published: Sequence[Row], eff: Efficiency | None = None) -> dict[str, Any]:
    """Rows per (recipe, GPU), the B200/H200 ratio per model, and the seed's claims; `planned` is
    each recipe with its targets' plans (as validation made them)."""
    eff = eff or Efficiency.load()
    rows = [row for recipe, plans in planned for row in _recipe_rows(recipe, plans, catalog, published, eff)]
    return {"rows": rows, "ratios": ratios(rows), "claims": claims(rows),
            "basis": "predicted by pipeline/sizing/perfmodel.py (trtllm-bench offline scenario); J/token at TDP"}


def _recipe_rows(recipe: Recipe, plans: Mapping[str, Plan], catalog, published, eff) -> list[dict[str, Any]]:
    fmt = recipe.spec.quant.format
    out = []
    for gpu in recipe.spec.targets:
        if (fmt, gpu) not in COMPARED:
            continue
        target = recipe.spec.targets[gpu]
        plan = plans[gpu]
        t = plan.throughput
        if not t:
            raise ValueError(f"{recipe.path}: targets.{gpu} does not fit; forge validate rejects it first")
        tp = target.tp
        tok_s = t["predicted_output_tok_s"]
        row = {
            "model": recipe.model.spec.source.repo_id, "recipe": recipe.id, "target": recipe.artifact_name(gpu),
            "format": fmt, "gpu": gpu, "tp": tp, "isl": target.max_input_len, "osl": target.max_output_len,
            "predicted_output_tok_s": tok_s, "predicted_output_tok_s_per_gpu": tok_s / tp,
            "predicted_joules_per_token": plan.joules_per_token,  # of the predicted run (pipeline/sizing/plan.py priced)
            "price_per_gpu_hour_usd": target.price_per_gpu_hour_usd,
            "predicted_usd_per_mtok": plan.usd_per_mtok,
            "max_batch_size": t["max_batch_size"], "max_num_tokens": t["max_num_tokens"],
            "bound": f"{t['bound_prefill']}/{t['bound_decode']}", "roofline_ceiling_tok_s": plan.decode_tok_s_max_batch,
            **published_beside(recipe, gpu, tp, catalog, published, eff),
        }
        out.append(row)
    return out


def published_beside(recipe: Recipe, gpu: str, tp: int, catalog, published: Sequence[Row], eff) -> dict[str, Any]:
    """NVIDIA's measurement for this model/GPU/precision/TP at 1000/1000, forge's prediction of that
    very run (trtllm-bench's own limits, pipeline/sizing/published.py) and the error; None where none exists."""
    key = (PUBLISHED_MODEL.get(recipe.model.spec.source.repo_id), PUBLISHED_GPU.get(gpu),
           PUBLISHED_PRECISION.get(recipe.spec.quant.format), tp, *PUBLISHED_ISL_OSL)
    match = next((r for r in published if (r.model, r.gpu, r.precision, r.tp, r.isl, r.osl) == key), None)
    if match is None:
        return {"published_output_tok_s": None, "predicted_for_published": None, "published_error": None,
                "published_source": None}
    predicted = predict_row(match, dict(catalog), eff).predicted_output_tok_s
    return {"published_output_tok_s": match.measured, "predicted_for_published": predicted,
            "published_error": predicted / match.measured - 1, "published_source": match.source}


def ratios(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """B200 (NVFP4) over H200 (FP8) per GPU, per model: predicted, and published where both exist."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by_gpu = {r["gpu"]: r for r in rows if r["model"] == model}
        if "b200" not in by_gpu or "h200" not in by_gpu:
            continue
        b, h = by_gpu["b200"], by_gpu["h200"]
        published = None
        if b["published_output_tok_s"] and h["published_output_tok_s"]:
            published = (b["published_output_tok_s"] / b["tp"]) / (h["published_output_tok_s"] / h["tp"])
        out.append({"model": model, "predicted_b200_over_h200_per_gpu":
                    b["predicted_output_tok_s_per_gpu"] / h["predicted_output_tok_s_per_gpu"],
                    "published_b200_over_h200_per_gpu": published})
    return out


def claims(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    ratio_rows = ratios(rows)
    best_ratio = max((r["predicted_b200_over_h200_per_gpu"] for r in ratio_rows), default=None)
    joules = sorted(rows, key=lambda r: r["predicted_joules_per_token"])
    return [
        {"claim": f"up to {CLAIM_SPEEDUP:g}x throughput (B200 over H200)", "claimed": CLAIM_SPEEDUP,
         "forge_predicted": best_ratio, "forge_predicted_max": None,
         "forge_basis": "largest predicted B200 NVFP4 / H200 FP8 tok/s per GPU over the models"},
        {"claim": f"{CLAIM_JOULES_PER_TOKEN:g} J/token", "claimed": CLAIM_JOULES_PER_TOKEN,
         "forge_predicted": joules[0]["predicted_joules_per_token"] if joules else None,
         "forge_predicted_max": joules[-1]["predicted_joules_per_token"] if joules else None,
         "forge_basis": (f"at TDP, from {joules[0]['target']} to {joules[-1]['target']}" if joules else "-")},
    ]


def markdown(result: Mapping[str, Any], figures: Sequence[Path] = ()) -> str:
    """The report section (pipeline/reporting/markdown.py gpu_comparison_section includes it)."""
    lines = ["## GPU comparison (predicted)\n",
             ("trtllm-bench's offline max-throughput run at each recipe's ISL/OSL, predicted by forge's throughput "
             "model (pipeline/sizing/perfmodel.py; fitted to 22 published rows, bench/data/). Published: NVIDIA's "
             "trtllm-bench figure for the same model/GPU/precision/TP at 1000/1000, beside forge's prediction of "
             "that run. J/token at TDP; $/Mtok at the recipe's illustrative price.\n"),
             ("| target | TP | ISL/OSL | tok/s (total) | tok/s per GPU | $/Mtok | J/token | limits (batch / tokens) | "
             "bound | published 1000/1000 | forge for it | error |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        error = r["published_error"]
        lines.append(
            f"| {r['target']} | {r['tp']} | {r['isl']}/{r['osl']} | {_num(r['predicted_output_tok_s'], ',.0f')} | "
            f"{_num(r['predicted_output_tok_s_per_gpu'], ',.0f')} | {_num(r['predicted_usd_per_mtok'], '.3f')} | "
            f"{_num(r['predicted_joules_per_token'], '.3f')} | {r['max_batch_size']} / {r['max_num_tokens']} | "
            f"{r['bound']} | {_num(r['published_output_tok_s'], ',.0f')} | {_num(r['predicted_for_published'], ',.0f')} | "
            f"{'-' if error is None else f'{100 * error:+.1f}%'} |")
    lines.append("\nB200 NVFP4 over H200 FP8, tok/s per GPU (x):\n")
    lines.append("| model | forge predicted | published (1000/1000) |\n|---|---|---|")
    for r in result["ratios"]:
        lines.append(f"| {r['model']} | {_num(r['predicted_b200_over_h200_per_gpu'], '.2f')} | "
                     f"{_num(r['published_b200_over_h200_per_gpu'], '.2f')} |")
    lines.append("\nThe seed's claims beside forge's predicted figures:\n")
    lines.append("| claim | forge predicted | basis |\n|---|---|---|")
    for c in result["claims"]:
        value = _num(c["forge_predicted"], ".2f")
        if c["forge_predicted_max"] is not None:
            value += f" to {c['forge_predicted_max']:.2f}"
        lines.append(f"| {c['claim']} | {value} | {c['forge_basis']} |")
    for fig in figures:
        lines.append(f"\n![{fig.stem}]({fig.as_posix()})")
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
