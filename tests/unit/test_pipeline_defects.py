"""Issue 12, the pipeline as DVC shows it: items 16 (KPI-only metrics), 17 (offline plots, short
labels, a threshold rule), 18 (a stale plan stops `make repro`), 19 (heartbeat, quiet libraries),
32 (leftover temp dirs, no pickle files in a model output). Items 20 and the summary of 19 are in
test_report_stage.py; 23 and the kills in tests/faults/."""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from pathlib import Path

import pytest
import yaml

from pipeline.core.files import collect_leftovers, staged_output
from pipeline.core.heartbeat import Progress, heartbeat
from pipeline.handoff import kpis
from pipeline.sources.models import copy_local

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- 16: metrics are KPIs


def test_kpis_are_numbers_with_human_names_and_nothing_else():
    results = {"gate_passed": True, "min_recovery": 0.97312345678, "gates_failed": 0, "gates": {"forge_mc/acc,none": {}},
               "gate_verdict": "pass", "path": "simulated-cpu"}
    assert kpis.select("evaluate", results) == {"gate_pass": 1, "min_recovery": 0.973123, "gates_failed": 0}
    # A KPI the stage could not measure (no GPU) is left out, never written as a placeholder.
    assert kpis.select("throughput", {"predicted_output_tok_s": 400.0, "ceiling_decode_tok_s_max_batch": 1000.0,
                                      "measured_output_tok_s": None}) == {"predicted_tok_s": 400.0, "ceiling_tok_s": 1000.0}
    with pytest.raises(TypeError, match=r"^KPI evaluate.min_recovery \(min_recovery\) must be a finite number, got inf$"):
        kpis.select("evaluate", {"min_recovery": float("inf")})


def test_every_kpi_name_is_short_and_plain():
    for stage, table in kpis.KPIS.items():
        assert 1 <= len(table) <= 5, f"{stage}: a handful of KPIs, not {len(table)}"
        for kpi in table:
            assert re.fullmatch(r"[a-z][a-z0-9_]{2,24}", kpi.name), kpi.name
            assert kpi.unit


def test_adding_a_kpi_is_one_line_in_one_table(monkeypatch, tmp_path):
    extra = kpis.Kpi("stage_s", "stage_seconds", "seconds the stage took")
    monkeypatch.setitem(kpis.KPIS, "calibrate", (*kpis.KPIS["calibrate"], extra))
    written = kpis.write_kpis(tmp_path / "m.json", "calibrate", {"perplexity_delta_pct": 2.5, "stage_seconds": 31.0,
                                                                 "checkpoint_bytes": 10, "calibrate_seconds": 3.0})
    assert written == {"perplexity_change_pct": 2.5, "checkpoint_bytes": 10, "stage_s": 31.0}
    assert yaml.safe_load((tmp_path / "m.json").read_text()) == written


