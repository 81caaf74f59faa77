"""Load a YAML file into a closed pydantic model, turning every problem into one RecipeError that
names the file, the field, the problem and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import RecipeError

ModelT = TypeVar("ModelT", bound=BaseModel)


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), "file not found.", "check the path (recipes live in recipes/<model>/).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(where, f"not valid YAML ({getattr(exc, 'problem', exc)}).", "fix the syntax there.") from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), "expected a mapping at the top level.", "see recipes/README.md for the layout.")
    return data


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Walk the schema along `loc` (minus the offending key) to list the keys allowed there."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        else:  # dict[str, Model] or Optional[Model]: take the BaseModel argument
            args = [a for a in getattr(current, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            if not args:
                return None
            current = args[0]
            if isinstance(part, str) and part in current.model_fields:
                current = current.model_fields[part].annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    args = [a for a in getattr(current, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
    return list(args[0].model_fields) if args else None


def validation_to_error(path: Path, model: type[BaseModel], exc: ValidationError) -> RecipeError:
    """The first problem becomes the message; the rest are counted so nothing is hidden."""
    errors = exc.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    field = _field_path(loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        problem = f"unknown key '{loc[-1]}'."
        fix = f"remove it or correct the spelling; allowed keys here: {', '.join(allowed)}." if allowed else "remove it."
    elif kind == "missing":
        problem = "required field is missing."
        fix = f"add '{loc[-1]}' (see the schema in pipeline/recipe.py)."
    elif kind == "literal_error":
        problem = f"{first['msg'].lower()}, got {first.get('input')!r}."
        fix = "use one of the listed values."
    else:
        problem = f"{first['msg']} (got {first.get('input')!r})."
        fix = "correct the value."
    if len(errors) > 1:
        problem += f" ({len(errors) - 1} more problem(s) in this file.)"
    return RecipeError(f"{path}: {field}", problem, fix)


def load_model_file(path: Path, model: type[ModelT], extra: dict[str, Any] | None = None) -> ModelT:
    data = read_yaml(path)
    if extra:
        data = {**data, **extra}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_to_error(path, model, exc) from None
