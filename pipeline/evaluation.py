"""Eval suites (eval/suites/*.yaml) and the lm-eval runner that scores a model on one.

A suite names lm-eval tasks, their few-shot counts, and the metrics the accuracy gates compare,
each with its direction (higher or lower is better). Metric names are lm-eval's result keys,
"<metric>,<filter>" (e.g. "acc,none", "exact_match,strict-match"), exactly as lm-eval 0.4.13
writes them in `results[task]`; the key a suite result uses is "<task>/<metric>,<filter>".

Two ways to run a suite:
- `run_suite`: an in-memory `torch.nn.Module` (e.g. ModelOpt's fake-quantized model, which plain
  transformers cannot reload from the export) through `lm_eval.models.huggingface.HFLM`.
- `run_suite_remote`: an OpenAI-compatible server (vLLM, `trtllm-serve`), through lm-eval's
  `local-completions` model, after checking the server serves the checkpoint being scored.

lm-eval is imported inside the functions that need it: importing it takes seconds, and schema
loading (`forge validate`) must stay fast.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import RecipeError, StageInputError

log = logging.getLogger(__name__)

Direction = Literal["higher", "lower"]

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

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric}"


class EvalSuite(BaseModel):
    """A named set of lm-eval tasks and the metrics gated on them (eval/suites/<name>.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The file's stem; set by `load_suite`, not written in the YAML.")
    description: str = Field(min_length=1, description="One line saying what the suite measures.")
    source: Literal["local", "builtin"] = Field(
        description="local: tasks from eval/tasks only (offline, fast index); builtin: lm-eval's own tasks too.",
    )
    tasks: tuple[TaskSpec, ...] = Field(min_length=1)
    limit: int | None = Field(
        default=None, ge=1, description="At most this many documents per task (smoke runs, tests)."
    )
    batch_size: int = Field(default=8, ge=1, description="Default batch size; a run may override it.")
    metrics: tuple[MetricSpec, ...] = Field(min_length=1)

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
        for i, m in enumerate(self.metrics):
            if m.task not in names:
                raise ValueError(f"metrics.{i}.task: {m.task!r} is not in tasks ({', '.join(sorted(names))})")
        keys = [m.key for m in self.metrics]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"metric(s) listed twice: {', '.join(duplicates)}")
        return self

    def directions(self) -> dict[str, Direction]:
        """Gated metric key ("task/metric,filter") -> direction, in suite order (for pipeline.gates)."""
        return {m.key: m.direction for m in self.metrics}


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
    # Per-document results (pipeline/samples.py document_table), written beside the metrics as
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
            "seconds": self.seconds,
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
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), f"not valid YAML: {exc}", "fix the YAML syntax.") from exc
    if not isinstance(raw, dict):
        raise RecipeError(str(path), "an eval suite must be a YAML mapping.", "see eval/suites/smoke.yaml.")
    if "name" in raw:
        raise RecipeError(
            f"{path}: name", "the suite's name is its file name; do not set it in the file.", "remove `name:`."
        )
    try:
        return EvalSuite.model_validate({**raw, "name": name})
    except ValidationError as exc:
        raise RecipeError(
            str(path), _describe_validation_error(exc), "see the field list in pipeline/evaluation.py (EvalSuite)."
        ) from exc


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not allowed)"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) + "."


# ---------------------------------------------------------------------------------- local tasks


def local_task_files(tasks_dir: Path) -> dict[str, Path]:
    """Task name -> YAML file for every task defined under `tasks_dir`."""
    found: dict[str, Path] = {}
    for path in sorted(Path(tasks_dir).rglob("*.yaml")):
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            # forge's local tasks are plain YAML; lm-eval's `!function` tags would need its private loader.
            raise StageInputError(
                str(path), f"not plain YAML: {exc}", "local tasks may not use !function or other tags."
            ) from exc
        if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
            if cfg["task"] in found:
                raise StageInputError(
                    str(path), f"task {cfg['task']!r} is also defined in {found[cfg['task']]}.", "rename one."
                )
            found[cfg["task"]] = path
    return found


