"""Load a YAML file into a closed pydantic model, turning every problem into one RecipeError that
names the file, the field, the problem and the fix.

Recipes are hand-written and small, but they are still untrusted input: the reader bounds size,
nesting and alias expansion before anything walks the data, refuses duplicate keys (YAML keeps the
last one silently), and never puts more than a short excerpt of the input into a message.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.core.errors import ForgeError, RecipeError, RecipeProblems, StageInputError

ModelT = TypeVar("ModelT", bound=BaseModel)

# Shipped recipes are under 2 KB and the GPU catalog under 8 KB; 256 KiB is generous and still
# refuses a 10 MB file before it is parsed.
MAX_YAML_BYTES = 256 * 1024
# HF config.json files are 1-10 KB (Llama-3.3-70B: 1 KB); tokenizer_config.json can reach ~200 KB
# with a long added_tokens_decoder, so JSON gets 4 MiB.
MAX_JSON_BYTES = 4 * 1024 * 1024
# The deepest shipped recipe nests 4 levels (eval.gates.overrides.<metric>).
MAX_DEPTH = 32
# Nodes after alias expansion. A billion-laughs document (9 levels of 9 aliases) expands to ~4e8;
# the whole GPU catalog is ~300.
MAX_EXPANDED_NODES = 10_000
EXCERPT_CHARS = 60


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """repr() of a value, cut to `limit` characters: messages never echo unbounded input."""
    if isinstance(value, (dict, list, tuple)) and len(value) > 20:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Refused(Exception):
    def __init__(self, line: int | None, problem: str, fix: str):
        super().__init__(problem)
        self.line, self.problem, self.fix = line, problem, fix


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_DEPTH. PyYAML composes nodes
    recursively (yaml/composer.py compose_node), so 20,000 nested '[' would otherwise end in a
    RecursionError."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(mark.line + 1, f"nested deeper than {MAX_DEPTH} levels.",
                               "recipes are flat: a few levels of mappings.")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_graph(root: yaml.Node) -> None:
    """Walk the composed node graph once (memoized per node, so shared aliases cost nothing):
    refuse duplicate keys, recursive aliases and documents that expand past MAX_EXPANDED_NODES."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node, field: str, depth: int = 1) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > MAX_DEPTH:  # composed depth is bounded already; aliases can chain past it
            raise _Refused(node.start_mark.line + 1, f"aliases nest deeper than {MAX_DEPTH} levels.",
                           "write the values out, or use fewer aliases.")
        if key in in_progress:
            raise _Refused(node.start_mark.line + 1, "an alias refers to its own anchor (a recursive structure).",
                           "remove the alias.")
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if name is not None and key_node.tag != "tag:yaml.org,2002:merge":
                    if name in seen:
                        where = f"{field}.{excerpt(name)[1:-1]}" if field else excerpt(name)[1:-1]
                        raise _Refused(key_node.start_mark.line + 1,
                                       f"duplicate key {excerpt(name)} in {field or 'the top level'} "
                                       f"(first at line {seen[name]}); YAML would silently keep only the last.",
                                       f"merge the two '{where}' blocks into one.")
                    seen[name] = key_node.start_mark.line + 1
                short = name if name is None or len(name) <= EXCERPT_CHARS else name[: EXCERPT_CHARS - 1] + "…"
                child = f"{field}.{short}" if field and short is not None else (short or field)
                total += size(key_node, field, depth + 1) + size(value_node, str(child), depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item, field, depth + 1) for item in node.value)
        if total > MAX_EXPANDED_NODES:
            raise _Refused(node.start_mark.line + 1,
                           f"anchors and aliases expand to more than {MAX_EXPANDED_NODES:,} nodes.",
                           "write the values out, or use fewer aliases.")
        in_progress.discard(key)
        sizes[key] = total
        return total

    size(root, "")


def _read_text(path: Path, limit: int, what: str) -> str:
    if not path.is_file():
        raise RecipeError(str(path), "file not found.", "check the path (recipes live in recipes/<model>/).")
    size = path.stat().st_size
    if size > limit:
        raise RecipeError(str(path), f"{size:,} bytes, over the {limit:,}-byte limit for a {what}.",
                          "this is not a hand-written recipe; check the path.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}).",
                          "save the file as UTF-8.") from None


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    text = _read_text(path, MAX_YAML_BYTES, "YAML file")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_graph(node)
        data = loader.construct_document(node) if node is not None else None
    except _Refused as exc:
        raise RecipeError(f"{path}:{exc.line}" if exc.line else str(path), exc.problem, exc.fix) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = str(getattr(exc, "problem", None) or exc)
        raise RecipeError(where, f"not valid YAML ({excerpt(problem, 120)[1:-1]}).", "fix the syntax there.") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(str(path), "expected a mapping at the top level.", "see pipeline/recipe/schema.py for the layout.")
    return data


