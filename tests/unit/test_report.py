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
        "throughput": {"decode_tok_s_max_batch": tok_s, "source": source},
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
        "| recipe | GPU | TP | gate | recovery forge_mc/acc,none [95% CI] | recovery forge_prose/word_perplexity,none [95% CI] | "
        "weights GiB | KV capacity (tokens) | decode tok/s (max batch) | J/token | $/Mtok |"
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
    assert "![decode tok/s per target](figures/throughput.png)" in md
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
    assert targets[1]["decode_tok_s_max_batch"] == "35500.0" and targets[1]["throughput_source"] == "measured"
    assert targets[0]["gate"] == "" and targets[2]["gate"] == "fail"
    assert float(targets[2]["min_recovery"]) == pytest.approx(133.31 / 204.5)
    assert json.loads((tmp_path / "plots" / "throughput.json").read_text())[0]["weights_bytes"] == 269_060_552
    assert [t["label"] for t in targets][:2] == ["smollm2-135m bf16@h200x1", "smollm2-135m fp8@h200x1"]


def test_bad_entries_are_named(entries):
    bad = [entries[0], {**entries[1], "througput": {}}]
    with pytest.raises(StageInputError) as err:
        load_entries(bad)
    assert str(err.value).startswith("report input[1]: througput: unknown field.")
    bad_source = [{**entries[1], "throughput": {"decode_tok_s_max_batch": 1.0, "source": "guessed"}}]
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
        "throughput": {"decode_tok_s_max_batch": 35500.0, "source": "measured", "predicted_tok_s": 100000.0,
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