def local_task_config(yaml_path: Path) -> dict[str, Any]:
    """The task's config with relative `dataset_kwargs.data_files` made absolute.

    lm-eval 0.4.13 hands data_files to `datasets.load_dataset`, which resolves relative paths
    against the current directory. forge's convention is relative to the task YAML's folder, and
    the resolved config is passed to lm-eval as a dict, so evaluation works from any directory.
    """
    cfg = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8"))
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if data_files is None:
        return cfg
    cfg = copy.deepcopy(cfg)

    def resolve(entry: str) -> str:
        path = Path(entry)
        path = path if path.is_absolute() else (Path(yaml_path).parent / path).resolve()
        if not path.is_file():
            raise StageInputError(
                f"{yaml_path}: dataset_kwargs.data_files",
                f"{entry!r} resolves to {path}, which does not exist.",
                "give a path relative to the task YAML's folder (run `python eval/make_data.py` to rebuild forge's data).",
            )
        return str(path)

    if isinstance(data_files, str):
        resolved: Any = resolve(data_files)
    elif isinstance(data_files, list):
        resolved = [resolve(p) for p in data_files]
    else:
        resolved = {
            split: [resolve(p) for p in v] if isinstance(v, list) else resolve(v) for split, v in data_files.items()
        }
    cfg["dataset_kwargs"]["data_files"] = resolved
    return cfg


def task_specs(suite: EvalSuite, tasks_dir: Path) -> dict[str, str | dict[str, Any]]:
    """What to hand lm-eval for each suite task: a resolved config dict (local) or the name (built-in).

    Checks every local task exists before any model is loaded.
    """
    if suite.source == "builtin":
        return {t.name: t.name for t in suite.tasks}
    files = local_task_files(tasks_dir)
    missing = [t.name for t in suite.tasks if t.name not in files]
    if missing:
        raise StageInputError(
            f"eval suite {suite.name!r}: tasks",
            f"local task(s) {', '.join(missing)} not found under {tasks_dir} (found: {', '.join(sorted(files)) or 'none'}).",
            "add the task YAML to eval/tasks, or set `source: builtin` for lm-eval's own tasks.",
        )
    return {t.name: local_task_config(files[t.name]) for t in suite.tasks}


# ---------------------------------------------------------------------------------- running


def run_suite(
    model: Any,
    tokenizer: Any,
    suite: EvalSuite,
    tasks_dir: Path,
    device: str,
    batch_size: int | None = None,
    progress: Any | None = None,
) -> SuiteResult:
    """Score an in-memory causal LM on `suite`. Moves `model` to `device` and sets eval mode.

    With `progress` (a pipeline.heartbeat.Progress), lm-eval's progress bars are turned off and
    its requests and forward batches are counted there instead, for the stage's heartbeat."""
    from lm_eval.models.huggingface import HFLM

    specs = task_specs(suite, tasks_dir)
    start = time.perf_counter()
    model.to(device)
    model.eval()
    size = batch_size or suite.batch_size
    lm_class = HFLM if progress is None else _counted_hflm(HFLM, progress, size)
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=size, device=device)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    hook = None if progress is None else model.register_forward_hook(lambda *_: progress.advance())
    try:
        return _evaluate(lm, suite, specs, tasks_dir, start, model_name=name)
    finally:
        if hook is not None:
            hook.remove()


