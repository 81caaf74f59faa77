"""The one import rule between pipeline's packages (ARCHITECTURE.md "Packages"), checked on the real tree
and shown to fail on a deliberate violation in a copy of it.

- layers and independence: import-linter's contracts in pyproject.toml [tool.importlinter];
- no import circle, between packages or between two modules of one package (import-linter's layers
  contract does not see a circle inside one layer): the graph is grimp's, the library import-linter
  builds its own from, so both read the same imports (function-level and TYPE_CHECKING ones included);
- no private name crosses a module boundary; no compatibility re-export (`# noqa: F401`);
- no module over 450 lines unless MODULE_SIZE_EXCEPTIONS says why it is one job.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_MODULE_LINES = 450
MODULE_SIZE_EXCEPTIONS: dict[str, str] = {}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
                          check=False, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


CYCLES_SCRIPT = r"""
import json, sys
import grimp
graph = grimp.build_graph(sys.argv[1], cache_dir=None)
edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
index, low, stack, on_stack, cycles = {}, {}, [], set(), []
sys.setrecursionlimit(10000)
def visit(node):  # Tarjan's strongly connected components
    index[node] = low[node] = len(index)
    stack.append(node); on_stack.add(node)
    for nxt in edges[node]:
        if nxt not in index:
            visit(nxt); low[node] = min(low[node], low[nxt])
        elif nxt in on_stack:
            low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
        component = []
        while True:
            member = stack.pop(); on_stack.discard(member); component.append(member)
            if member == node:
                break
        if len(component) > 1:
            cycles.append(sorted(component))
for module in edges:
    if module not in index:
        visit(module)
print(json.dumps(cycles))
"""


def import_cycles(package: str, root: Path) -> list[list[str]]:
    """Circles of imports (strongly connected components of more than one module) in grimp's graph of
    the package found under `root` (a subprocess, so a copy of the tree is read, not the imported one)."""
    result = subprocess.run([sys.executable, "-c", CYCLES_SCRIPT, package], cwd=root, env={"PYTHONPATH": str(root)},
                            capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout)


def private_crossings(path: Path, module: str) -> list[str]:
    """`from pipeline.x import _y` and `alias._y` where alias is a pipeline module imported here."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []
    module_aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(path.parents[len(module.split('.')) - 1])}:{node.lineno} "
                                 f"imports {node.module}.{alias.name}")
                elif (PIPELINE.parent / Path(*f"{node.module}.{alias.name}".split("."))).with_suffix(".py").exists():
                    module_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            module_aliases.update(a.asname for a in node.names if a.name.startswith("pipeline") and a.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def pipeline_modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(PIPELINE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append((path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)))
    return out


def test_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout


def test_no_import_cycles():
    assert import_cycles("pipeline", ROOT) == []


def test_no_private_name_crosses_a_module():
    problems = [p for path, module in pipeline_modules() for p in private_crossings(path, module)]
    assert problems == []


def test_no_compatibility_reexports():
    reexports = [f"{path.relative_to(ROOT)}:{n}" for path, _ in pipeline_modules()
                 for n, line in enumerate(path.read_text().splitlines(), 1) if "noqa: F401" in line]
    assert reexports == []


def test_module_sizes():
    big = {module: n for path, module in pipeline_modules()
           if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES and module not in MODULE_SIZE_EXCEPTIONS}
    assert big == {}


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(PIPELINE, root / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "data", "*.json"))
    return root


def test_a_lower_package_importing_a_higher_one_breaks_the_contract(tree_copy):
    errors = tree_copy / "pipeline" / "core" / "errors.py"
    original = errors.read_text()
    errors.write_text(original + "\nfrom pipeline.stages import build  # deliberate violation\n")
    try:
        result = lint_imports(tree_copy)
    finally:
        errors.write_text(original)
    assert result.returncode != 0
    assert "pipeline.core is not allowed to import pipeline.stages" in result.stdout
    assert "pipeline.core.errors -> pipeline.stages.build" in result.stdout


def test_a_stage_importing_another_stage_breaks_the_contract(tree_copy):
    build = tree_copy / "pipeline" / "stages" / "build.py"
    original = build.read_text()
    build.write_text(original + "\ndef _late():\n    from pipeline.stages import publish  # deliberate violation\n")
    try:
        result = lint_imports(tree_copy)
    finally:
        build.write_text(original)
    assert result.returncode != 0
    assert "pipeline.stages.build is not allowed to import pipeline.stages.publish" in result.stdout


def test_a_circle_inside_one_package_is_found(tree_copy):
    layout = tree_copy / "pipeline" / "core" / "layout.py"
    original = layout.read_text()
    layout.write_text(original + "\ndef _late():\n    from pipeline.core import files  # deliberate circle\n")
    try:
        cycles = import_cycles("pipeline", tree_copy)
    finally:
        layout.write_text(original)
    assert ["pipeline.core.files", "pipeline.core.layout"] in cycles


def test_a_private_name_crossing_is_found(tmp_path):
    module = tmp_path / "pipeline" / "x.py"
    module.parent.mkdir()
    module.write_text("from pipeline.core.files import _locked_tmpdir\n")
    assert private_crossings(module, "pipeline.x") == ["pipeline/x.py:1 imports pipeline.core.files._locked_tmpdir"]