def test_nothing_reads_a_metrics_file_back():
    """DVC metrics are a one-way view: the report stage reads stage outputs, not metrics/."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for report in (stages["report"], stages["report-frontier"]):
        assert not any(d.startswith("metrics") for d in report["deps"]) and "--metrics" not in report["cmd"]
        assert {d.split("/")[1] for d in report["deps"] if d.startswith("data/")} == {
            "quantized", "eval", "bundles", "throughput", "published"}
    readers = [p for p in (ROOT / "pipeline").rglob("*.py")
               if re.search(r"""read_text\(\).*metrics/|["']metrics["']\s*/""", p.read_text())]
    assert readers == []


# ---------------------------------------------------------------------------- 17: plots offline


def test_dvc_plots_are_images_so_the_page_needs_no_cdn():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    plots = [next(iter(p)) if isinstance(p, dict) else p for s in stages.values() for p in s.get("plots", [])]
    assert plots == ["reports/figures", "reports/frontier/figures"]  # PNGs: dvc_render's ImageRenderer adds no <script> (vega's loads a CDN)
    assert "template" not in (ROOT / "dvc.yaml").read_text()
    assert "/dvc_plots/" in (ROOT / ".gitignore").read_text().splitlines()


def test_recovery_plot_has_short_labels_and_a_threshold_rule(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    from pipeline.reporting.entries import TargetEntry
    from pipeline.reporting.plots import plot_recovery, plot_throughput

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: figures.append(self))
    rows = [{"metric": m, "baseline": 0.5, "quantized": 0.49, "direction": "higher", "recovery": 0.98,
             "threshold": 0.95, "verdict": "pass", "reason": "ok"} for m in ("forge_mc/acc,none", "forge_mc/acc_norm,none")]
    entry = TargetEntry.model_validate({
        "model": "smollm2-135m-instruct", "format": "fp8", "gpu": "h200", "tp": 1,
        "gate": {"verdict": "pass", "rows": rows}, "memory": {"weights_bytes": 1, "kv_capacity_tokens": 1},
        "throughput": {"output_tok_s": 10.0, "source": "predicted"}})
    plot_recovery(entry.model, [entry], tmp_path / "r.png")
    plot_throughput([entry], tmp_path / "t.png")
    recovery, throughput = (f.axes[0] for f in figures)
    assert [t.get_text() for t in recovery.get_xticklabels()] == ["forge_mc acc", "forge_mc acc_norm"]
    assert sorted(t.get_text() for t in recovery.get_legend().get_texts()) == [
        "forge_mc acc gate >= 0.95", "forge_mc acc_norm gate >= 0.95", "fp8@h200"]
    # each metric's own gate, over its own bars (issue 26), not one rule across the axis
    rules = [c for c in recovery.collections if c.get_label().endswith("gate >= 0.95")]
    assert [[tuple(point) for point in c.get_segments()[0]] for c in rules] == [
        [(-0.45, 0.95), (0.45, 0.95)], [(0.55, 0.95), (1.45, 0.95)]]
    assert [t.get_text() for t in throughput.get_xticklabels()] == ["fp8@h200"]
    texts = [t.get_text() for ax in (recovery, throughput) for t in (*ax.get_xticklabels(), ax.title)]
    texts += [f.get_suptitle() for f in figures]
    assert all(text.isascii() and "…" not in text for text in texts), texts


# ---------------------------------------------------------------------------- 18: stale plan


def test_make_repro_checks_the_plan_before_dvc_repro():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nrepro: setup serve-env\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.strip() for line in recipe] == ["forge plan --dvc --check", "dvc repro report"]
    frontier = makefile.split("\nfrontier: setup serve-env\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.strip() for line in frontier] == ["forge plan --dvc --check", "dvc repro report-frontier"]


def test_a_new_recipe_file_makes_the_plan_stale(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    for name in ("recipes", "calibration", "eval"):
        shutil.copytree(ROOT / name, tmp_path / name)
    for name in ("plan.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--dvc", "--check"]) == 0
    shutil.copy(tmp_path / "recipes/smollm2-135m-instruct/fp8.yaml", tmp_path / "recipes/smollm2-135m-instruct/fp8-b.yaml")
    capsys.readouterr()
    assert main(["plan", "--dvc", "--check"]) == 2
    # and says what the regeneration changes: a new variant joins `make repro` unless it says `frontier: true`
    assert capsys.readouterr().err == (
        "error: plan.yaml, dvc.yaml: stale: recipes/ changed since it was generated (`make repro` (dvc repro "
        "report): gains smollm2-135m-instruct-fp8-b-h200 (recipes/smollm2-135m-instruct/fp8-b.yaml) (now 3 "
        "target(s)); to run a variant only in `make frontier`, set `frontier: true` in its recipe; `make frontier` "
        "(dvc repro report-frontier): gains smollm2-135m-instruct-fp8-b-h200 (recipes/smollm2-135m-instruct/fp8-b.yaml) "
        "(now 8 target(s))). Fix: run `make plan` and commit plan.yaml and dvc.yaml.\n")


# ---------------------------------------------------------------------------- 19: heartbeat, noise


def test_heartbeat_line_has_progress_and_eta():
    progress = Progress("calibrate x")
    progress.phase("calibration", total=32, unit="batches")
    progress.advance(8)
    start = progress._phase_start
    assert progress.line(now=start + 20.0).endswith(": calibration 8/32 batches (25%), "
                                                    f"{start + 20.0 - progress.start:.0f} s elapsed, ETA 60 s")
    progress.phase("export")
    assert re.fullmatch(r"calibrate x: export, \d+ s elapsed", progress.line())


def test_heartbeat_logs_off_a_terminal_and_stops(caplog):
    import time

    with caplog.at_level(logging.INFO, logger="pipeline.core.heartbeat"), \
            heartbeat(Progress("evaluate y"), interval_s=0.05, enabled=True) as progress:
        progress.phase("lm-eval loglikelihood", total=10, unit="forward batches")
        time.sleep(0.3)
    count = len(caplog.records)
    assert count >= 2 and all(r.getMessage().startswith("evaluate y: ") for r in caplog.records)
    time.sleep(0.2)
    assert len(caplog.records) == count  # the thread ended with the block
    with heartbeat(Progress("z"), interval_s=0.01, enabled=False):
        time.sleep(0.05)
    assert len(caplog.records) == count


def test_lm_eval_progress_bars_are_turned_off_for_the_heartbeat():
    from pipeline.accuracy.lm_eval_runner import _counted_hflm

    calls = []

    class FakeHFLM:
        def loglikelihood(self, requests, disable_tqdm=False):
            calls.append(("loglikelihood", disable_tqdm))
            return self._loglikelihood_tokens(requests, disable_tqdm=False)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            calls.append(("rolling", disable_tqdm))
            return self._loglikelihood_tokens(requests, disable_tqdm=False, override_bs=2)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            calls.append(("tokens", disable_tqdm))
            return []

        def generate_until(self, requests, disable_tqdm=False):
            calls.append(("generate", disable_tqdm))
            return []

    progress = Progress("evaluate x")
    lm = _counted_hflm(FakeHFLM, progress, batch_size=16)()
    lm.loglikelihood([object()] * 40)
    assert "lm-eval loglikelihood, 40 requests 0/3 forward batches (about)" in progress.line()
    lm.loglikelihood_rolling([object()] * 5)
    lm.generate_until([object()])
    assert calls == [("loglikelihood", True), ("tokens", True), ("rolling", True), ("tokens", True), ("generate", True)]


def test_modelopt_prints_go_to_the_debug_log(caplog):
    from pipeline.quant.modelopt_glue import stdout_to_debug_log

    with caplog.at_level(logging.DEBUG, logger="pipeline.quant.modelopt_glue"), stdout_to_debug_log("modelopt: "):
        print("{'quant_cfg': " + "x" * 1800 + "}")
    assert [(r.levelno, r.getMessage()[:22]) for r in caplog.records] == [(logging.DEBUG, "modelopt: {'quant_cfg'")]


def test_the_merged_quant_config_is_not_printed(capsys, caplog):
    """ModelOpt's update_quant_cfg_with_kv_cache_quant prints ~1,800 characters; forge keeps it at DEBUG."""
    from pipeline.quant.quant_config import build_quant_config

    with caplog.at_level(logging.DEBUG, logger="pipeline.quant.modelopt_glue"):
        build_quant_config("FP8_DEFAULT_CFG", "fp8", [])
    assert capsys.readouterr().out == ""
    assert any(r.getMessage().startswith("modelopt: Updated quant_cfg with KV cache quantization") for r in caplog.records)


def test_deprecation_warnings_are_quiet_unless_verbose():
    from pipeline.cli import configure_logging

    with warnings.catch_warnings(record=True) as seen:
        configure_logging(False)
        warnings.warn("old api", DeprecationWarning, stacklevel=1)
        warnings.warn("soon", FutureWarning, stacklevel=1)
        warnings.warn("real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["real problem"]


# ---------------------------------------------------------------------------- 32: leftovers, .bin


def test_a_killed_writers_temp_dir_is_removed_by_the_next_writer(tmp_path, caplog):
    dead = tmp_path / ".out.tmp-abc123"  # nobody holds its lock: its writer is gone
    (dead / "checkpoint").mkdir(parents=True)
    (dead / "checkpoint/model.safetensors").write_bytes(b"x" * 2_000_000)
    old = tmp_path / ".other.old-99-1"
    old.mkdir()
    keep = tmp_path / ".hidden-config"
    keep.mkdir()
    with caplog.at_level(logging.WARNING, logger="pipeline.core.files"), staged_output(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not dead.exists() and not old.exists() and keep.is_dir() and (tmp_path / "out/f").is_file()
    assert f"removed {dead} (2.0 MB) left by an interrupted stage" in caplog.text
    assert collect_leftovers(tmp_path) == []


def test_pickle_files_beside_safetensors_are_not_linked_into_the_model(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"abc"), ("pytorch_model.bin", b"pickle"),
                       ("training_args.bin", b"pickle"), ("tokenizer.json", b"{}")):
        (src / name).write_bytes(data)
    copy = copy_local(src, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert copy.dropped == ("pytorch_model.bin", "training_args.bin") and copy.linked == 3
