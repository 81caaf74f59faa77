"""The README's generated blocks: the report stages write them (reports/readme_results.md for
`make repro`, reports/frontier/readme_results.md for `make frontier`), `make readme` copies each into
README.md between its two markers, and scripts/check_repro.py compares the results block after
`make repro` (the frontier block too where a frontier report exists), so the README shows what a
fresh run produces and a drift fails CI. The results table itself is `results_table`, from the
report's entries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.accuracy.gates import short_metric
from pipeline.core.errors import StageInputError
from pipeline.core.layout import README_RESULTS_FILE
from pipeline.core.yamlio import YamlSyntaxError, load_yaml_file
from pipeline.planning.dvc_plan import FRONTIER_REPORTS_DIR, REPORTS_DIR
from pipeline.reporting.entries import TargetEntry


@dataclass(frozen=True)
class Block:
    name: str  # the marker's word, e.g. "results"
    reports_dir: str  # the report stage's output directory, relative to the checkout
    make_target: str  # what writes it: `make <target>`
    required: bool  # compared even when absent (a missing report is then a drift)

    @property
    def generated(self) -> str:
        return f"{self.reports_dir}/{README_RESULTS_FILE}"

    @property
    def begin(self) -> str:
        return f"<!-- {self.name}: generated from the run by `make readme` ({self.generated}); do not edit -->"

    @property
    def end(self) -> str:
        return f"<!-- /{self.name} -->"


RESULTS = Block("results", REPORTS_DIR, "repro", required=True)
FRONTIER = Block("frontier", FRONTIER_REPORTS_DIR, "frontier", required=False)
BLOCKS = (RESULTS, FRONTIER)
BEGIN, END = RESULTS.begin, RESULTS.end


def blocks_to_compare(root: Path) -> list[Block]:
    """The results block always; the frontier block only where `make frontier` wrote its report."""
    return [b for b in BLOCKS if b.required or (root / b.generated).is_file()]


def _split(text: str, where: str, spec: Block) -> tuple[str, str, str]:
    begin, end = spec.begin, spec.end
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise StageInputError(where, f"needs exactly one {spec.name} block: a line {begin!r} and, below it, {end!r}.",
                              f"restore the two marker lines around the {spec.name} table.")
    head, rest = text.split(begin)
    body, tail = rest.split(end)
    return head, body, tail


def block(text: str, where: str = "README.md", spec: Block = RESULTS) -> str:
    """The table between the markers, without the newlines that frame it."""
    return _split(text, where, spec)[1].strip("\n") + "\n"


def with_block(text: str, table: str, where: str = "README.md", spec: Block = RESULTS) -> str:
    head, _, tail = _split(text, where, spec)
    return f"{head}{spec.begin}\n{table.strip(chr(10))}\n{spec.end}{tail}"


# The block's first line: the CPU kind the figures were computed on (pipeline/core/host.py says why).
HOST_LINE = "Computed on: "


def host_of(table: str) -> str | None:
    first = table.splitlines()[0] if table.strip() else ""
    return first.removeprefix(HOST_LINE).strip() if first.startswith(HOST_LINE) else None


def other_host(readme: Path, generated: Path, spec: Block = RESULTS) -> str | None:
    """Why the README's block and this run's cannot be compared: computed on another CPU kind (a
    README block without a host line never matches one). None when both name the same host."""
    if not generated.is_file():
        return None
    have = block(readme.read_text(encoding="utf-8"), str(readme), spec)
    want = generated.read_text(encoding="utf-8")
    if host_of(have) == host_of(want):
        return None
    return (f"{readme} {spec.name} block was computed on {host_of(have) or 'an unnamed host'}, this run on "
            f"{host_of(want)}: CPU kernels differ between them in low-order digits, so the two are not compared "
            f"(`make readme` here would publish this host's)")


def drift(readme: Path, generated: Path, spec: Block = RESULTS) -> str | None:
    """None when README.md's block equals the generated table; else what differs and the fix."""
    if not generated.is_file():
        return f"{generated} missing: run `make {spec.make_target}` first"
    want, have = generated.read_text(encoding="utf-8"), block(readme.read_text(encoding="utf-8"), str(readme), spec)
    if want == have:
        return None
    changed = [f"README {old.strip()!r} vs run {new.strip()!r}"
               for old, new in zip(have.splitlines(), want.splitlines()) if old != new]
    if len(have.splitlines()) != len(want.splitlines()):
        changed.append(f"{len(have.splitlines())} lines in README, {len(want.splitlines())} from the run")
    return (f"{readme} {spec.name} block differs from {generated}: {'; '.join(changed[:3])}. "
            "Fix: run `make readme` and commit README.md.")


PUBLISHED_FILE = Path("eval/published.yaml")


