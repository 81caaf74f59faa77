"""Which GPU, at which precision, gives what: every shipped real-model recipe planned on H100 / H200
(FP8) and B200 (NVFP4), needing no weights. All throughput figures are *predicted* by the
throughput model (pipeline/sizing/perfmodel.py); NVIDIA's published trtllm-bench measurements sit beside
them where one exists for the same model, GPU, precision and TP (at its ISL/OSL 1000/1000).

J/token is at TDP (an upper bound on power); $/Mtok at the recipe's price_per_gpu_hour_usd.

Under a latency SLO (`serving`): each model's cheapest way to serve one stated scenario (SCENARIO) on
each GPU with its compared format, by `forge recommend`'s search (pipeline/sizing/recommend.py) at
the catalog's default prices, with its throughput-per-GPU vs tok/s-per-user curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.formats import KV_CACHE_DTYPES
from pipeline.core.gpus import GpuSpec
from pipeline.recipe.loading import Recipe
from pipeline.sizing.iteration import Efficiency
from pipeline.sizing.online import Slo
from pipeline.sizing.plan import Plan
from pipeline.sizing.published import Row, predict_row
from pipeline.sizing.recommend import Demand, Offer, recommend

# (format, GPU) pairs the comparison covers: the seed's question is Hopper FP8 against Blackwell FP4.
COMPARED = (("fp8", "h100"), ("fp8", "h200"), ("nvfp4", "b200"))
# Published-table names (bench/data/*.csv) for the shipped models' Hugging Face repos.
PUBLISHED_MODEL = {"meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B", "meta-llama/Llama-3.3-70B-Instruct": "Llama-3.3-70B"}
PUBLISHED_GPU = {"h100": "H100", "h200": "H200", "b200": "B200"}
PUBLISHED_PRECISION = {"fp8": "FP8", "nvfp4": "FP4"}
PUBLISHED_ISL_OSL = (1000, 1000)
# The seed brief's claims, shown with forge's predicted figure and the published measurement beside them.
CLAIM_SPEEDUP = 2.5  # "up to 2.5x throughput" (B200 over H200)
CLAIM_H200_PER_B200 = (2, 3)  # "a single B200 handles what needed two or three H200s"
CLAIM_FP4_SAVING = (0.25, 0.50)  # "cost per token 25-50% lower with FP4"
CLAIM_JOULES_PER_TOKEN = 0.4  # "0.4 J/token"
# The report's serving scenario: a chat-like 1000/1000 workload at 100 requests/s (enough that every model
# needs several GPUs, so a partly idle last replica weighs little in $/Mtok), held to MLPerf's
# Llama-2-70B Server TTFT limit (2 s, p99) and 50 ms TPOT (20 tokens/s per user).
SCENARIO = Demand(((1000, 1000),), 100.0, Slo(2000, 50))


def compare(planned: Sequence[tuple[Recipe, Mapping[str, Plan]]], catalog: Mapping[str, GpuSpec],
            published: Sequence[Row], eff: Efficiency | None = None) -> dict[str, Any]:
    """Rows per (recipe, GPU), the B200/H200 ratio per model, and the seed's claims; `planned` is
    each recipe with its targets' plans (as validation made them)."""
    eff = eff or Efficiency.load()
    rows = [row for recipe, plans in planned for row in _recipe_rows(recipe, plans, catalog, published, eff)]
    under_slo = serving(planned, catalog, eff)
    return {"rows": rows, "ratios": ratios(rows), "serving": under_slo, "claims": claims(rows, under_slo, catalog),
            "basis": "predicted by pipeline/sizing/perfmodel.py (trtllm-bench offline scenario) and "
                     "pipeline/sizing/online.py (under the SLO); J/token at TDP"}


def serving(planned: Sequence[tuple[Recipe, Mapping[str, Plan]]], catalog: Mapping[str, GpuSpec],
            eff: Efficiency) -> list[dict[str, Any]]:
    """Per model and compared GPU: the cheapest configuration for SCENARIO, and its concurrency curve."""
    out = []
    for model in dict.fromkeys(recipe.model for recipe, _ in planned):
        config = model.architecture()
        for fmt, gpu in COMPARED:
            offer = Offer(gpu, catalog[gpu], catalog[gpu].usd_per_gpu_hour, "catalog default")
            best = recommend(config, SCENARIO, [offer], KV_CACHE_DTYPES["fp8"], {}, (fmt,), eff, pareto=1,
                             cheapest_only=True).cheapest
            if best is None:
                continue
            out.append({"model": model.spec.source.repo_id, "gpu": gpu, "format": fmt, "parallelism": best.parallelism,
                        "replicas": best.replicas, "gpus": best.gpus, "usd_per_gpu_hour": offer.usd_per_gpu_hour,
                        "usd_per_mtok": best.usd_per_mtok, "joules_per_token": best.joules_per_token,
                        "ttft_ms_p99": best.ttft_ms["p99"], "tpot_ms_p99": best.tpot_ms["p99"],
                        "replica_rate_per_s": best.replica_rate_per_s, "pareto": best.pareto})
    return out


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


