"""`forge new`: add a Hugging Face model to recipes/ from its repo id, its config.json and a pinned
revision. Writes recipes/<name>/model.yaml, the config.json beside it, and one recipe per format
holding the targets asked for (each GPU gets the format of its newest tensor cores and
the smallest TP that fits, both computed by the planner). Every file is validated before the
directory appears (written in a temporary directory, renamed at the end); then the DVC plan is
regenerated."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.cliargs import add_verb, arg, run_with
from pipeline.core.errors import RecipeError
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.core.gpus import DEFAULT_CATALOG, GpuSpec, load_catalog
from pipeline.core.yamlio import read_json
from pipeline.planning.dvc_plan import DVC_FILE, PLAN_FILE, build_plan, generated_files
from pipeline.planning.validate import Definitions, validate_recipe
from pipeline.recipe.fields import COMMIT_PATTERN
from pipeline.recipe.loading import RECIPES_DIR, load_recipe
from pipeline.recipe.schema import TARGET_DEFAULTS
from pipeline.sizing.memory import ServingShape, fitting_alternatives

EXAMPLE = ("example: forge new meta-llama/Llama-3.1-8B-Instruct --revision 0e9e39f249a16976918f6564b8830bc894c89659 "
           "--config ~/Downloads/config.json --gpu h200 --gpu b200")


def model_name(repo_id: str) -> str:
    """meta-llama/Llama-3.1-8B-Instruct -> llama-3-1-8b-instruct (artifact names: [a-z0-9-])."""
    return re.sub(r"[^a-z0-9]+", "-", repo_id.split("/")[-1].lower()).strip("-")


def format_for(gpu: GpuSpec) -> str:
    """The format of the newest tensor cores this GPU has (FP4 on Blackwell, FP8 on Hopper/Ada);
    registry order breaks ties, so nvfp4 before mxfp4: its E4M3 scale per 16 values keeps more
    accuracy than MXFP4's power-of-two scale per 32 (OCP MX spec v1.0; NVIDIA's NVFP4 blog,
    developer.nvidia.com/blog/introducing-nvfp4-for-efficient-and-accurate-low-precision-inference)."""
    usable = [f for f in FORMATS.values() if f.quantized and f.min_compute_capability <= gpu.cc]
    if not usable:
        raise RecipeError("--gpu", f"no quantized format runs on compute capability {gpu.cc}.", "pick another GPU.")
    newest = max(f.min_compute_capability for f in usable)
    return next(f.name for f in usable if f.min_compute_capability == newest)


def recipe_files(name: str, repo_id: str, revision: str, config: dict[str, Any], gpus: list[str],
                 catalog: dict[str, GpuSpec], trust_remote_code: bool = False) -> dict[str, str]:
    """File name -> text for the new model directory. Pure: nothing is written here."""
    model_yaml = {
        "description": repo_id.split("/")[-1],
        "source": {"kind": "hf", "repo_id": repo_id, "revision": revision,
                   **({"trust_remote_code": True} if trust_remote_code else {})},
        "eval": {"suite": "standard"},
    }
    files = {"model.yaml": f"# Added by `forge new {repo_id}`; runs on GPU nodes with Hub access.\n"
                           + yaml.safe_dump(model_yaml, sort_keys=False),
             "config.json": json.dumps(config, indent=2) + "\n"}
    d = TARGET_DEFAULTS
    serving = ServingShape(d.max_input_len, d.max_output_len, d.max_input_len + d.max_output_len)
    by_format: dict[str, dict[str, Any]] = {}
    for gpu in gpus:
        fmt = format_for(catalog[gpu])
        fits = [a for a in fitting_alternatives(config, [FORMATS[fmt]], KV_CACHE_DTYPES[d.kv_cache_dtype],
                                                {gpu: catalog[gpu]}, serving)]
        if not fits:
            raise RecipeError(f"--gpu {gpu}", f"{name} {fmt} does not fit {gpu} at any TP up to 8.",
                              "pick a GPU with more memory.")
        by_format.setdefault(fmt, {})[gpu] = {"max_input_len": d.max_input_len, "max_output_len": d.max_output_len,
                                              "tp": fits[0].tp}
    for fmt, targets in by_format.items():
        recipe = {
            "quant": {"format": fmt, "kv_cache_dtype": d.kv_cache_dtype},
            "targets": targets,
            "calibration": {"set": "cnn_dailymail", "num_samples": 512, "seq_len": 512, "seed": 0},
            "eval": {"suite": "standard", "gates": {"default_min_recovery": 0.99}},
        }
        files[f"{fmt}.yaml"] = (f"# Run on a GPU node: forge plan recipes/{name}/{fmt}.yaml; "
                                f"forge plan --dvc --all --model {name}; dvc repro\n"
                                + yaml.safe_dump(recipe, sort_keys=False))
    return files


def new_model(repo_id: str, revision: str, config_path: Path, gpus: list[str], catalog: dict[str, GpuSpec],
              root: Path = RECIPES_DIR, name: str | None = None, trust_remote_code: bool = False) -> Path:
    """Validate, then write recipes/<name>/ atomically. Returns the directory."""
    if not re.match(r"^[\w.-]+/[\w.-]+$", repo_id):
        raise RecipeError("forge new", f"{repo_id[:80]!r} is not a Hugging Face repo id.", "use org/name.")
    if not re.match(COMMIT_PATTERN, revision):
        raise RecipeError("--revision", f"{revision[:60]!r} is not a 40-hex commit (branch names drift).",
                          f"copy the commit from https://huggingface.co/{repo_id}/commits/main.")
    unknown = [g for g in gpus if g not in catalog]
    if unknown or not gpus:
        raise RecipeError("--gpu", f"unknown GPU {', '.join(unknown)}." if unknown else "no target GPU given.",
                          f"pass --gpu one or more of {', '.join(catalog)}.")
    config = read_json(config_path, "model's config.json")
    if config.get("auto_map") and not trust_remote_code:
        raise RecipeError(str(config_path), f"config.json has auto_map {sorted(config['auto_map'])}: the model needs "
                          "its own Python code.", "review that code, then pass --trust-remote-code.")
    name = name or model_name(repo_id)
    dest = Path(root) / name
    if dest.exists():
        raise RecipeError(str(dest), "already exists.", "pass --name for another directory, or edit its recipes.")
    files = recipe_files(name, repo_id, revision, config, gpus, catalog, trust_remote_code)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.new-", dir=root))
    try:
        model_dir = staging / name
        model_dir.mkdir()
        for file_name, text in files.items():
            (model_dir / file_name).write_text(text)
        for file_name in files:
            if file_name.endswith(".yaml") and file_name != "model.yaml":
                validate_recipe(load_recipe(model_dir / file_name), catalog, Definitions.of_checkout(Path(root).parent))
        model_dir.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def require_checkout(root: Path = RECIPES_DIR) -> None:
    """`forge new` writes into a forge checkout and regenerates its DVC plan: refuse, naming what is
    missing, anywhere else (an installed forge run from another directory)."""
    checkout = Path(root).parent
    definitions = Definitions.of_checkout(checkout)
    needed = [(Path(root), Path.is_dir), (definitions.calibration_dir, Path.is_dir),
              (definitions.suites_dir, Path.is_dir), (checkout / DVC_FILE, Path.is_file)]
    missing = [str(path) + ("/" if check is Path.is_dir else "") for path, check in needed if not check(path)]
    if missing:
        here = checkout.resolve()
        raise RecipeError("forge new", f"{here} is not a forge checkout: it has no {', '.join(missing)} (the recipes "
                          "`forge new` adds to, the calibration sets and eval suites it validates them against, the "
                          "DVC pipeline it regenerates).",
                          "cd into a clone of the forge repository (the directory holding recipes/ and dvc.yaml) "
                          "and run `forge new` again.")


def cmd_new(args: NewArgs) -> int:
    require_checkout()
    catalog = load_catalog(args.catalog)
    dest = new_model(args.repo_id, args.revision, Path(args.config), list(args.gpu or ()), catalog,
                     name=args.name, trust_remote_code=args.trust_remote_code)
    for path in sorted(dest.iterdir()):
        print(f"wrote {path}")
    plan = build_plan(catalog)
    for path, text in generated_files(plan).items():
        path.write_text(text)
    print(f"regenerated {PLAN_FILE} and {DVC_FILE}'s generated tail (Hub models join the plan with "
          f"`forge plan --dvc --all --model {dest.name}` on a GPU node).")
    print(f"next: forge plan {dest}/<format>.yaml; edit calibration and eval to taste; forge validate {dest}")
    return 0


@dataclass(frozen=True, kw_only=True)
class NewArgs:
    """`forge new`'s arguments, declared once (pipeline/core/cliargs.py)."""

    repo_id: str = arg(positional="repo_id", help="Hugging Face repo id, org/name")
    revision: str = arg(required=True, help="the 40-hex commit to pin (branches drift and are refused)")
    config: Path = arg(required=True, metavar="CONFIG_JSON", help="the repo's config.json at that revision")
    gpu: tuple[str, ...] | None = arg(metavar="GPU", help="a target GPU from the catalog (repeatable)")
    name: str | None = arg(help="directory name under recipes/ (default: from the repo id)")
    trust_remote_code: bool = arg(False, help="the model needs its own Python code (auto_map)")
    catalog: Path = arg(DEFAULT_CATALOG, help="GPU catalog (default: %(default)s)")


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "new", run_with(NewArgs, cmd_new),
             help="add a Hugging Face model: model.yaml, config.json and a recipe per format",
             description=__doc__,
             epilog=EXAMPLE)
