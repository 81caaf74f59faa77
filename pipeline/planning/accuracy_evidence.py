"""What forge has measured of a model's accuracy per format, for `forge recommend`: the verdicts in the
committed metrics files (metrics/evaluate/<recipe id>.json from the evaluate stage and
metrics/serve/<recipe id>-<gpu>.json from serve-eval; pipeline/handoff/kpis.py names their keys).

The rule is the publish gate's (pipeline/recipe/eval_schema.py GATE_RULE): where an engine served a
bundle, the served verdict decides (the worst over the GPUs it was served for); otherwise the evaluate
stage's. A format passes for the model when any of its recipes with the asked KV-cache dtype passed
(a variant is a way to get it); it fails when one was measured and none passed. A format with no
metrics file was never evaluated here. The metrics are the checkout's that holds the recipes
(<root>/recipes/<model> -> <root>/metrics), wherever forge runs from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import RecipeError
from pipeline.recipe.loading import load_recipe, walk_recipes


@dataclass(frozen=True)
class Verdict:
    format: str
    verdict: str  # PASS, FAIL or INCONCLUSIVE
    evidence: str  # the metrics file that decided it


def _verdict(metrics: dict) -> str:
    if metrics.get("gate_pass") == 1:
        return "PASS"
    return "FAIL" if metrics.get("gates_failed", 0) > 0 else "INCONCLUSIVE"


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecipeError(str(path), f"cannot read the metrics file ({exc}).",
                          "re-run the stage that writes it (dvc repro), or delete it to treat the format as not measured.") from None


def model_verdicts(model_dir: Path, metrics_dir: Path | None = None, kv_dtype: str | None = None) -> dict[str, Verdict]:
    """format -> its verdict for the model: per recipe the worst of its served verdicts (or its
    evaluate verdict where none was served), per format the best over its recipes (PASS over
    INCONCLUSIVE over FAIL). `kv_dtype`: only recipes with that KV-cache dtype count."""
    metrics_dir = metrics_dir or Path(model_dir).resolve().parents[1] / "metrics"
    rank = {"PASS": 0, "INCONCLUSIVE": 1, "FAIL": 2}
    best: dict[str, Verdict] = {}
    for path in walk_recipes(model_dir):
        recipe = load_recipe(path)
        if kv_dtype and recipe.spec.quant.kv_cache_dtype != kv_dtype:
            continue
        fmt = recipe.spec.quant.format
        found: list[Verdict] = []
        for gpu in recipe.spec.targets:
            served = _read(metrics_dir / "serve" / f"{recipe.id}-{gpu}.json")
            if served and served.get("served") == 1:
                found.append(Verdict(fmt, _verdict(served), str(metrics_dir / "serve" / f"{recipe.id}-{gpu}.json")))
        if not found:
            evaluated = _read(metrics_dir / "evaluate" / f"{recipe.id}.json")
            if evaluated:
                found.append(Verdict(fmt, _verdict(evaluated), str(metrics_dir / "evaluate" / f"{recipe.id}.json")))
        if not found:
            continue
        worst = max(found, key=lambda v: rank[v.verdict])
        if fmt not in best or rank[worst.verdict] < rank[best[fmt].verdict]:
            best[fmt] = worst
    return best
