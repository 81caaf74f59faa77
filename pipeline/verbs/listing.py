"""`forge list`: the artifacts in a registry (versions, stages, format, GPU, key metrics), or with
`--gpu` each one's compatibility with that GPU by the rule `forge pull MODEL --gpu` uses."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass

from pipeline.accuracy.gates import stated_point
from pipeline.core.cliargs import add_verb, arg, included, run_with
from pipeline.core.errors import RecipeError
from pipeline.core.gpus import load_catalog
from pipeline.core.local_gpu import LocalGpu
from pipeline.registry.args import RegistryArgs
from pipeline.registry.artifacts import ArtifactSummary
from pipeline.registry.backends import open_registry
from pipeline.registry.selection import ProfileRow, profile_rows, resolve_gpu
from pipeline.registry.waiting import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

LIST_EXAMPLE = """examples:
  forge list
  forge list --gpu h100          # every artifact, compatible or not with an H100, and why (as pull --gpu decides)
  forge list --gpu b200 --json
"""


@dataclass(frozen=True, kw_only=True)
class ListArgs:
    """`forge list`'s arguments, declared once (pipeline/core/cliargs.py)."""

    gpu: str | None = arg(help="a GPU catalog key: show each artifact's compatibility with it, and which "
                               "one `forge pull MODEL --gpu` would take")
    count: int | None = arg(help="GPUs of that kind available (default 1)")
    json: bool = arg(False, help="machine-readable output")
    where: RegistryArgs = included(RegistryArgs)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "list", run_with(ListArgs, run_list),
             help="artifacts in the registry: versions, stages, format, GPU, key metrics",
             epilog=LIST_EXAMPLE)


def run_list(args: ListArgs) -> int:
    url = args.where.url
    if args.gpu is not None:
        catalog = load_catalog(args.where.catalog)
        if args.gpu not in catalog:
            raise RecipeError("--gpu", f"unknown GPU {args.gpu!r}.",
                              f"use one of {', '.join(catalog)} (pipeline/core/data/gpus.yaml).")
        rows, problems = profiles_main(url, resolve_gpu(args.gpu, catalog, args.count), args.where.deadline_s)
        if args.json:
            print(json.dumps([asdict(r) for r in rows], indent=2))
        else:
            render_profiles(url, args.gpu, rows)
    else:
        summaries, problems = list_main(url, args.where.deadline_s)
        if args.json:
            print(json.dumps([asdict(s) for s in summaries], indent=2))
        else:
            render_list(url, summaries)
    for problem in problems:
        print(f"warning: skipped unreadable {problem}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- list


def list_main(registry_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[ArtifactSummary], list[str]]:
    """Every artifact's summary, and the unreadable manifests skipped (named, not fatal)."""
    registry = open_registry(registry_url, timeout_s)
    return registry.list_artifacts(), registry.problems


def profiles_main(registry_url: str, gpu: LocalGpu,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[ProfileRow], list[str]]:
    """Each artifact's compatibility with `gpu`, by the rule `forge pull MODEL --gpu` uses."""
    registry = open_registry(registry_url, timeout_s)
    rows = profile_rows(registry.manifests(), registry.refusals(), gpu)
    return rows, registry.problems


def render_profiles(url: str, gpu_key: str, rows: list[ProfileRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        print(f"no artifacts in registry {url}")
        return
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=200)
    if console.width < 140:  # too narrow for the table's reasons: one line per artifact, nothing cut
        print(f"{url}: artifacts for {gpu_key}")
        for r in rows:
            verdict = "SELECTED" if r.selected else ("compatible" if r.compatible else "incompatible")
            print(f"  {r.name} {r.version or '-'}  {verdict}: {r.reason}")
        return
    table = Table(title=f"{url}: artifacts for {gpu_key}", header_style="bold")
    table.add_column("name", no_wrap=True, min_width=max(len(r.name) for r in rows))  # copied by users: never cut
    for column in ("version", "format", "built for", "cc", "compatible"):
        table.add_column(column, no_wrap=True)
    table.add_column("why", overflow="fold", min_width=20)
    for r in rows:
        table.add_row(r.name, r.version or "-", r.format, r.gpu, r.compute_capability,
                      "SELECTED" if r.selected else ("yes" if r.compatible else "no"), r.reason)
    console.print(table)


def key_metrics(summary: ArtifactSummary) -> dict[str, str | float | None]:
    """The gated metric nearest its threshold, on its own terms (an increase for perplexity-type
    metrics), and the predicted run's output tok/s (never the roofline ceiling; artifacts published
    before the metadata carried the prediction show none)."""
    m = summary.metrics
    rows = [(k.removeprefix("accuracy.").removesuffix(".recovery"), v) for k, v in m.items()
            if k.startswith("accuracy.") and k.endswith(".recovery")]
    rows = [(name, recovery, m.get(f"accuracy.{name}.threshold")) for name, recovery in rows]
    rows = [(name, recovery, threshold) for name, recovery, threshold in rows if threshold]
    tightest = min(rows, key=lambda r: r[1] / r[2], default=None)
    return {"tightest_gate": stated_point(*tightest, m.get(f"accuracy.{tightest[0]}.max_increase")) if tightest else None,
            "predicted_output_tok_s": m.get("throughput.predicted_output_tok_s")}


def render_list(url: str, summaries: list[ArtifactSummary]) -> None:
    from rich.table import Table

    if not summaries:
        print(f"no artifacts in registry {url}")
        return
    from pipeline.core.tables import print_table  # widens the console so no name is ever cut

    table = Table(title=f"artifacts in {url}", header_style="bold")
    for column in ("name", "versions", "stages", "format", "bits/w", "gpu", "cc", "gate", "nearest its threshold",
                   "output tok/s (predicted)"):
        table.add_column(column, justify="right" if column in ("bits/w", "output tok/s (predicted)") else "left")
    for s in summaries:
        metrics = key_metrics(s)
        versions = s.latest if len(s.versions) == 1 else f"{s.latest} ({len(s.versions)} versions)"
        stages = ", ".join(f"{stage}->{v}" for stage, v in sorted(s.stages.items())) or "-"
        table.add_row(s.name, versions, stages, s.format, f"{s.bits_per_weight:g}", s.gpu, s.compute_capability,
                      s.gate_verdict, metrics["tightest_gate"] or "-",
                      _fmt(metrics["predicted_output_tok_s"], ",.0f"))
    print_table(table)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
