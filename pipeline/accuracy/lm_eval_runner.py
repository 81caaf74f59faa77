"""The lm-eval runner: scores a model on an eval suite and pulls the suite's gated metrics out of
lm-eval's results, checking what lm-eval reported against what the suite declares.

Two ways to run a suite:
- `run_suite`: an in-memory `torch.nn.Module` (e.g. ModelOpt's fake-quantized model, which plain
  transformers cannot reload from the export) through `lm_eval.models.huggingface.HFLM`.
- `run_suite_remote`: an OpenAI-compatible server (vLLM, `trtllm-serve`), through lm-eval's
  `local-completions` model, after checking the server serves the checkpoint being scored.

lm-eval is imported inside the functions that need it: importing it takes seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.accuracy.benchmarks import BENCHMARKS_SPEC, load_benchmark_spec, provenance, wrapper_name
from pipeline.accuracy.lm_eval_tasks import task_specs
from pipeline.accuracy.samples import document_table, leaves
from pipeline.accuracy.suites import EvalSuite, SuiteResult
from pipeline.core.errors import StageInputError

log = logging.getLogger(__name__)


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

    With `progress` (a pipeline.core.heartbeat.Progress), lm-eval's progress bars are turned off and
    its requests and forward batches are counted there instead, for the stage's heartbeat."""
    from lm_eval.models.huggingface import HFLM

    wrappers = Path(tempfile.mkdtemp(prefix="forge-lm-eval-"))
    specs = task_specs(suite, tasks_dir, wrappers)
    start = time.perf_counter()
    model.to(device)
    model.eval()
    size = batch_size or suite.batch_size
    lm_class = HFLM if progress is None else _counted_hflm(HFLM, progress, size)
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=size, device=device)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    hook = None if progress is None else model.register_forward_hook(lambda *_: progress.advance())
    try:
        return _evaluate(lm, suite, specs, [tasks_dir, wrappers], start, model_name=name)
    finally:
        if hook is not None:
            hook.remove()
        shutil.rmtree(wrappers, ignore_errors=True)


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
    this raises ServeError; a server that reports no root (trtllm-serve) is scored only under the
    bundle's SERVE.md name, recorded as unverified. The result's `extra["served"]` records the engine,
    its version (from `/version`), the device, the checkpoint digest and whether the weights were checked.
    """
    # lm-eval's API models need its [api] extra; say so before any task is loaded.
    missing = [pkg for pkg in ("aiohttp", "tenacity", "requests") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise StageInputError(
            "eval (remote)",
            f"lm-eval's local-completions model needs {', '.join(missing)}, which is not installed.",
            "pip install 'lm-eval[api]'.",
        )
    wrappers = Path(tempfile.mkdtemp(prefix="forge-lm-eval-"))
    try:
        return _evaluate_remote(base_url, model_name, tokenizer_dir, suite, task_specs(suite, tasks_dir, wrappers),
                                [tasks_dir, wrappers], batch_size, num_concurrent, device, launched_checkpoint)
    finally:
        shutil.rmtree(wrappers, ignore_errors=True)


def _evaluate_remote(base_url: str, model_name: str, tokenizer_dir: Path, suite: EvalSuite,
                     specs: Mapping[str, str | dict[str, Any]], task_paths: list[Path], batch_size: int | None,
                     num_concurrent: int, device: str | None, launched_checkpoint: Path | None) -> SuiteResult:
    from lm_eval.api.registry import get_model

    from pipeline.serving.identity import check_served_identity

    start = time.perf_counter()
    args = remote_model_args(base_url, model_name, tokenizer_dir, num_concurrent=num_concurrent)
    identity = check_served_identity(base_url, model_name, Path(tokenizer_dir), device=device,
                                     launched_checkpoint=launched_checkpoint)
    lm = get_model("local-completions").create_from_arg_obj(args, {"batch_size": batch_size or 1})
    return _evaluate(lm, suite, specs, task_paths, start, model_name=model_name,
                     extra={"base_url": args["base_url"], "served": identity.to_dict()})


def _evaluate(
    lm: Any,
    suite: EvalSuite,
    specs: Mapping[str, str | dict[str, Any]],
    task_paths: list[Path],
    start: float,
    model_name: str,
    extra: dict[str, Any] | None = None,
) -> SuiteResult:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False skips indexing lm-eval's ~14,700 built-in tasks (~16 s per run).
    manager = TaskManager(include_defaults=suite.source != "local", include_path=[str(p) for p in task_paths])
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
            # Per-document results for the gates' paired bootstrap (pipeline/accuracy/samples.py).
            log_samples=True,
        )
        if out is None:  # only non-zero ranks of a distributed run get None
            raise StageInputError(
                f"eval suite {suite.name!r}", "lm-eval returned no results on this rank.", "run on one process."
            )
        for key, bucket in merged.items():
            bucket.update(out.get(key) or {})
    metrics, stderr, samples, shots_used = _extract(suite, merged)
    documents = document_table(merged["samples"], merged["configs"], merged["group_subtasks"])
    if suite.source == "installed":
        # what each installed task scored (its split, its dataset's licence), from the configs lm-eval ran
        spec = load_benchmark_spec(Path(task_paths[0]).parent / BENCHMARKS_SPEC.name)  # eval/tasks -> eval/benchmarks.yaml
        used = {member: merged["configs"][next(iter(leaves(member, merged["group_subtasks"])))]
                for t in suite.tasks if specs[t.name] == wrapper_name(spec, t.name) for member in spec.members(t.name)}
        extra = {**(extra or {}), "benchmark_data": provenance(spec, used)}
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
        counts = [raw["n-samples"].get(leaf, {}).get("effective", 0) for leaf in leaves(t.name, raw["group_subtasks"])]
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
