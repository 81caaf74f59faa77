"""The gpu-compare stage: real-model recipes on H100/H200 FP8 and B200 NVFP4, published rows beside
the predictions, and the report section that shows them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.gpus import load_catalog
from pipeline.reporting.markdown import gpu_comparison_section
from pipeline.sizing.iteration import Efficiency
from pipeline.sizing.published import CALIBRATION_ROWS, load_rows, predict_row
from pipeline.stages import gpu_compare

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-compare")
    assert gpu_compare.main(out, ROOT / "recipes", ROOT / "pipeline/core/data/gpus.yaml") == 0
    return out, json.loads((out / gpu_compare.JSON_FILE).read_text())


def test_every_real_recipe_target_is_compared(compared):
    _, result = compared
    targets = {r["target"] for r in result["rows"]}
    # every real recipe's (fp8, H100/H200) and (nvfp4, B200) targets (gpu_comparison.COMPARED)
    assert targets == {"llama-3-1-8b-instruct-fp8-h100", "llama-3-1-8b-instruct-fp8-h200",
                       "llama-3-1-8b-instruct-nvfp4-b200", "llama-3-3-70b-instruct-fp8-h100",
                       "llama-3-3-70b-instruct-fp8-h200", "llama-3-3-70b-instruct-nvfp4-b200",
                       "mixtral-8x7b-instruct-fp8-h200", "mixtral-8x22b-instruct-fp8-h200", "qwen3-30b-a3b-fp8-h200",
                       "qwen3-30b-a3b-nvfp4-b200", "gpt-oss-120b-fp8-h200"}
    for r in result["rows"]:
        assert r["predicted_output_tok_s_per_gpu"] == pytest.approx(r["predicted_output_tok_s"] / r["tp"])
        tdp = {"h100": 700, "h200": 700, "b200": 1000}[r["gpu"]]
        assert r["predicted_joules_per_token"] == pytest.approx(tdp * r["tp"] / r["predicted_output_tok_s"])
        assert r["predicted_usd_per_mtok"] == pytest.approx(
            r["price_per_gpu_hour_usd"] * r["tp"] / (r["predicted_output_tok_s"] * 3600) * 1e6)


def test_published_measurement_sits_beside_forges_prediction_of_that_run(compared):
    _, result = compared
    row = next(r for r in result["rows"] if r["target"] == "llama-3-1-8b-instruct-fp8-h200")
    assert row["published_output_tok_s"] == 17744  # perf-overview v1.0, 1000/1000
    published = next(r for r in load_rows(CALIBRATION_ROWS)
                     if (r.model, r.gpu, r.isl, r.osl) == ("Llama-3.1-8B", "H200", 1000, 1000))
    expected = predict_row(published, load_catalog(ROOT / "pipeline/core/data/gpus.yaml"), Efficiency.load())
    assert row["predicted_for_published"] == pytest.approx(expected.predicted_output_tok_s)
    assert row["published_error"] == pytest.approx(expected.predicted_output_tok_s / 17744 - 1)
    b200_8b = next(r for r in result["rows"] if r["target"] == "llama-3-1-8b-instruct-nvfp4-b200")
    assert b200_8b["published_output_tok_s"] is None and b200_8b["published_error"] is None  # none published


def test_ratio_and_claims(compared):
    _, result = compared
    ratio = next(r for r in result["ratios"] if r["model"] == "meta-llama/Llama-3.3-70B-Instruct")
    assert ratio["published_b200_over_h200_per_gpu"] == pytest.approx(7007 / 2909)
    assert 1 < ratio["predicted_b200_over_h200_per_gpu"] < 4
    claims = {c["claim"]: c for c in result["claims"]}
    assert claims["up to 2.5x throughput (B200 over H200)"]["forge_predicted"] == max(
        r["predicted_b200_over_h200_per_gpu"] for r in result["ratios"])
    joules = claims["0.4 J/token"]
    assert joules["forge_predicted"] == min(r["predicted_joules_per_token"] for r in result["rows"])


def test_figures_and_the_report_section(compared, tmp_path):
    out, _ = compared
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    pareto = {f for f in figures if f.startswith("pareto_")}
    assert set(figures) - pareto == {"joules_per_token.png", "tok_s_per_gpu.png", "usd_per_mtok.png"}
    assert {"pareto_Llama-3-3-70B-Instruct.png", "pareto_Qwen3-30B-A3B.png"} <= pareto
    section = gpu_comparison_section(out, out.parent)
    assert section.startswith("## GPU comparison (predicted)")
    assert f"]({out.name}/figures/tok_s_per_gpu.png)" in section
    assert "| llama-3-1-8b-instruct-fp8-h200 | 1 | 1024/1024 |" in section
    assert "0.4 J/token" in section and "17,744" in section
    assert "Under a latency SLO" in section and "| published measurement |" in section


def test_serving_under_the_slo_and_the_seeds_claims_with_the_published_figure(compared):
    from pipeline.reporting.gpu_comparison import SCENARIO

    _, result = compared
    serving = result["serving"]
    assert {(r["gpu"], r["format"]) for r in serving} == {("h100", "fp8"), ("h200", "fp8"), ("b200", "nvfp4")}
    for r in serving:
        assert r["ttft_ms_p99"] <= SCENARIO.slo.ttft_ms and r["tpot_ms_p99"] <= SCENARIO.slo.tpot_ms
        assert r["replicas"] * r["replica_rate_per_s"] >= SCENARIO.rate_per_s
        assert r["pareto"], r  # the curve the figure draws
    claims = {c["claim"]: c for c in result["claims"]}
    # NVIDIA's Llama-3.3-70B 1000/1000 rows (B200 FP4 7,007, H200 FP8 2,909 tok/s, TP 1), at catalog prices and TDP.
    catalog = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
    cost = claims["cost per token 25-50% lower with FP4"]
    assert cost["published"] == pytest.approx(1 - (catalog["b200"].usd_per_gpu_hour / 7007)
                                              / (catalog["h200"].usd_per_gpu_hour / 2909))
    assert claims["0.4 J/token"]["published"] == pytest.approx(1000 / 7007)
    per_b200 = claims["a single B200 handles what needed two or three H200s"]
    pairs = {r["model"]: {} for r in serving}
    for r in serving:
        pairs[r["model"]][r["gpu"]] = r["gpus"]
    assert per_b200["forge_predicted"] == min(p["h200"] / p["b200"] for p in pairs.values())


def test_missing_comparison_is_one_clear_error(tmp_path):
    from pipeline.core.errors import StageInputError

    with pytest.raises(StageInputError) as err:
        gpu_comparison_section(tmp_path / "nothing", tmp_path)
    assert "gpu_compare.json" in str(err.value) and "forge gpu-compare" in str(err.value)
