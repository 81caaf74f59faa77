"""`forge recommend`: which GPU, format and parallelism serve a demand at the lowest cost within its
latency limits. The search and every figure are pipeline/sizing/recommend.py's (all predicted); this
verb reads the inputs (a recipe model or a config.json, lengths, prices) and the accuracy forge has
measured for the model (pipeline/planning/accuracy_evidence.py), and prints a table, JSON or a plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.cliargs import add_verb, arg, run_with
from pipeline.core.errors import RecipeError
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES, KV_CACHE_NAMES, canonical_kv_dtype
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.core.tables import print_table as print_rich_table
from pipeline.core.yamlio import read_json
from pipeline.planning.accuracy_evidence import model_verdicts
from pipeline.recipe.loading import load_model
from pipeline.reporting.plots import plot_pareto
from pipeline.sizing.online import Slo
from pipeline.sizing.recommend import AS_PUBLISHED, Demand, Offer, Recommendation, recommend

RECOMMEND_EXAMPLE = """examples:
  forge recommend recipes/llama-3-3-70b-instruct --input-len 1000 --output-len 1000 --rate 20 --ttft-ms 2000 --tpot-ms 50
  forge recommend recipes/qwen3-30b-a3b --input-len 1024 --output-len 1024 --rate 50 --ttft-ms 1000 --tpot-ms 30 \\
      --gpu h200 --gpu b200 --price b200=4.50 --plot pareto.png
  forge recommend --model-config config.json --lengths lengths.csv --rate 5 --ttft-ms 500 --tpot-ms 30 --json
lengths.csv has columns isl,osl, one request kind per row (all equally likely).
MLPerf's latency limits (p99, loadgen/mlperf.conf): Llama-2-70B Server 2000/200 ms, Interactive 450/40 ms;
Llama-3.1-8B Server 2000/100 ms, Interactive 500/30 ms (TTFT/TPOT).
"""


@dataclass(frozen=True, kw_only=True)
class RecommendArgs:
    """`forge recommend`'s arguments, declared once (pipeline/core/cliargs.py)."""

    model: str | None = arg(positional="MODEL", nargs="?",
                            help="a recipe model directory (recipes/<model>): its config and its measured accuracy")
    model_config: Path | None = arg(help="an HF config.json instead (no accuracy measured by forge)")
    input_len: int | None = arg(help="prompt tokens per request")
    output_len: int | None = arg(help="output tokens per request")
    lengths: Path | None = arg(help="CSV with columns isl,osl: request kinds, equally likely (instead of the two above)")
    rate: float = arg(required=True, help="requests per second to serve")
    ttft_ms: float = arg(required=True, help="time-to-first-token limit, ms, at --percentile (queueing included)")
    tpot_ms: float = arg(required=True, help="time-per-output-token limit, ms, at --percentile (first token excluded)")
    percentile: float = arg(99.0, help="the percentile over requests the limits hold at (MLPerf: 99)")
    gpu: tuple[str, ...] = arg((), help="a candidate GPU (repeat); default: every GPU in the catalog")
    price: tuple[str, ...] = arg((), metavar="GPU=USD", help="USD per GPU-hour for a GPU (repeat); default: the catalog's")
    format: tuple[str, ...] = arg((), choices=(*FORMATS, AS_PUBLISHED),
                                  help=f"only these formats (repeat; {AS_PUBLISHED}: a pre-quantized checkpoint as shipped); "
                                       "default: all the GPU runs")
    kv_dtype: str = arg("fp8", choices=KV_CACHE_NAMES, help="KV-cache dtype (default fp8, as NVIDIA's published runs)")
    json: bool = arg(False, help="print JSON: every option and every rejected configuration")
    plot: Path | None = arg(help="write the throughput-per-GPU vs tok/s-per-user plot (PNG) here")
    top: int = arg(12, help="table rows to show (cheapest first)")


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "recommend", run_with(RecommendArgs, run_recommend),
             help="the cheapest GPU x format x parallelism x replicas that meets a rate and latency limits (predicted)",
             epilog=RECOMMEND_EXAMPLE)


