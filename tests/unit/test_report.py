import csv
import json

import pytest

from pipeline.accuracy.gates import GatePolicy, evaluate_gates
from pipeline.core.errors import StageInputError
from pipeline.reporting.entries import load_entries
from pipeline.reporting.report import write_report

DIRS = {"forge_mc/acc,none": "higher", "forge_prose/word_perplexity,none": "lower"}
BASELINE = {"forge_mc/acc,none": 0.7483, "forge_prose/word_perplexity,none": 133.31}


def _entry(fmt, gpu, quantized, tok_s, source, tp=1, weights=142_000_000):
    gate = evaluate_gates(BASELINE, quantized, DIRS, GatePolicy(0.95)).to_dict() if quantized is not None else None
    return {
        "model": "smollm2-135m",
        "format": fmt,
        "gpu": gpu,
        "tp": tp,
        "gate": gate,
        "memory": {"weights_bytes": weights, "kv_capacity_tokens": 1_234_567, "kv_bytes_per_token": 9216},
        "throughput": {"output_tok_s": tok_s, "source": source},
        "joules_per_token": 0.0123,
        "usd_per_mtok": 0.456,
    }


@pytest.fixture
def entries():
    return [
        _entry("bf16", "h200", None, 21000.0, "predicted", weights=269_060_552),
        _entry(
            "fp8", "h200", {"forge_mc/acc,none": 0.7417, "forge_prose/word_perplexity,none": 136.2}, 35500.0, "measured"
        ),
        _entry(
            "nvfp4",
            "b200",
            {"forge_mc/acc,none": 0.60, "forge_prose/word_perplexity,none": 204.5},
            61000.0,
            "predicted",
            weights=90_000_000,
        ),
        {
            **_entry(
                "fp8",
                "h100",
                {"forge_mc/acc,none": 0.75, "forge_prose/word_perplexity,none": 0.0},
                30000.0,
                "predicted",
            ),
            "model": "tiny",
        },
    ]


def test_report_files_and_numbers(entries, tmp_path):
    files = write_report(entries, tmp_path / "report")
    names = sorted(p.relative_to(tmp_path / "report").as_posix() for p in (tmp_path / "report").rglob("*.*"))
    assert names == sorted(
        [
            "report.md",
            "readme_results.md",
            "figures/recovery_smollm2-135m.png",
            "figures/recovery_tiny.png",
            "figures/throughput.png",
            "plots/recovery.csv",
            "plots/recovery.json",
            "plots/throughput.csv",
            "plots/throughput.json",
        ]
    )
    for png in files.plots:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000

    md = files.markdown.read_text()
    assert md.count("## smollm2-135m") == 1 and md.count("## tiny") == 1
    header = (
        "| recipe | GPU | TP | gate | recovery forge_mc/acc,none [95% CI] | increase forge_prose/word_perplexity,none [95% CI] | "
        "weights GiB | KV capacity (tokens) | output tok/s (trtllm-bench run) | J/token | $/Mtok |"
    )
    assert header in md
    assert "| bf16 | h200 | 1 | not gated | — | — | 0.25 | 1,234,567 | 21,000 (predicted) | 0.0123 | 0.456 |" in md
    fp8 = f"| fp8 | h200 | 1 | PASS | {0.7417 / 0.7483:.4f} | {136.2 / 133.31 - 1:+.1%} | 0.13 | 1,234,567 | 35,500 (measured) |"
    assert fp8 in md
    nvfp4 = f"| nvfp4 | b200 | 1 | FAIL | {0.60 / 0.7483:.4f} ✗ | {204.5 / 133.31 - 1:+.1%} ✗ | 0.08 |"
    assert nvfp4 in md
    # failing targets get their gate table with reasons
    assert "### nvfp4@b200x1: accuracy gate failed" in md
    assert f"recovery {0.60 / 0.7483:.4f} < 0.95" in md
    # a quantized perplexity of 0 gives an infinite recovery: shown as ∞, not a crash
    assert "| fp8 | h100 | 1 | PASS | 1.0023 | -100.0% |" in md
    assert "![recovery for smollm2-135m](figures/recovery_smollm2-135m.png)" in md
    assert "![output tok/s per target](figures/throughput.png)" in md
    assert "## Missing results" not in md


