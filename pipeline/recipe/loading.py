"""Recipes on disk: find them, load them into `Recipe` / `Model`, and the digests stages record.

Layout (one directory per model; the directory name is the model's name):
    recipes/<model>/model.yaml      where the model comes from, its architecture, baseline eval suite
    recipes/<model>/config.json     the model's HF config.json at the pinned revision (for planning
                                    before anything is downloaded; the download stage checks it)
    recipes/<model>/<variant>.yaml  one quantization recipe: quant, calibration, targets, eval, publish

The schemas of both files are pipeline/recipe/schema.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.core.yamlio import load_model_file
from pipeline.recipe.schema import ModelRecipe, VariantRecipe
from pipeline.registry.artifacts import NAME_PATTERN, NAME_RULE

RECIPES_DIR = Path("recipes")
MODEL_FILE = "model.yaml"
CATALOG_FILE = "gpus.yaml"


@dataclass(frozen=True)
class Model:
    name: str
    directory: Path
    spec: ModelRecipe

    @property
    def architecture_path(self) -> Path:
        return self.directory / self.spec.architecture

    def architecture(self) -> dict[str, Any]:
        from pipeline.core.yamlio import read_json

        path = self.architecture_path
        if not path.is_file():
            raise RecipeError(
                f"{self.directory / MODEL_FILE}: architecture",
                f"{path} does not exist.",
                "save the model's config.json (at the pinned revision) beside model.yaml.",
            )
        check_inside(path, self.directory)
        return read_json(path, "model's config.json")


@dataclass(frozen=True)
class Recipe:
    path: Path
    model: Model
    variant: str
    spec: VariantRecipe

    @property
    def id(self) -> str:
        """Unique across the repo: <model>-<variant>, e.g. smollm2-135m-instruct-fp8."""
        return f"{self.model.name}-{self.variant}"

    @property
    def artifact_prefix(self) -> str:
        return self.spec.publish.name or self.id

    def artifact_name(self, gpu: str) -> str:
        return f"{self.artifact_prefix}-{gpu}"

    def digest(self) -> str:
        """sha256 over the resolved recipe (model + variant), independent of YAML formatting."""
        resolved = {"model": self.model.spec.model_dump(mode="json"), "variant": self.spec.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()

    def section_digest(self, section: str) -> str:
        """sha256 of one recipe section, so a stage can record exactly the part it read."""
        data: Any = {"model": self.model.spec.model_dump(mode="json"), **self.spec.model_dump(mode="json")}
        for part in section.split("."):  # e.g. "targets.h200"
            data = data[part]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def provenance(self, *sections: str) -> dict[str, Any]:
        """What a stage's manifest records about the recipe: its id, path and the sections it read."""
        return {"id": self.id, "path": str(self.path), "sections": {s: self.section_digest(s) for s in sections}}

    def resolved(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": str(self.path),
            "model": {"name": self.model.name, **self.model.spec.model_dump(mode="json")},
            **self.spec.model_dump(mode="json"),
            "digest": self.digest(),
        }


# Model and recipe names become artifact names (<model>-<variant>-<gpu>), so they follow the one
# name rule, pipeline/registry/artifacts.py NAME_PATTERN (GTO's lower-case names: iterative/gto gto/constants.py).
def _check_name(name: str, where: str, what: str) -> None:
    import re

    if not re.match(NAME_PATTERN, name):
        raise RecipeError(
            where,
            f"{what} name '{name}' is not allowed: artifact names use {NAME_RULE}.",
            f"rename it, e.g. '{re.sub(r'[^a-z0-9_-]+', '-', name.lower()).strip('-')[:128] or 'model'}'.",
        )


def check_inside(path: Path, directory: Path) -> None:
    """A recipe, model.yaml or config.json must live in its model directory. A symlink to a file
    elsewhere would let a recipe's content change outside the tree git and DVC track."""
    target = path.resolve()
    if not target.is_relative_to(Path(directory).resolve()):
        raise RecipeError(str(path), f"a symlink to {str(target)[:120]}, outside {directory}.",
                          f"copy the file into {directory} instead of linking it.")


def load_model(model_dir: Path) -> Model:
    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    _check_name(model_dir.name, str(model_dir), "model directory")
    if path.exists():
        check_inside(path, model_dir)
    return Model(name=model_dir.name, directory=model_dir, spec=load_model_file(path, ModelRecipe))


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    if path.name == MODEL_FILE:
        raise RecipeError(str(path), "this is a model file, not a recipe.", f"pass a recipe beside it, e.g. {path.parent}/fp8.yaml.")
    _check_name(path.stem, str(path), "recipe")
    if path.exists():
        check_inside(path, path.parent)
    spec = load_model_file(path, VariantRecipe)
    return Recipe(path=path, model=load_model(path.parent), variant=path.stem, spec=spec)


def discover_recipes(root: Path = RECIPES_DIR) -> list[Path]:
    """Every recipe under root: recipes/<model>/<variant>.yaml, model.yaml excluded, sorted."""
    return sorted(p for p in Path(root).glob("*/*.yaml") if p.name != MODEL_FILE)


def walk_recipes(path: Path) -> list[Path]:
    """The recipes a path names: a file is itself; a directory is walked (any depth) for *.yaml,
    skipping model.yaml, the GPU catalog and hidden directories."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = []
    for candidate in path.rglob("*.yaml"):
        parts = candidate.relative_to(path).parts
        if candidate.name in (MODEL_FILE, CATALOG_FILE) or any(p.startswith(".") for p in parts):
            continue
        found.append(candidate)
    return sorted(found)


def discover_models(root: Path = RECIPES_DIR) -> list[Path]:
    return sorted(p.parent for p in Path(root).glob(f"*/{MODEL_FILE}"))
