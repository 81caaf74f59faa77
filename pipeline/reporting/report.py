"""The comparison report: every model × format × GPU target side by side, and the one-screen summary
that ends `dvc repro`.

Input: one entry per built target (pipeline/reporting/entries.py has the schema).

Output under `out_dir`: report.md (pipeline/reporting/markdown.py), figures/recovery_<model>.png and
figures/throughput.png (pipeline/reporting/plots.py: matplotlib, Agg canvas; `dvc plots show` embeds
them as images, so it needs no network, unlike its vega templates, which load vega from a CDN:
dvc_render/vega.py), tables in plots/ (pipeline/reporting/tables.py): recovery.csv / recovery.json
(one row per target × metric) and throughput.csv / throughput.json (one row per target), and
readme_results.md: the README's results block (pipeline/reporting/readme_results.py;
scripts/readme_results.py copies it into README.md, scripts/check_repro.py fails when they differ).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.accuracy.gates import tightest
from pipeline.core.errors import StageInputError
from pipeline.core.host import numerics_host
from pipeline.core.layout import FIGURES_DIR, README_RESULTS_FILE, REPORT_FILE, TABLES_DIR
from pipeline.reporting.entries import TargetEntry, load_entries
from pipeline.reporting.markdown import report_markdown
from pipeline.reporting.plots import plot_recovery, plot_throughput, recovery_figure_name
from pipeline.reporting.readme_results import results_table
from pipeline.reporting.tables import write_tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plots: tuple[Path, ...]
    tables: tuple[Path, ...]


def write_report(
    raw_entries: Sequence[Mapping[str, Any]],
    out_dir: Path,
    title: str = "forge comparison report",
    missing: Sequence[str] = (),
    sections: Sequence[str] = (),
    published: Mapping[str, Any] | None = None,
) -> ReportFiles:
    """Write report.md, PNG plots and CSV/JSON tables for `raw_entries` into `out_dir`.

    `missing` lines (e.g. a planned target whose metrics file does not exist) are listed in the
    report under their own heading, so an absent result is visible, never silently dropped."""
    entries = load_entries(raw_entries)
    if not entries and not missing:
        raise StageInputError("report input", "no targets to report.", "build or plan at least one target first.")
    out_dir = Path(out_dir)
    figures, tables_dir = out_dir / FIGURES_DIR, out_dir / TABLES_DIR
    for directory in (out_dir, figures, tables_dir):
        directory.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[TargetEntry]] = {}
    for e in entries:
        by_model.setdefault(e.model, []).append(e)

    tables = write_tables(entries, tables_dir)
    plots = [
        plot_recovery(model, targets, figures / recovery_figure_name(model))
        for model, targets in by_model.items()
        if any(t.gate for t in targets)
    ]
    plots.append(plot_throughput(entries, figures / "throughput.png"))

    markdown = out_dir / REPORT_FILE
    markdown.write_text(report_markdown(title, by_model, [p for p in plots if p is not None], missing, sections),
                        encoding="utf-8")
    (out_dir / README_RESULTS_FILE).write_text(results_table(entries, numerics_host(), published), encoding="utf-8")
    log.info("report: %s (%d targets, %d models, %d missing)", markdown, len(entries), len(by_model), len(missing))
    return ReportFiles(markdown=markdown, plots=tuple(p for p in plots if p is not None), tables=tables)


# ---------------------------------------------------------------------------------- summary


def summary_lines(raw_entries: Sequence[Mapping[str, Any]] | Sequence[TargetEntry], missing: Sequence[str] = ()) -> list[str]:
    """A one-screen end of `dvc repro`: per target, published (version) or refused and why."""
    entries = [e if isinstance(e, TargetEntry) else TargetEntry.model_validate(e) for e in raw_entries]
    published = [e for e in entries if e.publish and e.publish.published]
    refused = [e for e in entries if e.publish and not e.publish.published]
    lines = [(f"summary: {len(published)} published, {len(refused)} refused, "
              f"{len(entries) - len(published) - len(refused)} not published yet, {len(missing)} missing outputs")]
    for e in entries:
        name = f"{e.model} {e.target}"
        report = e.gate
        nearest = tightest(report.rows) if report else None
        # Each metric on its own terms (an increase against its allowed increase for perplexity-type
        # metrics): a bare "min recovery" mixed both forms and sat below 0.95 beside a pass (issue 26).
        gate = (f"gate {report.verdict}, nearest its threshold: {nearest.stated}" if nearest
                else f"gate {report.verdict}" if report else "not gated")
        if e.publish is None:
            lines.append(f"  -        {name}: {gate}; no publish receipt")
        elif e.publish.published:
            lines.append(f"  PUBLISHED {name} {e.publish.version}: {gate}")
        else:
            lines.append(f"  REFUSED  {name}: {_clip(e.publish.reason or 'no reason recorded', 140)}")
    return lines


def _clip(text: str, width: int) -> str:
    # A summary line, not a name to copy: the full reason is in the receipt and report.md.
    return text if len(text) <= width else text[: width - 3] + "..."
