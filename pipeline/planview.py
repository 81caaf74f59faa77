"""What `forge plan` prints: one typed object per planned target, turned into JSON by one
function and into a table by another, for recipe targets, what-ifs and ad-hoc plans alike.

A field added to `PlannedTarget` (and one line in `plan_json` / `plan_rows`) appears in every
form. A plan that does not fit prints its memory rows and what would fit, never throughput.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.sizing import Alternative, Plan, throughput_rows

# Keys of Plan.to_json() that are throughput predictions: left out (None) when the plan does not fit.
THROUGHPUT_KEYS = ("decode_tok_s_batch1", "decode_bound_batch1", "decode_tok_s_max_batch", "decode_bound_max_batch",
                   "decode_tok_s_per_user_max_batch", "prefill_tok_s", "joules_per_token", "usd_per_mtok",
                   "predicted_output_tok_s", "predicted_output_tok_s_per_gpu", "throughput")


@dataclass(frozen=True)
class PlanRequest:
    """What to plan and how it was asked for: a recipe target, a what-if on one, or ad-hoc flags."""

    title: str  # the artifact name, "<name> (what-if)", or "ad-hoc"
    spec: Any  # pipeline.validate.TargetSpec
    what_ifs: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    calibration: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # catalog -> calibration plan JSON


@dataclass(frozen=True)
class PlannedTarget:
    title: str  # the artifact name, or "ad-hoc"
    plan: Plan
    what_ifs: dict[str, Any] = field(default_factory=dict)  # settings overridden on top of a recipe
    defaults: dict[str, Any] = field(default_factory=dict)  # settings taken from TARGET_DEFAULTS
    would_fit: tuple[Alternative, ...] = ()  # when it does not fit: what would, computed
    calibration_plan: dict[str, Any] | None = None  # pipeline.placement.CalibrationPlan.to_json()

    @property
    def fits(self) -> bool:
        return self.plan.fits


def plan_json(target: PlannedTarget) -> dict[str, Any]:
    out = target.plan.to_json()
    if not target.fits:
        out.update({key: None for key in THROUGHPUT_KEYS})
        out["predicted"] = []
    out["what_ifs"] = target.what_ifs
    out["defaults"] = target.defaults
    out["would_fit"] = [vars(a) for a in target.would_fit]
    if target.calibration_plan is not None:
        out["calibration_plan"] = target.calibration_plan
    return out


def significant(value: float | None, digits: int = 3, unit: str = "") -> str:
    """`digits` significant digits without an exponent: 0.0152 J, $0.0123, 2,587 tok/s."""
    if value is None:
        return "-"
    if value == 0:
        return f"0{unit}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}{unit}"


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:,.2f} GB"


def plan_rows(target: PlannedTarget) -> list[tuple[str, str]]:
    p = plan_json(target)
    inputs = p["inputs"]
    rows = [
        ("format / KV cache", f"{inputs['format']} / {inputs['kv_cache_dtype']}"),
        ("GPU (compute capability) x TP", f"{inputs['gpu']} ({inputs['compute_capability']}) x {inputs['tp']}"),
        ("ISL / OSL / max_seq_len", f"{inputs['max_input_len']:,} / {inputs['max_output_len']:,} / {inputs['seq_len']:,}"),
        ("params", f"{p['params'] / 1e9:,.3f} B"),
        ("weights (all GPUs)", _gb(p["weights_bytes"])),
        ("weights per GPU", _gb(p["weights_bytes_per_gpu"])),
        ("KV per token (per GPU)",
         f"{p['kv_bytes_per_token'] / 1024:,.1f} KiB ({p['kv_bytes_per_token_per_gpu'] / 1024:,.1f} KiB)"),
        ("GPU memory", _gb(p["memory_bytes"])),
        ("runtime reserve (estimate)", _gb(p["reserve_bytes"])),
        ("memory left for KV", _gb(p["memory_left_for_kv_bytes"])),
        (f"KV pool ({inputs['kv_cache_free_gpu_memory_fraction']:.0%} of that)", _gb(p["kv_pool_bytes"])),
        ("KV capacity", f"{p['kv_capacity_tokens']:,} tokens"),
        (f"max batch at seq len {inputs['seq_len']:,}", f"{p['max_batch_at_seq_len']:,}"),
        ("fits", "yes" if p["fits"] else f"NO: {p['why_not']}"),
        ("smallest TP that fits", str(p["min_tp"]) if p["min_tp"] else "none up to 8"),
    ]
    if target.calibration_plan and "skipped" in target.calibration_plan:
        rows.append(("calibration placement", f"not planned: {target.calibration_plan['skipped']}"))
    elif target.calibration_plan is not None:
        from pipeline.placement import table_rows

        rows += table_rows(target.calibration_plan)
    if not target.fits:
        return rows  # no throughput for a plan that cannot run; what would fit is printed below
    rows += [
        ("decode tok/s, batch 1 (ceiling)", significant(p["decode_tok_s_batch1"], 4)),
        (f"decode tok/s, batch {p['decode_batch']} (ceiling)", significant(p["decode_tok_s_max_batch"], 4)),
        ("  bound by", str(p["decode_bound_max_batch"])),
        ("prefill tok/s (ceiling)", significant(p["prefill_tok_s"], 4)),
        ("J/token at TDP (at the ceiling)", significant(p["joules_per_token"], 3, " J")),
        ("$ per M output tokens (at the ceiling)",
         "-" if p["usd_per_mtok"] is None else "$" + significant(p["usd_per_mtok"], 3)),
    ]
    return rows + throughput_rows(p)


def render_plan_table(target: PlannedTarget) -> None:
    from rich.table import Table

    from pipeline.tables import print_table

    table = Table(title=target.title, show_header=True, header_style="bold")
    table.add_column("quantity", no_wrap=True)
    table.add_column("value", justify="right")
    for key, value in plan_rows(target):
        table.add_row(key, value)
    print_table(table)
    if target.what_ifs:
        print("what-if: " + ", ".join(f"{k}={v}" for k, v in target.what_ifs.items()) + " (on top of the recipe)")
    if target.defaults:
        print("defaults: " + ", ".join(f"{k}={v}" for k, v in target.defaults.items()))
    if not target.fits:
        print("what would fit (same model and serving shape): "
              + ("; ".join(str(a) for a in target.would_fit[:6]) or "nothing in the GPU catalog"))
    else:
        print(f"ceiling = decode/prefill roofline from {target.plan.roofline['ceilings_source']} rates, an upper "
              "bound; predicted = trtllm-bench's offline run at the chosen limits (pipeline/perfmodel.py).")
