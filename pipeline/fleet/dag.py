"""The DAG `forge fleet run` submits: dvc.yaml's stages (foreach expanded), read through DVC itself.

DVC resolves `vars: [plan.yaml]` and every `foreach`, and links a stage to the stages whose outputs
its deps name (dvc/repo/graph.py `build_graph`: an edge runs from a stage to each stage whose
output overlaps one of its deps). Reading `Repo.index.graph` therefore gives exactly the order
`dvc repro` follows, with no stage name written here: a recipe added to plan.yaml or a dep added to
dvc.yaml is a new node or edge the next run picks up.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ForgeError


@dataclass(frozen=True)
class StageNode:
    name: str  # DVC's address: "calibrate@smollm2-135m-instruct-fp8", "report"
    cmd: str  # the command dvc.yaml runs (a `forge <verb>` for forge's own stages)
    upstream: tuple[str, ...]  # stages whose outputs this one's deps name
    uncached_outs: tuple[str, ...]  # outs/metrics with `cache: false` (DVC never pushes these)

    @property
    def key(self) -> str | None:
        """The foreach key (a plan.yaml models/recipes/targets key), None for a plain stage."""
        return self.name.split("@", 1)[1] if "@" in self.name else None


def expand(root: Path, patterns: list[str] | None = None) -> list[StageNode]:
    """dvc.yaml's stages in topological order; with `patterns` (fnmatch on stage names) only the
    matching stages and everything they need, as `dvc repro <target>` would run."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            graph = repo.index.graph
            nodes = {stage.addressing: _node(stage, graph) for stage in graph.nodes if stage.cmd}
    except DvcException as exc:
        raise ForgeError(f"{root}/dvc.yaml", f"DVC cannot read the pipeline: {exc}.",
                         "fix dvc.yaml (`dvc dag` shows the same error).") from exc
    order = list(nx.topological_sort(nx.DiGraph([(u, n.name) for n in nodes.values() for u in n.upstream])))
    order += sorted(name for name in nodes if name not in order)  # stages with no edges at all
    if patterns:
        wanted = {name for name in nodes if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
        if not wanted:
            raise ForgeError("--targets", f"{', '.join(patterns)} matches no stage of dvc.yaml.",
                             f"use stage names or patterns such as 'publish@*' (stages: {', '.join(sorted(nodes))}).")
        wanted |= {a for name in wanted for a in ancestors(nodes, name)}
        order = [name for name in order if name in wanted]
    return [nodes[name] for name in order if name in nodes]


def ancestors(nodes: dict[str, StageNode], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(nodes[name].upstream)
    while todo:
        up = todo.pop()
        if up not in seen:
            seen.add(up)
            todo.extend(nodes[up].upstream)
    return seen


def descendants(nodes: list[StageNode], name: str) -> set[str]:
    below: set[str] = set()
    for node in nodes:  # topological order: a node's upstream comes before it
        if name in node.upstream or below & set(node.upstream):
            below.add(node.name)
    return below


def _node(stage, graph) -> StageNode:
    upstream = tuple(sorted(up.addressing for up in graph.successors(stage) if up.cmd))
    return StageNode(name=stage.addressing, cmd=stage.cmd, upstream=upstream,
                     uncached_outs=tuple(out.def_path for out in stage.outs if not out.use_cache))
