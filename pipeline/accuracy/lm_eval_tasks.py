"""A suite's tasks as lm-eval takes them: local task files under eval/tasks (their data files made
absolute), or lm-eval's built-in task names. Checked before any model is loaded."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pipeline.accuracy.benchmarks import (
    BENCHMARKS_SPEC,
    installed_tasks,
    load_benchmark_spec,
    wrapper_name,
    write_wrappers,
)
from pipeline.accuracy.suites import EvalSuite
from pipeline.core.errors import StageInputError
from pipeline.core.yamlio import YamlSyntaxError, load_yaml_file


def local_task_files(tasks_dir: Path) -> dict[str, Path]:
    """Task name -> YAML file for every task defined under `tasks_dir`."""
    found: dict[str, Path] = {}
    for path in sorted(Path(tasks_dir).rglob("*.yaml")):
        try:
            cfg = load_yaml_file(path)
        except YamlSyntaxError as exc:
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
    cfg = load_yaml_file(yaml_path)
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


def task_specs(suite: EvalSuite, tasks_dir: Path, wrapper_dir: Path | None = None) -> dict[str, str | dict[str, Any]]:
    """What to hand lm-eval for each suite task: a resolved config dict (local), the name (built-in),
    or the name of its wrapper group written into `wrapper_dir` (installed: pipeline/accuracy/benchmarks.py).

    Checks every task exists, and an installed suite's data is in place, before any model is loaded.
    """
    if suite.source == "builtin":
        return {t.name: t.name for t in suite.tasks}
    files = local_task_files(tasks_dir)
    if suite.source == "installed":
        return _installed_specs(suite, files, tasks_dir, wrapper_dir)
    missing = [t.name for t in suite.tasks if t.name not in files]
    if missing:
        raise StageInputError(
            f"eval suite {suite.name!r}: tasks",
            f"local task(s) {', '.join(missing)} not found under {tasks_dir} (found: {', '.join(sorted(files)) or 'none'}).",
            "add the task YAML to eval/tasks, or set `source: builtin` for lm-eval's own tasks.",
        )
    return {t.name: local_task_config(files[t.name]) for t in suite.tasks}


def _installed_specs(suite: EvalSuite, files: dict[str, Path], tasks_dir: Path,
                     wrapper_dir: Path | None) -> dict[str, str | dict[str, Any]]:
    if suite.data_dir is None or wrapper_dir is None:
        raise StageInputError(f"eval suite {suite.name!r}", "an installed suite was run without its benchmark data "
                              "folder.", "load it with load_eval_suite(..., benchmarks_dir).")
    spec = load_benchmark_spec(Path(tasks_dir).parent / BENCHMARKS_SPEC.name)  # eval/tasks -> eval/benchmarks.yaml
    installed = [t.name for t in suite.tasks if t.name not in files]
    wrappers = installed_tasks(spec, installed, suite.data_dir, f"eval suite {suite.name!r}")
    write_wrappers(wrappers, wrapper_dir)
    return {t.name: (wrapper_name(spec, t.name) if t.name in wrappers else local_task_config(files[t.name]))
            for t in suite.tasks}
