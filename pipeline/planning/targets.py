"""The planner's front door: what one target asks for (`TargetSpec`, from a recipe target or from
`forge plan` flags) and its `Plan`. The checks that run before a plan is trusted are in
pipeline/planning/validate.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.core.gpus import GpuSpec
from pipeline.core.yamlio import excerpt
from pipeline.recipe.loading import Recipe
from pipeline.recipe.schema import Target
from pipeline.sizing.memory import ServingShape
from pipeline.sizing.parallel import Parallelism
from pipeline.sizing.plan import Plan, plan
from pipeline.sizing.roofline import Ceilings


def serving_shape(target: Target) -> ServingShape:
    return ServingShape(
        max_input_len=target.max_input_len,
        max_output_len=target.max_output_len,
        seq_len=target.seq_len,
        max_num_tokens=target.max_num_tokens,
        kv_cache_free_gpu_memory_fraction=target.kv_cache_free_gpu_memory_fraction,
        concurrency=target.concurrency,
        price_per_gpu_hour_usd=target.price_per_gpu_hour_usd,
    )


@dataclass(frozen=True)
class TargetSpec:
    """One thing to plan: a model config at a format, KV-cache dtype, GPU, TP and serving shape.
    Built from a recipe target or from `forge plan` flags, so both run the same checks and get the
    same messages; `fields` says how to name each setting where it came from."""

    model: str
    config: dict[str, Any]
    format: str
    kv_cache_dtype: str
    gpu: str
    tp: int
    serving: ServingShape
    where: str  # e.g. "recipes/x/fp8.yaml: targets.h200", or "forge plan --gpu h200"
    fields: dict[str, str] = field(default_factory=dict)  # setting -> "file: field" or "--flag"
    flags: bool = False  # name settings as command-line flags rather than YAML keys
    ep: int = 1
    attention_dp: bool = False

    @property
    def parallelism(self) -> Parallelism:
        return Parallelism(self.tp, self.ep, self.attention_dp)

    def at(self, setting: str) -> str:
        return self.fields.get(setting, self.where)

    def spell(self, setting: str, value: Any) -> str:
        """How the user writes `setting = value` where it came from: YAML key or CLI flag."""
        yaml_key, flag = SETTING_NAMES[setting]
        return f"{flag} {value}" if self.flags else f"{yaml_key}: {value}"


SETTING_NAMES = {"format": ("format", "--format"), "kv": ("kv_cache_dtype", "--kv-dtype"),
                 "tp": ("tp", "--tp"), "ep": ("ep", "--ep"), "attention_dp": ("attention_dp", "--attention-dp"),
                 "seq": ("max_seq_len", "--seq-len")}


def target_spec(recipe: Recipe, gpu_key: str) -> TargetSpec:
    target = recipe.spec.targets[gpu_key]
    at = f"{recipe.path}: targets.{excerpt(gpu_key)[1:-1]}"
    return TargetSpec(
        model=recipe.model.name, config=recipe.model.architecture(), format=recipe.spec.quant.format,
        kv_cache_dtype=recipe.spec.quant.kv_cache_dtype, gpu=gpu_key, tp=target.tp, ep=target.ep,
        attention_dp=target.attention_dp, serving=serving_shape(target), where=at,
        fields={"format": f"{recipe.path}: quant.format", "kv": f"{recipe.path}: quant.kv_cache_dtype", "tp": f"{at}.tp",
                "ep": f"{at}.ep", "attention_dp": f"{at}.attention_dp",
                "seq": f"{at}.max_seq_len" if target.max_seq_len else f"{at}.max_input_len + max_output_len"},
    )


def plan_spec(spec: TargetSpec, catalog: dict[str, GpuSpec], ceilings: Ceilings | None = None) -> Plan:
    return plan(spec.config, FORMATS[spec.format], KV_CACHE_DTYPES[spec.kv_cache_dtype], catalog[spec.gpu],
                spec.gpu, spec.serving, par=spec.parallelism, ceilings=ceilings)


def plan_target(recipe: Recipe, gpu_key: str, catalog: dict[str, GpuSpec], ceilings: Ceilings | None = None) -> Plan:
    return plan_spec(target_spec(recipe, gpu_key), catalog, ceilings)