def test_dvc_tables(entries, tmp_path):
    write_report(entries, tmp_path)
    rows = json.loads((tmp_path / "plots" / "recovery.json").read_text())
    assert len(rows) == 6  # 3 gated targets x 2 metrics
    nv = next(r for r in rows if r["target"] == "nvfp4@b200x1" and r["metric"] == "forge_mc/acc,none")
    assert nv["recovery"] == pytest.approx(0.60 / 0.7483) and nv["verdict"] == "fail"
    inf = next(r for r in rows if r["model"] == "tiny" and r["metric"].startswith("forge_prose"))
    assert inf["recovery"] is None  # strict JSON; report.md shows ∞
    assert nv["label"] == "smollm2-135m nvfp4@b200x1 forge_mc/acc,none"
    assert len({r["label"] for r in rows}) == len(rows)  # the nominal axis of `dvc plots`
    with (tmp_path / "plots" / "throughput.csv").open() as fh:
        targets = list(csv.DictReader(fh))
    assert [t["target"] for t in targets] == ["bf16@h200x1", "fp8@h200x1", "nvfp4@b200x1", "fp8@h100x1"]
    assert targets[1]["output_tok_s"] == "35500.0" and targets[1]["throughput_source"] == "measured"
    assert targets[0]["gate"] == "" and targets[2]["gate"] == "fail"
    # the metric nearest its own threshold, on its own terms (here: word perplexity's increase vs its maximum)
    assert targets[2]["nearest_gate"] == f"forge_prose word_perplexity {204.5 / 133.31 - 1:+.1%} (<= +5.3%)"
    assert json.loads((tmp_path / "plots" / "throughput.json").read_text())[0]["weights_bytes"] == 269_060_552
    assert [t["label"] for t in targets][:2] == ["smollm2-135m bf16@h200x1", "smollm2-135m fp8@h200x1"]


def test_bad_entries_are_named(entries):
    bad = [entries[0], {**entries[1], "througput": {}}]
    with pytest.raises(StageInputError) as err:
        load_entries(bad)
    assert str(err.value).startswith("report input[1]: througput: unknown field.")
    bad_source = [{**entries[1], "throughput": {"output_tok_s": 1.0, "source": "guessed"}}]
    with pytest.raises(
        StageInputError, match=r"report input\[0\]: throughput.source: Input should be 'predicted' or 'measured'"
    ):
        load_entries(bad_source)
    with pytest.raises(StageInputError, match=r"report input\[1\]: smollm2-135m bf16@h200x1 also appears at \[0\]"):
        load_entries([entries[0], entries[0]])


def test_empty_report_is_an_error(tmp_path):
    with pytest.raises(StageInputError, match="no targets to report"):
        write_report([], tmp_path)


