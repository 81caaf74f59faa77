"""Hand-made handoffs for tests that fabricate stage outputs: the smallest details that satisfy the
closed models of pipeline/handoff.py (build_manifest refuses anything less)."""

from __future__ import annotations

from typing import Any


def build_details(plan: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A build handoff (BuildDetails) around `plan` (Plan.to_json of a real plan when the test reads it)."""
    plan = plan or {"inputs": {}, "params": 0, "params_by_component": {}, "weights_bytes": 0, "weights_bytes_per_gpu": 0,
                    "kv_bytes_per_token": 0, "kv_bytes_per_token_per_gpu": 0, "memory_bytes": 0, "reserve_bytes": 0,
                    "memory_left_for_kv_bytes": 0, "kv_pool_bytes": 0, "kv_capacity_tokens": 0,
                    "max_batch_at_seq_len": 0, "fits": True, "why_not": None, "min_tp": 1, "throughput": {},
                    "predicted": []}
    inputs = plan["inputs"]
    return {"model": "m", "format": inputs.get("format", "fp8"), "kv_cache_dtype": inputs.get("kv_cache_dtype", "fp8"),
            "gpu": inputs.get("gpu", "h200"), "gpu_name": "GPU", "compute_capability": str(inputs.get("compute_capability", "9.0")),
            "tp": inputs.get("tp", 1), "engine": "pytorch", "made_for": {"tensorrt_llm": "1.2.1"}, "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8", "checkpoint": {}, "llm_api_options": {}, "plan": plan, "load_tested": False,
            "load_test": {}, **fields}