def run_recommend(args: RecommendArgs) -> int:
    check_numbers(args)
    kv = KV_CACHE_DTYPES[canonical_kv_dtype(args.kv_dtype)]
    config, evaluated, evidence, label = model_inputs(args, kv.name)
    demand = Demand(read_lengths(args), args.rate, Slo(args.ttft_ms, args.tpot_ms, args.percentile))
    offers = read_offers(args)
    result = recommend(config, demand, offers, kv, evaluated, args.format or None, pareto=args.top if args.plot else 0)
    plot = None
    if args.plot:
        curves = [(f"{o.gpu} {o.format} {o.parallelism}", o.pareto) for o in result.options[:args.top]]
        plot = plot_pareto(curves, f"{label}: {demand.slo}, predicted", args.plot)
    if args.json:
        print(json.dumps(recommendation_json(result, demand, offers, evidence), indent=2))
    else:
        print_table(result, demand, label, evidence, args.top, plot)
    return 0


def check_numbers(args: RecommendArgs) -> None:
    """Finite, positive numbers where the search needs them (NaN passes a `<= 0` test)."""
    for flag, value in (("--rate", args.rate), ("--ttft-ms", args.ttft_ms), ("--tpot-ms", args.tpot_ms)):
        if not (math.isfinite(value) and value > 0):
            raise RecipeError(flag, f"{value} is not a positive finite number.", f"e.g. {flag} 10.")
    if not 0 < args.percentile <= 100:
        raise RecipeError("--percentile", f"{args.percentile} is outside (0, 100].", "e.g. --percentile 99 (MLPerf's).")
    if args.top < 1:
        raise RecipeError("--top", f"{args.top} rows.", "give 1 or more.")


def model_inputs(args: RecommendArgs, kv_dtype: str) -> tuple[dict[str, Any], dict[str, str], dict[str, str], str]:
    """The config, format -> verdict (of recipes with this KV-cache dtype), format -> the file that
    holds it, and a label."""
    if bool(args.model) == bool(args.model_config):
        raise RecipeError("forge recommend", "give one model: a recipe model directory, or --model-config.",
                          "e.g. forge recommend recipes/llama-3-3-70b-instruct ...")
    if args.model_config:
        return read_json(args.model_config), {}, {}, args.model_config.stem
    model = load_model(Path(args.model))
    verdicts = model_verdicts(model.directory, kv_dtype=kv_dtype)
    return (model.architecture(), {f: v.verdict for f, v in verdicts.items()},
            {f: f"{v.verdict} ({v.evidence})" for f, v in verdicts.items()}, model.name)


def read_lengths(args: RecommendArgs) -> tuple[tuple[int, int], ...]:
    if args.lengths and (args.input_len or args.output_len):
        raise RecipeError("--lengths", "given with --input-len/--output-len.", "give one or the other.")
    if args.lengths:
        try:
            with open(args.lengths, newline="") as handle:
                rows = [(int(r["isl"]), int(r["osl"])) for r in csv.DictReader(handle)]
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise RecipeError(str(args.lengths), f"cannot read request lengths ({exc!r}).",
                              "a CSV with a header isl,osl and one positive integer pair per row.") from None
    elif args.input_len and args.output_len:
        rows = [(args.input_len, args.output_len)]
    else:
        raise RecipeError("forge recommend", "no request lengths.", "give --input-len and --output-len, or --lengths FILE.")
    if not rows or any(i < 1 or o < 2 for i, o in rows):
        raise RecipeError(str(args.lengths or "--input-len/--output-len"), "lengths must be isl >= 1 and osl >= 2 "
                          "(TPOT needs a second token).", "fix the lengths.")
    return tuple(rows)


