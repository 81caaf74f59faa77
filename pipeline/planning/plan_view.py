"""What `forge plan` prints: one typed object per planned target (`TargetPlanView`), turned into JSON
by `plan_json` and into a table by `plan_rows`, for recipe targets, what-ifs and ad-hoc plans alike."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.tables import print_table
from pipeline.sizing.memory import Alternative
from pipeline.sizing.plan import Plan

# Keys of Plan.to_json() that are throughput predictions: left out (None) when the plan does not fit.
THROUGHPUT_KEYS = ("decode_tok_s_batch1", "decode_bound_batch1", "decode_tok_s_max_batch", "decode_bound_max_batch",
                   "decode_tok_s_per_user_max_batch", "prefill_tok_s", "joules_per_token", "usd_per_mtok",
                   "predicted_output_tok_s", "predicted_output_tok_s_per_gpu", "throughput")


@dataclass(frozen=True)
class TargetPlanView:
    """One planned target as `forge plan` shows it: its plan and how it was asked for."""

    title: str  # the artifact name, or "ad-hoc"
    plan: Plan
    what_ifs: dict[str, Any] = field(default_factory=dict)  # settings overridden on top of a recipe
    defaults: dict[str, Any] = field(default_factory=dict)  # settings taken from TARGET_DEFAULTS
    would_fit: tuple[Alternative, ...] = ()  # when it does not fit: what would, computed
    calibration_plan: dict[str, Any] | None = None  # pipeline.sizing.placement.CalibrationPlan.to_json()

    @property
    def fits(self) -> bool:
        return self.plan.fits


def plan_json(target: TargetPlanView) -> dict[str, Any]:
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


def plan_rows(target: TargetPlanView) -> list[tuple[str, str]]:
    p = plan_json(target)
    inputs = p["inputs"]
    rows = [
        ("format / KV cache", f"{inputs['format']} / {inputs['kv_cache_dtype']}"),
        ("GPU (compute capability) x TP", f"{inputs['gpu']} ({inputs['compute_capability']}) x {inputs['tp']}"
         + (f", EP {inputs['ep']}" if inputs["ep"] > 1 else "") + (", attention DP" if inputs["attention_dp"] else "")),
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
    rows += parallel_rows(p["parallel_choices"])
    if target.calibration_plan and "skipped" in target.calibration_plan:
        rows.append(("calibration placement", f"not planned: {target.calibration_plan['skipped']}"))
    elif target.calibration_plan and "refused" in target.calibration_plan:
        rows.append(("calibration placement", f"not placeable on {_refused_node(target.calibration_plan)} (below)"))
    elif target.calibration_plan is not None:
        rows += calibration_rows(target.calibration_plan)
    if not target.fits:
        return rows  # no throughput for a plan that cannot run; what would fit is printed below
    rows += [
        ("decode tok/s, batch 1 (ceiling)", significant(p["decode_tok_s_batch1"], 4)),
        (f"decode tok/s, batch {p['decode_batch']} (ceiling)", significant(p["decode_tok_s_max_batch"], 4)),
        ("  bound by", str(p["decode_bound_max_batch"])),
        ("prefill tok/s (ceiling)", significant(p["prefill_tok_s"], 4)),
    ]
    return rows + throughput_rows(p)


def parallel_rows(choices: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """An MoE plan's splits over the same GPUs (Plan.parallel_choices), one row each."""
    if len(choices) < 2:
        return []
    rows = [("splits over these GPUs", "weights/GPU, KV pool/GPU, max batch")]
    for c in choices:
        value = (f"{c['weights_bytes_per_gpu'] / 1e9:,.1f} GB, {c['kv_pool_bytes_per_gpu'] / 1e9:,.1f} GB, "
                 + (f"{c['max_batch_at_seq_len']:,}" if c["fits"] else "does not fit"))
        rows.append((f"  {c['parallelism']}" + (" (this plan)" if c["chosen"] else ""), value))
    return rows


def _refused_node(plan: dict[str, Any]) -> str:
    node = plan["refused"]["node"]
    return "the recipe's calibration.node" if node is None else f"{node['count']} x {node['gpu']}"


def calibration_rows(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """`forge plan`'s table rows for a calibration plan (its JSON form)."""
    node = plan["node"]
    rows = [
        ("calibration node", f"{node['count']} x {node['gpu']}"
         + (f" + {node['cpu_offload_bytes'] / 1e9:,.0f} GB CPU offload" if node["cpu_offload_bytes"] else "")),
        ("calibration BF16 weights", f"{plan['weights_bytes'] / 1e9:,.2f} GB"),
        (f"calibration GPUs used (batch {plan['batch_size']} x {plan['seq_len']})", str(plan["gpus"])),
    ]
    for load in plan["loads"]:
        first, last = load["modules"][0], load["modules"][-1]
        rows.append((f"  GPU {load['gpu']}: {first} .. {last}",
                     f"{load['total_bytes'] / 1e9:,.1f} GB, headroom {load['headroom_bytes'] / 1e9:,.1f} GB"))
    rows.append(("calibration CPU offload", f"{plan['offload_bytes'] / 1e9:,.2f} GB"))
    return rows


def throughput_rows(plan_json: dict[str, Any]) -> list[tuple[str, str]]:
    """`forge plan`'s table rows for the predicted run (throughput_json's keys)."""
    t = plan_json.get("throughput")
    if not t:
        return [("output tok/s (predicted)", "-")]
    gpus = plan_json["inputs"]["tp"]
    return [
        ("runtime limits: max batch / max tokens", f"{t['max_batch_size']:,} / {t['max_num_tokens']:,}"),
        (f"output tok/s, ISL/OSL {plan_json['inputs']['max_input_len']}/{plan_json['inputs']['max_output_len']} (predicted)",
         f"{t['predicted_output_tok_s']:,.1f}" + (f" ({t['predicted_output_tok_s_per_gpu']:,.1f} per GPU)" if gpus > 1 else "")),
        ("  per user / TTFT, both incl. queue wait / TPOT (predicted)",
         f"{t['predicted_output_tok_s_per_user']:,.1f} tok/s / {t['predicted_ttft_ms'] / 1e3:,.1f} s / "
         + f"{t['predicted_tpot_ms']:,.1f} ms"),
        ("  bound by (prefill / decode)", f"{t['bound_prefill']} / {t['bound_decode']}"),
        ("J/token at TDP (predicted)", significant(plan_json["joules_per_token"], 3, " J")),
        ("$ per M output tokens (predicted)",
         "-" if plan_json["usd_per_mtok"] is None else "$" + significant(plan_json["usd_per_mtok"], 3)),
    ]


def render_plan_table(target: TargetPlanView) -> None:
    from rich.table import Table

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
    refused = (target.calibration_plan or {}).get("refused")
    if refused:
        print(f"calibration placement (answered apart from the serving plan above): {refused['where']}: "
              f"{refused['problem']} Fix: {refused['fix']}")
    if not target.fits:
        print("what would fit (same model and serving shape): "
              + ("; ".join(str(a) for a in target.would_fit[:6]) or "nothing in the GPU catalog"))
    else:
        print(f"ceiling = decode/prefill roofline from {target.plan.roofline['ceilings_source']} rates, an upper "
              "bound; predicted = trtllm-bench's offline run at the chosen limits (pipeline/sizing/perfmodel.py), "
              "priced at that run; it submits every request at once, so TTFT and per-user tok/s include queue wait.")
