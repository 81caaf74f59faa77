"""Eval suites (eval/suites/*.yaml): the schema, loading one, and what one run of it measured.

A suite names lm-eval tasks, their few-shot counts, and the metrics the accuracy gates compare,
each with its direction (higher or lower is better). Metric names are lm-eval's result keys,
"<metric>,<filter>" (e.g. "acc,none", "exact_match,strict-match"), exactly as lm-eval 0.4.13
writes them in `results[task]`; the key a suite result uses is "<task>/<metric>,<filter>".

Running a suite is pipeline/accuracy/lm_eval_runner.py; the local task files it hands lm-eval are
pipeline/accuracy/lm_eval_tasks.py. This module imports neither lm-eval nor torch: schema loading
(`forge validate`) must stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.accuracy.benchmarks import BENCHMARKS_DIR, BENCHMARKS_SPEC
from pipeline.accuracy.gates import Direction
from pipeline.core.errors import RecipeError
from pipeline.core.yamlio import YamlSyntaxError, load_yaml_file

EVAL_DIR = Path("eval")  # suites/ and tasks/ below it

# lm-eval 0.4.13 reports metrics as "<metric>,<filter>"; tasks without a filter_list use "none".
_METRIC_KEY_PATTERN = r"^[A-Za-z0-9_]+,[A-Za-z0-9_.\-]+$"


class TaskSpec(BaseModel):
    """One lm-eval task (or group, e.g. mmlu) and how many few-shot examples it gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1, description="lm-eval task or group name (local: the `task:` key of a YAML in eval/tasks)."
    )
    num_fewshot: int = Field(ge=0, description="Few-shot examples per prompt.")


class MetricSpec(BaseModel):
    """A metric the accuracy gates compare, with its direction declared, never guessed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(min_length=1, description="A task name from `tasks`.")
    metric: str = Field(
        pattern=_METRIC_KEY_PATTERN,
        description='lm-eval result key "<metric>,<filter>", e.g. "acc,none" or "exact_match,strict-match".',
    )
    direction: Direction = Field(description="higher: bigger is better (acc); lower: smaller is better (perplexity).")
    gate: bool = Field(True, description="false: reported with its recovery, interval and verdict, but it does not "
                                         "decide the gate (e.g. one task of a pooled group that gates)")

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric}"


class EvalSuite(BaseModel):
    """A named set of lm-eval tasks and the metrics gated on them (eval/suites/<name>.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The file's stem; set by `load_suite`, not written in the YAML.")
    description: str = Field(min_length=1, description="One line saying what the suite measures.")
    source: Literal["local", "builtin", "installed"] = Field(
        description="local: tasks from eval/tasks only (offline, fast index); builtin: lm-eval's own tasks too, "
                    "their data from the Hub or its cache; installed: lm-eval's own tasks with their documents from "
                    "the installed benchmark data (eval/benchmarks.yaml, offline), and eval/tasks.",
    )
    tasks: tuple[TaskSpec, ...] = Field(min_length=1)
    limit: int | None = Field(
        default=None, ge=1, description="At most this many documents per task (smoke runs, tests)."
    )
    batch_size: int = Field(default=8, ge=1, description="Default batch size; a run may override it.")
    metrics: tuple[MetricSpec, ...] = Field(min_length=1)
    data_dir: Path | None = Field(
        default=None, exclude=True,
        description="Where an `installed` suite's benchmark data is (a run's --benchmarks); not written in the YAML.")

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: tuple[TaskSpec, ...]) -> tuple[TaskSpec, ...]:
        names = [t.name for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task(s) listed twice: {', '.join(duplicates)}")
        return tasks

    @model_validator(mode="after")
    def _metrics_name_suite_tasks(self) -> EvalSuite:
        names = {t.name for t in self.tasks}
        if not any(m.gate for m in self.metrics):
            raise ValueError("metrics: none has gate: true; at least one metric must decide the gate")
        for i, m in enumerate(self.metrics):
            # an installed suite may name the member tasks of its pooled groups (checked by load_suite)
            if m.task not in names and self.source != "installed":
                raise ValueError(f"metrics.{i}.task: {m.task!r} is not in tasks ({', '.join(sorted(names))})")
        keys = [m.key for m in self.metrics]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"metric(s) listed twice: {', '.join(duplicates)}")
        return self

    def directions(self) -> dict[str, Direction]:
        """Metric key ("task/metric,filter") -> direction, in suite order (for pipeline.accuracy.gates)."""
        return {m.key: m.direction for m in self.metrics}

    def reported(self) -> frozenset[str]:
        """The metric keys shown with a verdict that does not decide the gate (`gate: false`)."""
        return frozenset(m.key for m in self.metrics if not m.gate)