def _counted_hflm(base: type, progress: Any, batch_size: int) -> type:
    """HFLM with every progress bar off and each request type a heartbeat phase. The bars cannot be
    turned off from outside: lm-eval's evaluator calls `lm.loglikelihood(requests)` with the default
    disable_tqdm=False, and loglikelihood_rolling passes disable_tqdm=False to _loglikelihood_tokens
    once per batch of windows (lm_eval/models/huggingface.py, 0.4.13), which under DVC printed one
    `\\r`-joined bar per batch. Forward batches are counted by the caller's forward hook."""

    class CountedHFLM(base):  # type: ignore[misc, valid-type]
        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            progress.phase(f"lm-eval loglikelihood, {len(requests)} requests", -(-len(requests) // batch_size),
                           "forward batches (about)")
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            progress.phase(f"lm-eval loglikelihood_rolling, {len(requests)} documents", None, "forward batches")
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list:
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            progress.phase(f"lm-eval generate_until, {len(requests)} requests", None, "forward passes")
            return super().generate_until(requests, disable_tqdm=True)

    return CountedHFLM


def remote_model_args(
    base_url: str,
    model_name: str,
    tokenizer_dir: Path,
    *,
    num_concurrent: int = 8,
    max_retries: int = 3,
    timeout_s: int = 300,
    max_length: int | None = None,
) -> dict[str, Any]:
    """lm-eval `local-completions` arguments for an OpenAI-compatible server (e.g. trtllm-serve).

    `base_url` may be the server root ("http://host:8000"), its "/v1", or the full
    "/v1/completions" endpoint; lm-eval's LocalCompletionsAPI posts to base_url as given, so it must
    be the full endpoint. The tokenizer is read from a local directory (the bundle's checkpoint)
    with the huggingface backend, so no Hub request is made and lm-eval does not probe the
    server for a remote tokenizer ("auto" does). Loglikelihood tasks need the server to return
    prompt logprobs for `echo: true` requests; generate_until tasks (gsm8k) do not.
    """
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise StageInputError(
            "eval.remote.base_url", f"{base_url!r} is not an http(s) URL.", "pass e.g. http://127.0.0.1:8000."
        )
    if not url.endswith("/v1/completions"):
        url = url + ("/completions" if url.endswith("/v1") else "/v1/completions")
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer_config.json").is_file() and not (tokenizer_dir / "tokenizer.json").is_file():
        raise StageInputError(
            str(tokenizer_dir),
            "no tokenizer files (tokenizer.json / tokenizer_config.json) here.",
            "pass the served checkpoint's directory, which holds its tokenizer.",
        )
    args: dict[str, Any] = {
        "model": model_name,
        "base_url": url,
        "tokenizer": str(tokenizer_dir.resolve()),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "num_concurrent": num_concurrent,
        "max_retries": max_retries,
        "timeout": timeout_s,
    }
    if max_length is not None:
        args["max_length"] = max_length
    return args


def run_suite_remote(
    base_url: str,
    model_name: str,
    tokenizer_dir: Path,
    suite: EvalSuite,
    tasks_dir: Path,
    batch_size: int | None = None,
    num_concurrent: int = 8,
    *,
    device: str | None = None,
    launched_checkpoint: Path | None = None,
) -> SuiteResult:
    """Score a model served behind an OpenAI-compatible completions endpoint on `suite`.

    `tokenizer_dir` is the checkpoint being scored: before any request is scored, the server must
    list `model_name` and serve exactly that checkpoint's files (pipeline/serving/identity.py), or
    this raises ServeError. The result's `extra["served"]` records the engine, its version (from
    `/version`), the device and the checkpoint digest that answered.
    """
    from lm_eval.api.registry import get_model

    from pipeline.serving.identity import check_served_identity

    # lm-eval's API models need its [api] extra; say so before any task is loaded.
    missing = [pkg for pkg in ("aiohttp", "tenacity", "requests") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise StageInputError(
            "eval (remote)",
            f"lm-eval's local-completions model needs {', '.join(missing)}, which is not installed.",
            "pip install 'lm-eval[api]'.",
        )
    specs = task_specs(suite, tasks_dir)
    start = time.perf_counter()
    args = remote_model_args(base_url, model_name, tokenizer_dir, num_concurrent=num_concurrent)
    identity = check_served_identity(base_url, model_name, Path(tokenizer_dir), device=device,
                                     launched_checkpoint=launched_checkpoint)
    lm = get_model("local-completions").create_from_arg_obj(args, {"batch_size": batch_size or 1})
    return _evaluate(lm, suite, specs, tasks_dir, start, model_name=model_name,
                     extra={"base_url": args["base_url"], "served": identity.to_dict()})


def _evaluate(
    lm: Any,
    suite: EvalSuite,
    specs: Mapping[str, str | dict[str, Any]],
    tasks_dir: Path,
    start: float,
    model_name: str,
    extra: dict[str, Any] | None = None,
) -> SuiteResult:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False skips indexing lm-eval's ~14,700 built-in tasks (~16 s per run).
    manager = TaskManager(include_defaults=suite.source == "builtin", include_path=str(tasks_dir))
    merged: dict[str, dict[str, Any]] = {
        k: {} for k in ("results", "n-samples", "n-shot", "higher_is_better", "group_subtasks", "samples", "configs")
    }
    # simple_evaluate takes one num_fewshot for all its tasks, so run one call per few-shot count.
    by_shots: dict[int, list[str]] = {}
    for t in suite.tasks:
        by_shots.setdefault(t.num_fewshot, []).append(t.name)
    for shots, names in sorted(by_shots.items()):
        log.info("lm-eval: %s with %d-shot%s", ", ".join(names), shots, f", limit {suite.limit}" if suite.limit else "")
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[specs[n] for n in names],
            num_fewshot=shots,
            limit=suite.limit,
            task_manager=manager,
            # Per-document results for the gates' paired bootstrap (pipeline/samples.py).
            log_samples=True,
        )
        if out is None:  # only non-zero ranks of a distributed run get None
            raise StageInputError(
                f"eval suite {suite.name!r}", "lm-eval returned no results on this rank.", "run on one process."
            )
        for key, bucket in merged.items():
            bucket.update(out.get(key) or {})
    metrics, stderr, samples, shots_used = _extract(suite, merged)
    from pipeline.samples import document_table

    documents = document_table(merged["samples"], merged["configs"], merged["group_subtasks"])
    return SuiteResult(
        suite=suite.name,
        metrics=metrics,
        stderr=stderr,
        samples=samples,
        num_fewshot=shots_used,
        limit=suite.limit,
        seconds=round(time.perf_counter() - start, 3),
        lm_eval_version=lm_eval.__version__,
        model=model_name,
        extra=extra or {},
        documents=documents,
    )


def _leaves(name: str, group_subtasks: Mapping[str, list[str]]) -> Iterable[str]:
    children = group_subtasks.get(name)
    if not children:
        yield name
        return
    for child in children:
        yield from _leaves(child, group_subtasks)


def _extract(
    suite: EvalSuite, raw: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, float], dict[str, float | None], dict[str, int], dict[str, int]]:
    """Pull the suite's gated metrics out of merged lm-eval results, checking what lm-eval reported."""
    results, hib = raw["results"], raw["higher_is_better"]
    where = f"eval suite {suite.name!r}"
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for i, spec in enumerate(suite.metrics):
        reported = results.get(spec.task, {})
        if spec.metric not in reported:
            names = sorted(k for k in reported if "," in k and "_stderr," not in k)
            raise StageInputError(
                f"{where}: metrics.{i}.metric",
                f"lm-eval {_lm_eval_version()} reported no {spec.metric!r} for task {spec.task!r} (it reported: {', '.join(names) or 'nothing'}).",
                "use one of the reported names in the suite.",
            )
        value = float(reported[spec.metric])
        metric_name, filter_name = spec.metric.split(",", 1)
        declared = hib.get(spec.task, {}).get(metric_name)
        if declared is not None and bool(declared) != (spec.direction == "higher"):
            raise StageInputError(
                f"{where}: metrics.{i}.direction",
                f"{spec.key} is declared {spec.direction!r} but lm-eval says higher_is_better={declared}.",
                "fix the direction in the suite.",
            )
        metrics[spec.key] = value
        err = reported.get(f"{metric_name}_stderr,{filter_name}")
        stderr[spec.key] = float(err) if isinstance(err, (int, float)) and math.isfinite(err) else None
    samples: dict[str, int] = {}
    shots: dict[str, int] = {}
    for t in suite.tasks:
        counts = [raw["n-samples"].get(leaf, {}).get("effective", 0) for leaf in _leaves(t.name, raw["group_subtasks"])]
        samples[t.name] = int(sum(counts))
        used = raw["n-shot"].get(t.name)
        if used is not None and int(used) != t.num_fewshot:
            # lm-eval keeps a task's own `num_fewshot: 0` over the requested count (evaluator.py, 0.4.13).
            raise StageInputError(
                f"{where}: tasks.{t.name}.num_fewshot",
                f"asked for {t.num_fewshot}-shot but lm-eval ran {used}-shot (the task config pins it).",
                f"set num_fewshot: {used} in the suite.",
            )
        shots[t.name] = t.num_fewshot
    return metrics, stderr, samples, shots


def _lm_eval_version() -> str:
    import lm_eval

    return lm_eval.__version__
