"""Hand-made handoffs for tests that fabricate stage outputs: the smallest details that satisfy the
closed models of pipeline/handoff/models.py (build_manifest refuses anything less), around a real plan."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.planning.targets import plan_target
from pipeline.recipe.loading import load_recipe

SMALLEST = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-instruct" / "fp8.yaml"


@cache
def smallest_plan() -> dict[str, Any]:
    """Plan.to_json of the smallest recipe's H200 target, as build records it."""
    return plan_target(load_recipe(SMALLEST), "h200", load_catalog(DEFAULT_CATALOG)).to_json()


def build_details(plan: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A build handoff (BuildDetails) around `plan` (Plan.to_json of a real plan; the smallest one by default)."""
    plan = plan or copy.deepcopy(smallest_plan())
    inputs = plan["inputs"]
    return {"model": "m", "format": inputs["format"], "kv_cache_dtype": inputs["kv_cache_dtype"],
            "gpu": inputs["gpu"], "gpu_name": "GPU", "compute_capability": str(inputs["compute_capability"]),
            "tp": inputs["tp"], "engine": "pytorch", "made_for": {"tensorrt_llm": "1.2.1"}, "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8", "checkpoint": {}, "llm_api_options": {}, "plan": plan, "load_tested": False,
            "load_test": {}, **fields}