@dataclass(frozen=True)
class SuiteResult:
    """What one suite run measured. Metric keys are "task/metric,filter"."""

    suite: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    samples: dict[str, int]
    num_fewshot: dict[str, int]
    limit: int | None
    seconds: float
    lm_eval_version: str
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Per-document results (pipeline/accuracy/samples.py document_table), written beside the metrics as
    # samples.json; the gates' paired bootstrap reads them. Not part of to_dict (metrics.json).
    documents: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "model": self.model,
            "metrics": dict(self.metrics),
            "stderr": dict(self.stderr),
            "samples": dict(self.samples),
            "num_fewshot": dict(self.num_fewshot),
            "limit": self.limit,
            # not `seconds`: metrics.json is a stage output, and the run's duration is its `evaluate_s`
            # timing (pipeline/handoff/kpis.py write_timings), so the same inputs give the same bytes
            "lm_eval_version": self.lm_eval_version,
            **({"extra": dict(self.extra)} if self.extra else {}),
        }


# ---------------------------------------------------------------------------------- loading


def list_suites(suites_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(suites_dir).glob("*.yaml"))


def load_suite(name: str, suites_dir: Path) -> EvalSuite:
    """Load and validate eval/suites/<name>.yaml; every problem names the file and the field."""
    path = Path(suites_dir) / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(list_suites(suites_dir)) or "none"
        raise RecipeError(
            str(path),
            f"no eval suite named {name!r}.",
            f"use one of the suites in {suites_dir}: {available}.",
        )
    try:
        raw = load_yaml_file(path)
    except YamlSyntaxError as exc:
        raise RecipeError(str(path), f"not valid YAML: {exc}", "fix the YAML syntax.") from exc
    if not isinstance(raw, dict):
        raise RecipeError(str(path), "an eval suite must be a YAML mapping.", "see eval/suites/smoke.yaml.")
    if "name" in raw:
        raise RecipeError(
            f"{path}: name", "the suite's name is its file name; do not set it in the file.", "remove `name:`."
        )
    try:
        suite = EvalSuite.model_validate({**raw, "name": name})
    except ValidationError as exc:
        raise RecipeError(
            str(path), _describe_validation_error(exc), "see the field list in pipeline/accuracy/suites.py (EvalSuite)."
        ) from exc
    if suite.source == "installed":
        _check_installed_metrics(suite, path)
    return suite


def _check_installed_metrics(suite: EvalSuite, path: Path) -> None:
    """An installed suite's metrics name its tasks or the members of its pooled groups (eval/benchmarks.yaml)."""
    from pipeline.accuracy.benchmarks import load_benchmark_spec

    spec = load_benchmark_spec(path.parent.parent / BENCHMARKS_SPEC.name)  # eval/suites/x.yaml -> eval/benchmarks.yaml
    names = {member for t in suite.tasks for member in (t.name, *spec.groups.get(t.name, ()))}
    for i, m in enumerate(suite.metrics):
        if m.task not in names:
            raise RecipeError(f"{path}: metrics.{i}.task", f"{m.task!r} is not in tasks or their groups' members "
                              f"({', '.join(sorted(names))}).", "name one of those.")


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not allowed)"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) + "."


def load_eval_suite(name: str, eval_dir: Path, limit: int | None, benchmarks_dir: Path | None = None) -> EvalSuite:
    """eval/suites/<name>.yaml under `eval_dir`, with a run's `--limit` (documents per task) and, for an
    `installed` suite, where the benchmark data is (`benchmarks_dir`) applied."""
    suite = load_suite(name, eval_dir / "suites")
    if suite.source == "installed":
        suite = suite.model_copy(update={"data_dir": Path(benchmarks_dir or BENCHMARKS_DIR)})
    if limit is None:
        return suite
    if limit < 1:
        raise RecipeError("--limit", f"must be >= 1, got {limit}.", "pass a positive number of documents per task.")
    return suite.model_copy(update={"limit": limit})


def suite_definition(suite: EvalSuite) -> dict[str, Any]:
    """What makes two runs comparable: tasks, few-shot counts, limit and the metrics (batch size
    changes no score, nor does which metrics decide the gate, so both are left out)."""
    return suite.model_dump(mode="json", exclude={"description": True, "batch_size": True, "data_dir": True,
                                                  "metrics": {"__all__": {"gate"}}})