def claims(rows: Sequence[Mapping[str, Any]], under_slo: Sequence[Mapping[str, Any]],
           catalog: Mapping[str, GpuSpec]) -> list[dict[str, Any]]:
    """Each claim with forge's figure and, where NVIDIA publishes the run, the measured figure (the
    Llama-3.3-70B 1000/1000 rows: B200 FP4 TP1 and H200 FP8 TP1, priced and powered like forge's)."""
    ratio_rows = ratios(rows)
    best_ratio = max((r["predicted_b200_over_h200_per_gpu"] for r in ratio_rows), default=None)
    published_ratio = max((r["published_b200_over_h200_per_gpu"] for r in ratio_rows
                           if r["published_b200_over_h200_per_gpu"]), default=None)
    joules = sorted(rows, key=lambda r: r["predicted_joules_per_token"])
    pub = {(r["gpu"], r["format"]): r for r in rows if r["published_output_tok_s"]}
    b, h = pub.get(("b200", "nvfp4")), pub.get(("h200", "fp8"))

    def measured_per_gpu(r):
        return r["published_output_tok_s"] / r["tp"]
    published_cost = published_joules = None
    if b and h:
        cost = {g: catalog[g].usd_per_gpu_hour / measured_per_gpu(r) for g, r in (("b200", b), ("h200", h))}
        published_cost = 1 - cost["b200"] / cost["h200"]
        published_joules = catalog["b200"].tdp_watts / measured_per_gpu(b)
    by_model: dict[str, dict[str, Mapping[str, Any]]] = {}
    for s in under_slo:
        by_model.setdefault(s["model"], {})[s["gpu"]] = s
    pairs = [m for m in by_model.values() if "b200" in m and "h200" in m]
    h200_per_b200 = [m["h200"]["gpus"] / m["b200"]["gpus"] for m in pairs]
    savings = [1 - m["b200"]["usd_per_mtok"] / m["h200"]["usd_per_mtok"] for m in pairs]
    scenario = f"{SCENARIO.rate_per_s:g} req/s of 1000/1000 within {SCENARIO.slo}, catalog prices"
    return [
        {"claim": f"up to {CLAIM_SPEEDUP:g}x throughput (B200 over H200)", "claimed": CLAIM_SPEEDUP,
         "forge_predicted": best_ratio, "forge_predicted_max": None, "published": published_ratio,
         "forge_basis": "largest predicted B200 NVFP4 / H200 FP8 tok/s per GPU over the models (offline run)"},
        {"claim": "a single B200 handles what needed two or three H200s", "claimed": CLAIM_H200_PER_B200,
         "forge_predicted": min(h200_per_b200, default=None), "forge_predicted_max": max(h200_per_b200, default=None),
         "published": published_ratio,
         "forge_basis": f"H200 FP8 GPUs per B200 NVFP4 GPU for the same demand ({scenario}), over the models"},
        {"claim": "cost per token 25-50% lower with FP4", "claimed": CLAIM_FP4_SAVING,
         "forge_predicted": min(savings, default=None), "forge_predicted_max": max(savings, default=None),
         "published": published_cost,
         "forge_basis": f"1 - B200 NVFP4 $/Mtok / H200 FP8 $/Mtok ({scenario}), over the models"},
        {"claim": f"{CLAIM_JOULES_PER_TOKEN:g} J/token", "claimed": CLAIM_JOULES_PER_TOKEN,
         "forge_predicted": joules[0]["predicted_joules_per_token"] if joules else None,
         "forge_predicted_max": joules[-1]["predicted_joules_per_token"] if joules else None,
         "published": published_joules,
         "forge_basis": (f"at TDP, offline run, from {joules[0]['target']} to {joules[-1]['target']}" if joules else "-")},
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
    lines.append(f"\nUnder a latency SLO: the cheapest way to serve {SCENARIO.rate_per_s:g} req/s of 1000/1000 within "
                 f"{SCENARIO.slo} on each GPU (`forge recommend`'s search, catalog prices; predicted):\n")
    lines.append("| model | GPU | format | parallelism | GPUs | p99 TTFT / TPOT ms | $/Mtok | J/token |\n"
                 "|---|---|---|---|---|---|---|---|")
    for r in result["serving"]:
        lines.append(f"| {r['model'].split('/')[-1]} | {r['gpu']} | {r['format']} | {r['parallelism']} | "
                     f"{r['replicas']} x {r['gpus'] // r['replicas']} | {r['ttft_ms_p99']:,.0f} / {r['tpot_ms_p99']:.1f} | "
                     f"{_num(r['usd_per_mtok'], '.3f')} | {r['joules_per_token']:.3f} |")
    lines.append("\nThe seed's claims beside forge's predicted figures and NVIDIA's published measurement "
                 "(Llama-3.3-70B, trtllm-bench 1000/1000, B200 FP4 and H200 FP8 at TP 1; priced and powered as forge "
                 "prices and powers its own):\n")
    lines.append("| claim | forge predicted | published measurement | basis |\n|---|---|---|---|")
    for c in result["claims"]:
        value = _num(c["forge_predicted"], ".2f")
        if c["forge_predicted_max"] is not None:
            value += f" to {c['forge_predicted_max']:.2f}"
        lines.append(f"| {c['claim']} | {value} | {_num(c['published'], '.2f')} | {c['forge_basis']} |")
    for fig in figures:
        lines.append(f"\n![{fig.stem}]({fig.as_posix()})")
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
