"""What a stage asks Ray for: CPUs always; on a GPU stage of a GPU model, the GPU count and the GPU
kind as a custom resource, so an H200 target never lands on a B200 node.

Ray places a task only on a node that offers every resource it requests (Ray docs, "Resources":
custom resources are matched like CPU/GPU), and KubeRay labels a worker group with custom
resources through `rayStartParams: resources: '"{\\"gpu-h200\\": 8}"'`. The kind is the GPU
catalog key (pipeline/core/data/gpus.yaml), prefixed `gpu-`; the count comes from forge's own plans:
- calibrate, and evaluate/baseline without a served engine, hold the BF16 model on the recipe's
  calibration node: as many GPUs as pipeline/sizing/placement.py's calibration plan uses (`gpus`);
- build, throughput and served evaluation run on the target GPU: its kind x the target's TP
  (trtllm-serve / trtllm-bench run there; elsewhere throughput records `measured: null`);
- download, calibration-set, publish, report and any command that is not a GPU verb: CPU only.
Models with `default_pipeline: true` (the embedded default) run every stage on CPU by design
(model.yaml: "runs on CPU, offline"), so none of their stages asks for a GPU.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.fleet.dag import StageNode
from pipeline.recipe.loading import load_recipe
from pipeline.sizing.placement import plan_recipe_calibration

GPU_RESOURCE_PREFIX = "gpu-"
# Verbs that run on the target GPU; with --bundle (serve-eval) evaluate joins them.
TARGET_GPU_VERBS = frozenset({"build", "throughput"})
# Verbs that hold the unquantized model: on the recipe's calibration node.
NODE_GPU_VERBS = frozenset({"calibrate", "evaluate", "baseline"})


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1
    num_gpus: int = 0
    custom: dict[str, float] = field(default_factory=dict)
    why: str = "CPU stage"

    def ray_options(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.custom)}

    def describe(self) -> str:
        parts = [f"CPU {self.num_cpus:g}"] + ([f"GPU {self.num_gpus}"] if self.num_gpus else [])
        return ", ".join(parts + [f"{k} {v:g}" for k, v in self.custom.items()])


def gpu_resources(kind: str, count: int, why: str) -> Resources:
    return Resources(num_gpus=count, custom={GPU_RESOURCE_PREFIX + kind: count}, why=why)


def forge_verb(cmd: str) -> tuple[str | None, list[str]]:
    """`forge <verb> args...` -> (verb, args); (None, []) for any other command."""
    words = shlex.split(cmd)
    if len(words) >= 2 and Path(words[0]).name == "forge":
        return words[1], words[2:]
    return None, []


def stage_resources(node: StageNode, plan: dict[str, Any], catalog: dict[str, Any], root: Path) -> Resources:
    """The resources `node` needs, from its verb and the plan.yaml entry its foreach key names."""
    verb, args = forge_verb(node.cmd)
    key = node.key
    served = "--bundle" in args or "--serve" in args
    on_target = verb in TARGET_GPU_VERBS or (verb == "evaluate" and served)
    if verb not in TARGET_GPU_VERBS | NODE_GPU_VERBS or key is None:
        return Resources()
    target = plan.get("targets", {}).get(key)
    recipe_path = (target or {}).get("recipe") or plan.get("recipes", {}).get(key, {}).get("recipe") or next(
        (r["recipe"] for r in plan.get("recipes", {}).values() if r.get("model") == key), None)
    if recipe_path is None:
        return Resources()
    recipe = load_recipe(root / recipe_path)
    if recipe.model.spec.default_pipeline:
        return Resources(why=f"{recipe.model.name} runs on CPU (default_pipeline)")
    if on_target and target is not None:
        return gpu_resources(target["gpu"], int(target["tp"]), f"{verb} on the target GPU x TP {target['tp']}")
    calibration = plan_recipe_calibration(recipe, catalog)
    return gpu_resources(calibration.node["gpu"], calibration.gpus,
                         f"{verb} holds the BF16 model: calibration plan uses {calibration.gpus} GPU(s)")


def unschedulable(resources: Resources, nodes: list[dict[str, Any]]) -> str | None:
    """Why no alive node of the cluster can ever run a task asking for `resources` (None: one can).

    Ray leaves an infeasible task pending forever (it only warns), so the driver checks before
    submitting; `nodes` is `ray.nodes()`: each alive node's total `Resources`."""
    wanted = {"CPU": resources.num_cpus, **({"GPU": resources.num_gpus} if resources.num_gpus else {}),
              **resources.custom}
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    if any(all(offer.get(k, 0) >= v for k, v in wanted.items()) for offer in alive):
        return None
    kinds = sorted({k for offer in alive for k in offer if k.startswith(GPU_RESOURCE_PREFIX)})
    return (f"no node offers {resources.describe()} ({resources.why}); the cluster's GPU kinds: "
            f"{', '.join(kinds) or 'none'}. Add a node group with resources '{{\"{next(iter(resources.custom), 'CPU')}\": "
            f"N}}' or drop the target")