def test_measured_labels_paths_perplexity_and_missing_targets(entries, tmp_path):
    fp8 = {
        **entries[1],
        "throughput": {"output_tok_s": 35500.0, "source": "measured", "predicted_tok_s": 100000.0,
                       "measured_over_predicted": 0.355},
        "power_source": "nvml",
        "eval_path": "trtllm-serve",
        "perplexity": {"baseline": 15.30, "quantized": 15.63},
    }
    files = write_report([fp8], tmp_path, missing=["smollm2-135m-nvfp4-b200: metrics/build/x.json missing"])
    md = files.markdown.read_text()
    assert "| fp8 | h200 | 1 | PASS (trtllm-serve) |" in md
    assert "| 35,500 (measured, 0.35× of 100,000 predicted) | 0.0123 (nvml) | 0.456 |" in md
    assert "| fp8 | h200 | 15.300 | 15.630 | +2.2% |" in md
    assert md.endswith("## Missing results\n\n- smollm2-135m-nvfp4-b200: metrics/build/x.json missing\n")
    with (tmp_path / "plots" / "throughput.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert (row["power_source"], row["eval_path"], row["measured_over_predicted"]) == ("nvml", "trtllm-serve", "0.355")


def test_only_missing_targets_still_make_a_report(tmp_path):
    files = write_report([], tmp_path, missing=["a-fp8-h200: nothing ran"])
    assert "- a-fp8-h200: nothing ran" in files.markdown.read_text()
    assert (tmp_path / "plots" / "recovery.csv").read_text().startswith("label,model,format,gpu,tp,target,metric,")


# ----------------------------------------------------------------------------- issue 26: each metric on its own terms

WORD_PPL = "forge_prose/word_perplexity,none"


def _gated(quantized_ppl: float, intervals=None) -> dict:
    """fp8 as the run had it: acc passes >= 0.95, word perplexity +5.7% passes its <= +36.6% (recovery 0.946)."""
    policy = GatePolicy(0.95, max_increase={WORD_PPL: 0.366})
    gate = evaluate_gates(BASELINE, {"forge_mc/acc,none": 0.7379, WORD_PPL: quantized_ppl}, DIRS, policy,
                          intervals=intervals)
    return {"model": "smollm2-135m", "format": "fp8", "gpu": "h200", "tp": 1, "gate": gate.to_dict(),
            "memory": {"weights_bytes": 1, "kv_capacity_tokens": 1},
            "publish": {"published": True, "version": "v1.0.0",
                        "gated_on": "served: vllm 0.32.0 on cpu: X, PASS"}}


def test_the_summary_states_the_metric_nearest_its_gate_on_its_own_terms():
    """`gate pass, min recovery 0.946` put a perplexity-type metric's recovery (allowed down to 0.732)
    beside a pass, below the 0.95 another metric is held to."""
    from pipeline.reporting.report import summary_lines

    [_, line] = summary_lines([_gated(133.31 * 1.057)])
    assert line == ("  PUBLISHED smollm2-135m fp8@h200x1 v1.0.0: gate pass, nearest its threshold: "
                    "forge_mc acc 0.9861 (>= 0.95)")
    assert "min recovery" not in line
    # when word perplexity is the nearest, it is stated as an increase against its own maximum
    [_, line] = summary_lines([_gated(133.31 * 1.33)])
    assert line.endswith("gate pass, nearest its threshold: forge_prose word_perplexity +33.0% (<= +36.6%)")


def test_the_recovery_figure_draws_each_gates_own_threshold_over_its_own_metric():
    from pipeline.reporting.entries import load_entries
    from pipeline.reporting.plots import recovery_figure

    [entry] = load_entries([_gated(133.31 * 1.057)])
    recovery_ax, increase_ax = recovery_figure("smollm2-135m", [entry]).axes
    # acc: recovery against its minimum; word perplexity: its increase (%) against its maximum, not a
    # recovery of 0.946 under a 0.95 line drawn across every metric
    assert recovery_ax.get_ylabel() == "recovery (1.0 = baseline)"
    assert increase_ax.get_ylabel() == "increase over baseline, %"
    assert [round(bar.get_height(), 4) for bar in recovery_ax.patches] == [round(0.7379 / 0.7483, 4)]
    assert [round(bar.get_height(), 1) for bar in increase_ax.patches] == [5.7]
    for ax, level, label in ((recovery_ax, 0.95, "forge_mc acc gate >= 0.95"),
                             (increase_ax, 36.6, "forge_prose word_perplexity gate <= +36.6%")):
        [rule] = [c for c in ax.collections if c.get_label() == label]
        [segment] = rule.get_segments()
        assert segment[0][1] == segment[1][1] == pytest.approx(level)
        assert (segment[0][0], segment[1][0]) == (-0.45, 0.45)  # over that metric's bars only
        assert not [line for line in ax.lines if line.get_linestyle() == "--"]  # no rule across the whole axis


def test_the_publish_section_states_the_rule_and_what_gated(tmp_path):
    from pipeline.recipe.eval_schema import GATE_RULE

    md = write_report([_gated(133.31 * 1.057)], tmp_path).markdown.read_text()
    assert f"The rule: {GATE_RULE}\n" in md
    assert "| smollm2-135m | fp8@h200x1 | v1.0.0 | served: vllm 0.32.0 on cpu: X, PASS |  |" in md


def test_the_served_table_shows_n_and_each_metric_on_its_own_terms():
    """The served-vs-simulated table mixed 1,397 and 151 questions without showing n (issue 26)."""
    from pipeline.accuracy.stats import Interval
    from pipeline.reporting.entries import load_entries
    from pipeline.reporting.markdown import served_table

    simulated = _gated(133.31 * 1.057, intervals={"forge_mc/acc,none": Interval(0.9861, 0.9665, 1.0055, 1397),
                                                  WORD_PPL: Interval(1.057, 1.046, 1.070, 99)})
    served_gate = evaluate_gates(BASELINE, {"forge_mc/acc,none": 0.70, WORD_PPL: 133.31 * 1.2}, DIRS,
                                 GatePolicy(0.95, max_increase={WORD_PPL: 0.366}),
                                 intervals={"forge_mc/acc,none": Interval(0.935, 0.88, 0.99, 151),
                                            WORD_PPL: Interval(1.2, 1.1, 1.3, 99)})
    [entry] = load_entries([{**simulated, "served": {"served": True, "engine": "vllm", "engine_version": "0.32.0",
                                                     "device": "cpu: X", "gate": served_gate.to_dict()}}])
    table = served_table([entry])
    assert "| n sim / served | recovery (increase for max-increase gates) sim / as-served sim / served |" in table
    assert "| forge_mc/acc,none | 0.7379 | 0.7379 | 0.7 | 1,397 / 151 | 0.986 / 0.986 / 0.935 (>= 0.95) ? |" in table
    assert f"| {WORD_PPL} | 140.9 | 140.9 | 160 | 99 / 99 | +5.7% / +5.7% / +20.0% (<= +36.6%) |" in table


def test_a_zero_recovery_is_shown_not_hidden():
    """Accuracy 0, or a perplexity that overflowed (recovery 0), was printed as "—" like a missing value."""
    from pipeline.reporting.markdown import _on_terms

    assert _on_terms(0.0, "min_recovery") == "0.000"
    assert _on_terms(0.0, "max_increase") == "+inf%"
    assert _on_terms(None, "max_increase") == "—"
    assert _on_terms(0.8, "max_increase") == "+25.0%"


POOLED = {"core/acc,none": "higher", "arc_easy/acc,none": "higher", "piqa/acc_norm,none": "higher"}
POOLED_BASE = {"core/acc,none": 0.60, "arc_easy/acc,none": 0.55, "piqa/acc_norm,none": 0.66}


def _pooled_entry(fmt, gpu, quantized):
    gate = evaluate_gates(POOLED_BASE, quantized, POOLED, GatePolicy(0.95),
                          reported=frozenset({"arc_easy/acc,none", "piqa/acc_norm,none"}))
    return {**_entry(fmt, gpu, None, 1.0, "predicted"), "gate": gate.to_dict()}


def test_a_reported_row_has_its_own_verdict_and_does_not_decide():
    # arc_easy alone falls below 0.95 (0.50 / 0.55 = 0.909): its row says FAIL, the pooled row passes the gate
    gate = evaluate_gates(POOLED_BASE, {"core/acc,none": 0.59, "arc_easy/acc,none": 0.50, "piqa/acc_norm,none": 0.66},
                          POOLED, GatePolicy(0.95), reported=frozenset({"arc_easy/acc,none", "piqa/acc_norm,none"}))
    assert gate.verdict == "pass" and gate.failed == () and gate.publishes
    assert {r.metric: (r.verdict, r.decides) for r in gate.rows}["arc_easy/acc,none"] == ("fail", False)
    assert "| FAIL (reported) |" in gate.to_markdown()
    assert type(gate).from_dict(json.loads(gate.to_json())) == gate  # `decides` survives the JSON


def test_the_readme_block_shows_per_task_rows_and_the_published_figures():
    from pipeline.reporting.readme_results import PublishedFigures, results_table

    entries = load_entries([
        _pooled_entry("fp8", "h200", {"core/acc,none": 0.60, "arc_easy/acc,none": 0.56, "piqa/acc_norm,none": 0.65}),
        _pooled_entry("nvfp4", "b200", {"core/acc,none": 0.40, "arc_easy/acc,none": 0.35, "piqa/acc_norm,none": 0.55})])
    published = {"smollm2-135m": PublishedFigures(source="a card", settings="lighteval",
                                                  figures={"piqa/acc_norm,none": 0.663, "hellaswag/acc_norm,none": 0.4})}
    table = results_table(entries, "a CPU", published)
    head = table.splitlines()[2]
    assert "core acc recovery" in head and "arc_easy" not in head  # the main table: only what decides
    assert "| arc_easy acc | 0 | 0.5500 | 1.0182 PASS | 0.6364 FAIL |" in table
    assert "| piqa acc_norm | 0 | 0.6600 | 0.9848 PASS | 0.8333 FAIL |" in table
    # published: only the metrics the run has, beside the measured baseline
    assert "| piqa acc_norm | 0 | 0.6600 | 0.6630 |" in table and "hellaswag" not in table
    assert "smollm2-135m baseline beside its published figures (a card; there: lighteval):" in table


def test_the_per_task_table_names_each_model_when_it_spans_two():
    """The frontier's table holds the dense recipes and the upcycled MoE's: two "fp8 -> H200" columns
    (seen in reports/frontier/readme_results.md) and one model's baseline for both."""
    from pipeline.reporting.readme_results import results_table

    moe = {**_pooled_entry("fp8", "h200", {"core/acc,none": 0.60, "arc_easy/acc,none": 0.55, "piqa/acc_norm,none": 0.66}),
           "model": "smollm2-135m-moe"}
    entries = load_entries([
        _pooled_entry("fp8", "h200", {"core/acc,none": 0.60, "arc_easy/acc,none": 0.56, "piqa/acc_norm,none": 0.65}), moe])
    per_task = results_table(entries, "a CPU", {}).split("Per task")[1]
    head = next(line for line in per_task.splitlines() if line.startswith("| task metric"))
    assert head == ("| task metric | n | smollm2-135m baseline | smollm2-135m-moe baseline | smollm2-135m: fp8 -> H200 "
                    "recovery [95% CI] | smollm2-135m-moe: fp8 -> H200 recovery [95% CI] |")
    assert "| arc_easy acc | 0 | 0.5500 | 0.5500 | 1.0182 PASS | 1.0000 PASS |" in per_task


def test_published_figures_with_a_bad_field_are_named(tmp_path):
    from pipeline.reporting.readme_results import load_published

    (tmp_path / "p.yaml").write_text("m:\n  source: s\n  settings: t\n  figures: {a: high}\n")
    with pytest.raises(StageInputError) as err:
        load_published(tmp_path / "p.yaml")
    assert str(err.value).startswith(f"{tmp_path / 'p.yaml'}: m.figures.a: Input should be a valid number")