def read_offers(args: RecommendArgs) -> list[Offer]:
    catalog = load_catalog(DEFAULT_CATALOG)
    keys = tuple(dict.fromkeys(args.gpu)) or tuple(catalog)
    unknown = sorted(set(keys) - set(catalog))
    if unknown:
        raise RecipeError("--gpu", f"unknown GPU {unknown}.", f"use catalog keys: {sorted(catalog)}.")
    prices: dict[str, float] = {}
    for item in args.price:
        key, _, value = item.partition("=")
        try:
            prices[key] = float(value)
        except ValueError:
            prices[key] = math.nan
        if key not in catalog or not (math.isfinite(prices[key]) and prices[key] > 0):
            raise RecipeError("--price", f"{item!r} is not GPU=USD with a catalog GPU and a positive finite price.",
                              "e.g. --price h200=3.50")
        if key not in keys:
            raise RecipeError("--price", f"{key} is priced but not a candidate (--gpu {' --gpu '.join(keys)}).",
                              f"add --gpu {key}, or drop its price.")
    return [Offer(k, catalog[k], prices.get(k, catalog[k].usd_per_gpu_hour),
                  "--price" if k in prices else ("catalog default (pipeline/core/data/gpus.yaml)"
                                                 if catalog[k].usd_per_gpu_hour else "not priced"))
            for k in keys]


def recommendation_json(result: Recommendation, demand: Demand, offers: list[Offer], evidence: dict[str, str]) -> dict:
    cheapest = result.cheapest
    return {
        "predicted": True,
        "demand": {"lengths": demand.lengths, "rate_per_s": demand.rate_per_s, "slo": str(demand.slo)},
        "prices": {o.key: {"usd_per_gpu_hour": o.usd_per_gpu_hour, "source": o.price_source} for o in offers},
        "accuracy_evidence": evidence,
        "cheapest": cheapest.to_json() if cheapest else None,
        "options": [o.to_json() for o in result.options],
        "rejected": [asdict(r) for r in result.rejected],
        "seconds_per_configuration_median": statistics.median([o.seconds for o in result.options]) if result.options else None,
    }


def _money(value: float | None, digits: int = 2) -> str:
    return "not priced" if value is None else f"${value:,.{digits}f}"


def print_table(result: Recommendation, demand: Demand, label: str, evidence: dict[str, str], top: int,
                plot: Path | None) -> None:
    key = f"p{demand.slo.percentile:g}"
    lengths = ", ".join(f"{i}/{o}" for i, o in demand.lengths)
    from rich.table import Table

    print(f"{label}: {demand.rate_per_s:g} req/s of ISL/OSL {lengths} within {demand.slo} (all figures predicted)")
    table = Table()
    for column in ("GPU", "format", "parallelism", "replicas x GPUs", "req/s/replica", f"{key} TTFT/TPOT ms",
                   "tok/s/GPU", "$/hour", "$/month", "$/Mtok", "J/token", "accuracy"):
        table.add_column(column)
    for o in result.options[:top]:
        table.add_row(o.gpu, o.format, o.parallelism, f"{o.replicas} x {o.gpus_per_replica}", f"{o.replica_rate_per_s:,.2f}",
                      f"{o.ttft_ms[key]:,.0f} / {o.tpot_ms[key]:,.1f}", f"{o.output_tok_s_per_gpu:,.0f}",
                      _money(o.usd_per_hour), _money(o.usd_per_month, 0), _money(o.usd_per_mtok, 3),
                      f"{o.joules_per_token:.2f}", o.accuracy)
    print_rich_table(table)
    if len(result.options) > top:
        print(f"... {len(result.options) - top} more feasible configurations (--top, --json)")
    cheapest = result.cheapest
    if cheapest:
        print(f"cheapest: {cheapest.gpus} x {cheapest.gpu} ({cheapest.replicas} replicas of {cheapest.parallelism}), "
              f"{cheapest.format}, {_money(cheapest.usd_per_month, 0)}/month, {_money(cheapest.usd_per_mtok, 3)}/Mtok "
              f"({cheapest.accuracy})")
    elif not result.options:
        print("no configuration meets the demand: see the rejected ones with --json")
    print(f"rejected: {len(result.rejected)} configurations (do not fit, fail their accuracy gate, or miss the SLO)")
    if evidence:
        print("accuracy measured by forge: " + "; ".join(f"{f}: {v}" for f, v in sorted(evidence.items())))
    if result.options:
        print(f"prediction time per configuration: median {1e3 * statistics.median(o.seconds for o in result.options):.0f} ms")
    if plot:
        print(f"plot: {plot}")
    print("J/token at TDP (an upper bound); $/Mtok on the demand's tokens (idle replica capacity is paid for)")