def read_json(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from a small file (config.json, tokenizer_config.json), with the same bounds."""
    path = Path(path)
    text = _read_text(path, MAX_JSON_BYTES, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg}).", f"restore the {what}.") from None
    except RecursionError:
        raise RecipeError(str(path), "nested too deeply to be a model config.", f"restore the {what}.") from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), "expected a JSON object at the top level.", f"restore the {what}.")
    return data


class YamlSyntaxError(ValueError):
    """A file that is not valid YAML (or uses a tag SafeLoader refuses); str() is PyYAML's own
    message, with the line and column."""


def load_yaml_file(path: Path) -> Any:
    """The document of a small file forge or lm-eval writes (an eval suite, an lm-eval task, plan.yaml),
    as PyYAML's SafeLoader reads it, whatever its top-level type. OSError when it cannot be read,
    YamlSyntaxError when it is not YAML: the caller words both for its own file. Hand-written
    recipes go through read_yaml, which bounds and checks them."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc)) from exc


def read_output_json(path: Path) -> dict[str, Any] | None:
    """A JSON object a stage wrote (gate_report.json, throughput.json, receipt.json), None when the
    file is absent; a file that is there but not a JSON object names the stage to re-run."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageInputError(str(path), f"not valid JSON ({exc.msg}).", "re-run the stage that writes it.") from None
    if not isinstance(data, dict):
        raise StageInputError(str(path), "is not a JSON object.", "re-run the stage that writes it.")
    return data


def _field_path(loc: tuple) -> str:
    parts = [str(part) if len(str(part)) <= EXCERPT_CHARS else str(part)[: EXCERPT_CHARS - 1] + "…" for part in loc]
    return ".".join(parts) or "(top level)"


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


def _problem(error: dict[str, Any]) -> tuple[str, str]:
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return "required field is missing.", f"add '{error['loc'][-1]}' (see the schema in pipeline/recipe/schema.py)."
    if kind == "literal_error":
        return f"{error['msg'].lower()}, got {excerpt(value)}.", "use one of the listed values."
    if isinstance(value, bool) and kind in ("int_type", "float_type"):
        return (f"{error['msg']}, got the YAML boolean {str(value).lower()}.",
                "write a number (YAML reads true/false/yes/no/on/off as booleans).")
    if kind == "value_error" or isinstance(value, dict):
        return f"{error['msg']}.", "correct the value."
    return f"{error['msg']} (got {excerpt(value)}).", "correct the value."


def _present_keys(data: Any, loc: tuple) -> set[str]:
    for part in loc:
        data = data.get(part) if isinstance(data, dict) else None
    return {str(k) for k in data} if isinstance(data, dict) else set()


def validation_problems(path: Path, model: type[BaseModel], exc: ValidationError,
                        data: Any = None) -> list[RecipeError]:
    """Every problem pydantic found, unknown keys first (a misspelt key is usually also the cause
    of a "missing" one: `calibraton:` explains a missing `calibration`, so the two become one)."""
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    explained: set[tuple] = set()
    problems: list[RecipeError] = []
    for error in unknown:
        loc = tuple(error["loc"])
        allowed = _allowed_keys(model, loc) or []
        unused = [k for k in allowed if k not in _present_keys(data, loc[:-1])]
        close = difflib.get_close_matches(str(loc[-1]), unused, n=1, cutoff=0.6)
        problem = f"unknown key {excerpt(str(loc[-1]))}."
        if close:
            missing = any(e["type"] == "missing" and tuple(e["loc"]) == (*loc[:-1], close[0]) for e in errors)
            if missing:
                explained.add((*loc[:-1], close[0]))
            fix = (f"did you mean '{close[0]}'?" + (" (that required field is missing)" if missing else "")
                   + f" Allowed keys here: {', '.join(allowed)}.")
        elif allowed:
            fix = f"remove it or correct the spelling; allowed keys here: {', '.join(allowed)}."
        else:
            fix = "remove it."
        problems.append(RecipeError(f"{path}: {_field_path(loc)}", problem, fix))
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden" or loc in explained:
            continue
        problem, fix = _problem(error)
        problems.append(RecipeError(f"{path}: {_field_path(loc)}", problem, fix))
    return problems


def validation_to_error(path: Path, model: type[BaseModel], exc: ValidationError, data: Any = None) -> ForgeError:
    problems = validation_problems(path, model, exc, data)
    return problems[0] if len(problems) == 1 else RecipeProblems(problems)


def load_model_file(path: Path, model: type[ModelT], extra: dict[str, Any] | None = None) -> ModelT:
    data = read_yaml(path)
    if extra:
        data = {**data, **extra}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_to_error(path, model, exc, data) from None