class PublishedFigures(BaseModel):
    """One model's published accuracy (eval/published.yaml): where it is stated and under which settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1)
    settings: str = Field(min_length=1, description="how they were measured, where it differs from forge's run")
    figures: dict[str, float] = Field(min_length=1, description="forge's metric key -> the published value (0-1)")


def load_published(path: Path = PUBLISHED_FILE) -> dict[str, PublishedFigures]:
    """eval/published.yaml; every problem names the file and the field."""
    try:
        raw = load_yaml_file(path) or {}
    except (OSError, YamlSyntaxError) as exc:
        raise StageInputError(str(path), f"cannot read it: {exc}", "restore eval/published.yaml from git.") from exc
    out = {}
    for model, body in raw.items():
        try:
            out[str(model)] = PublishedFigures.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise StageInputError(f"{path}: {'.'.join(str(x) for x in (model, *first['loc']))}", first["msg"] + ".",
                                  "see PublishedFigures in pipeline/reporting/readme_results.py.") from exc
    return out


def _four(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def published_table(entries: Sequence[TargetEntry], published: Mapping[str, PublishedFigures]) -> str:
    """Each model's measured baseline beside its published figures, for the metrics both have."""
    lines: list[str] = []
    for model in dict.fromkeys(e.model for e in entries):
        figures = published.get(model)
        baselines = {r.metric: r for e in entries if e.model == model and e.gate for r in e.gate.rows}
        shared = [m for m in (figures.figures if figures else {}) if m in baselines]
        if not figures or not shared:
            continue
        lines += ["", (f"{model} baseline beside its published figures ({figures.source.strip()}; there: "
                       f"{figures.settings.strip()}):"), "",
                  "| task metric | n | forge baseline (lm-eval 0.4.13, 0-shot, no chat template) | published |",
                  "|---|---|---|---|"]
        lines += [f"| {short_metric(m)} | {baselines[m].n} | {_four(baselines[m].baseline)} | "
                  f"{_four(figures.figures[m])} |" for m in shared]
    return "\n".join(lines) + "\n" if lines else ""


def results_table(entries: Sequence[TargetEntry], host: str,
                  published: Mapping[str, PublishedFigures] | None = None) -> str:
    """The README's results table (between its `results` markers), generated from the run on `host`
    (pipeline/core/host.py numerics_host), which its first line names."""
    metrics: dict[str, str] = {}  # metric -> its form's column name
    thresholds: set[str] = set()
    for e in entries:
        report = e.gate
        for r in report.rows if report else ():
            if not r.decides:
                continue  # in the per-task table below
            thresholds.add(r.threshold_text)
            metrics.setdefault(r.metric, "increase" if r.form == "max_increase" else "recovery")
    gate_head = f"gate ({', '.join(sorted(thresholds))})" if thresholds else "gate"
    head = ["model", "recipe -> GPU", "held-out ppl (calibrate)",
            *(f"{short_metric(m)} {form} [95% CI]" for m, form in metrics.items()), gate_head, "published"]
    lines = [f"{HOST_LINE}{host}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        report = e.gate
        by_metric = {r.metric: r for r in report.rows} if report else {}
        p = e.perplexity
        ppl = "—" if p is None else f"{p.baseline:.2f} -> {p.quantized:.2f} ({100 * (p.quantized / p.baseline - 1):+.1f}%)"
        cells = [e.model, f"{e.recipe} -> {e.gpu.upper()}" + (f" x{e.tp}" if e.tp > 1 else ""), ppl]
        cells += ["—" if m not in by_metric else by_metric[m].interval_text for m in metrics]
        cells.append(report.verdict if report else "not gated")
        cells.append("—" if e.publish is None else (e.publish.version or "yes") if e.publish.published else "refused")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _per_task_table(entries) + published_table(entries, published or {})


def _per_task_table(entries: Sequence[TargetEntry]) -> str:
    """Each reported metric (a pooled gate's member tasks, `gate: false`): the baseline, and per target
    the recovery with its interval and its own verdict, which the pooled row above decides for."""
    gated = [e for e in entries if e.gate and any(not r.decides for r in e.gate.rows)]
    if not gated:
        return ""
    rows: dict[str, dict[tuple[str, str], object]] = {}
    for e in gated:
        for r in e.gate.rows:  # type: ignore[union-attr]
            if not r.decides:
                rows.setdefault(r.metric, {})[(e.model, e.target)] = r  # a target is unique per model
    # Several models (the frontier's dense and MoE variants): each target and baseline says whose it is.
    models = list(dict.fromkeys(e.model for e in gated))
    named = len(models) > 1
    head = ["task metric", "n", *(f"{m} baseline" if named else "baseline" for m in models),
            *(f"{e.model + ': ' if named else ''}{e.recipe} -> {e.gpu.upper()} recovery [95% CI]" for e in gated)]
    lines = ["", ("Per task (each row's verdict is its own, the pooled row above decides; disagree: the fraction of "
                  "the task's questions the two models answer differently):"), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, by_target in rows.items():
        first = next(iter(by_target.values()))
        cells = [short_metric(metric), str(first.n)]  # type: ignore[attr-defined]
        for m in models:
            own = next((by_target[(m, e.target)] for e in gated if e.model == m and (m, e.target) in by_target), None)
            cells.append("—" if own is None else _four(own.baseline))  # type: ignore[attr-defined]
        for e in gated:
            r = by_target.get((e.model, e.target))
            rate = (e.disagreement or {}).get(metric.partition("/")[0])
            cells.append("—" if r is None else f"{r.interval_text} {r.verdict.upper()}"  # type: ignore[attr-defined]
                         + ("" if rate is None else f", disagree {rate:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
