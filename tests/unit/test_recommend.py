"""`forge recommend` (pipeline/sizing/recommend.py, pipeline/verbs/recommend.py): its choices follow the
prices, the demand and the measured accuracy; its CLI reads and refuses inputs clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.core.formats import KV_CACHE_DTYPES
from pipeline.core.gpus import load_catalog
from pipeline.planning.accuracy_evidence import model_verdicts
from pipeline.sizing.online import Slo
from pipeline.sizing.recommend import AS_PUBLISHED, NOT_MEASURED, PASSED, PUBLISHERS, Demand, Offer, recommend

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
LLAMA_8B = json.loads((ROOT / "recipes/llama-3-1-8b-instruct/config.json").read_text())
KV8 = KV_CACHE_DTYPES["fp8"]
DEMAND = Demand(((1000, 200),), 40.0, Slo(2000, 50))


def offers(**prices: float) -> list[Offer]:
    return [Offer(k, CATALOG[k], prices.get(k, CATALOG[k].usd_per_gpu_hour), "test") for k in ("h100", "h200", "b200")]


def test_the_cheapest_is_the_lowest_hourly_cost_and_every_option_meets_the_demand():
    result = recommend(LLAMA_8B, DEMAND, offers(), KV8, {}, formats=("fp8", "nvfp4"))
    costs = [o.usd_per_hour for o in result.options]
    assert costs == sorted(costs) and result.cheapest is result.options[0]
    for o in result.options:
        assert o.replicas * o.replica_rate_per_s >= DEMAND.rate_per_s
        assert o.ttft_ms["p99"] <= 2000 and o.tpot_ms["p99"] <= 50
        assert o.usd_per_mtok == pytest.approx(o.usd_per_hour / (40.0 * 200 * 3600) * 1e6)
        assert o.usd_per_month == pytest.approx(o.usd_per_hour * 730)
        assert o.joules_per_token == pytest.approx(o.gpus * CATALOG[o.gpu].tdp_watts / (40.0 * 200))
    assert {o.format for o in result.options if o.gpu in ("h100", "h200")} == {"fp8"}  # no FP4 on Hopper


def test_the_pruned_search_finds_the_same_cheapest():
    full = recommend(LLAMA_8B, DEMAND, offers(), KV8, {}, formats=("fp8", "nvfp4"))
    pruned = recommend(LLAMA_8B, DEMAND, offers(), KV8, {}, formats=("fp8", "nvfp4"), cheapest_only=True)
    same = ("gpu", "format", "parallelism", "replicas", "usd_per_hour")
    assert [getattr(pruned.cheapest, k) for k in same] == [getattr(full.cheapest, k) for k in same]
    assert len(pruned.options) < len(full.options)


def test_the_choice_follows_the_prices():
    cheap_b200 = recommend(LLAMA_8B, DEMAND, offers(b200=0.5), KV8, {}, formats=("fp8",))
    dear_b200 = recommend(LLAMA_8B, DEMAND, offers(b200=50.0), KV8, {}, formats=("fp8",))
    assert cheap_b200.cheapest.gpu == "b200" and dear_b200.cheapest.gpu != "b200"


def test_more_demand_never_costs_less():
    small = recommend(LLAMA_8B, DEMAND, offers(), KV8, {}, formats=("fp8",)).cheapest
    big = recommend(LLAMA_8B, Demand(DEMAND.lengths, 400.0, DEMAND.slo), offers(), KV8, {}, formats=("fp8",)).cheapest
    assert big.usd_per_hour > small.usd_per_hour and big.gpus > small.gpus


def test_formats_follow_the_measured_accuracy():
    result = recommend(LLAMA_8B, DEMAND, offers(), KV8, {"nvfp4": "FAIL", "fp8": "PASS"},
                       formats=("bf16", "fp8", "nvfp4", "mxfp4"))
    labels = {o.format: o.accuracy for o in result.options}
    assert "nvfp4" not in labels and labels["fp8"] == PASSED and labels["mxfp4"] == NOT_MEASURED
    assert labels["bf16"].startswith("baseline")
    assert any(r.format == "nvfp4" and "accuracy gate FAIL" in r.why for r in result.rejected)
    inconclusive = recommend(LLAMA_8B, DEMAND, offers(), KV8, {"fp8": "INCONCLUSIVE"}, formats=("fp8",))
    assert not inconclusive.options  # offered only where the gate passed


def test_an_impossible_slo_leaves_no_option_and_says_why():
    result = recommend(LLAMA_8B, Demand(DEMAND.lengths, 1.0, Slo(2000, 0.01)), offers(), KV8, {}, formats=("fp8",))
    assert not result.options and result.cheapest is None
    assert result.rejected and all("no request rate meets" in r.why for r in result.rejected)


def test_a_kv_cache_the_gpu_cannot_hold_is_refused_per_gpu():
    result = recommend(LLAMA_8B, DEMAND, offers(), KV_CACHE_DTYPES["nvfp4"], {}, formats=("fp8",))
    assert {o.gpu for o in result.options} == {"b200"}
    assert {r.gpu for r in result.rejected if "nvfp4 KV cache needs compute capability 10.0" in r.why} == {"h100", "h200"}


def test_attention_dp_pays_for_gathering_the_ranks_tokens():
    """Under attention DP every rank's tokens reach the experts (all-gather, reduce-scatter): splitting
    over more GPUs never serves more per GPU than one GPU alone (issue 25 review: without the gather
    cost, TP 2/4/8 with attention DP scaled perfectly)."""
    qwen = json.loads((ROOT / "recipes/qwen3-30b-a3b/config.json").read_text())
    result = recommend(qwen, Demand(((1024, 256),), 40.0, Slo(2000, 50)), offers()[1:2], KV8, {}, formats=("fp8",))
    per_gpu = {o.parallelism: o.replica_rate_per_s / o.gpus_per_replica for o in result.options}
    for split in ("TP 2, attention DP", "TP 4, attention DP", "TP 8, attention DP"):
        assert per_gpu[split] < per_gpu["TP 1"], (split, per_gpu)


def test_an_moe_model_is_searched_over_its_expert_splits():
    qwen = json.loads((ROOT / "recipes/qwen3-30b-a3b/config.json").read_text())
    result = recommend(qwen, Demand(((1024, 256),), 20.0, Slo(2000, 50)), offers()[2:], KV8, {}, formats=("nvfp4",))
    splits = {o.parallelism for o in result.options}
    assert {"TP 1", "TP 2, EP 2, attention DP"} <= splits


def test_a_pre_quantized_checkpoint_is_offered_as_its_publisher_ships_it():
    """gpt-oss ships MXFP4 experts beside BF16 attention (config.json quantization_config): offered as
    published, it fits one H200 (about 65 GB of weights), where its BF16 form (about 234 GB) needs four;
    a published precision forge cannot price (DeepSeek-R1's block FP8) is rejected with the reason, not
    priced as BF16."""
    gpt_oss = json.loads((ROOT / "recipes/gpt-oss-120b/config.json").read_text())
    demand = Demand(((1000, 200),), 2.0, Slo(2000, 50))
    result = recommend(gpt_oss, demand, offers()[1:2], KV8, {}, formats=("bf16", AS_PUBLISHED), cheapest_only=True)
    assert result.cheapest.format == AS_PUBLISHED and result.cheapest.parallelism == "TP 1"
    assert result.cheapest.accuracy == PUBLISHERS
    bf16_tp1 = [r.why for r in result.rejected if r.format == "bf16" and r.parallelism == "TP 1"]
    assert bf16_tp1 and "exceed" in bf16_tp1[0]
    r1 = json.loads((ROOT / "tests/data/configs/deepseek-r1.json").read_text())
    refused = recommend(r1, demand, offers()[2:], KV8, {}, formats=(AS_PUBLISHED,))
    assert not refused.options
    why = ("a checkpoint published as 'fp8' is not a precision forge prices (it prices MXFP4-expert MoE checkpoints, "
           "as gpt-oss ships, and the formats it quantizes to itself).")
    assert [r.why for r in refused.rejected] == [why]


def test_verdicts_come_from_the_committed_metrics(tmp_path):
    model = tmp_path / "recipes" / "smollm2-135m-instruct"
    shutil.copytree(ROOT / "recipes/smollm2-135m-instruct", model)
    metrics = tmp_path / "metrics"
    (metrics / "evaluate").mkdir(parents=True)
    (metrics / "serve").mkdir()
    (metrics / "evaluate" / "smollm2-135m-instruct-nvfp4.json").write_text('{"gate_pass": 0, "gates_failed": 2}')
    (metrics / "evaluate" / "smollm2-135m-instruct-fp8.json").write_text('{"gate_pass": 1, "gates_failed": 0}')
    # The served verdict decides where an engine served the bundle (GATE_RULE).
    (metrics / "serve" / "smollm2-135m-instruct-fp8-h200.json").write_text('{"gate_pass": 0, "gates_failed": 0, "served": 1}')
    verdicts = model_verdicts(model)  # the metrics beside the recipes' root, wherever forge runs from
    assert verdicts["nvfp4"].verdict == "FAIL" and verdicts["fp8"].verdict == "INCONCLUSIVE"
    # A variant that passed makes its format pass; only recipes with the asked KV-cache dtype count.
    (metrics / "evaluate" / "smollm2-135m-instruct-fp8-kv-bf16.json").write_text('{"gate_pass": 1, "gates_failed": 0}')
    assert model_verdicts(model, metrics)["fp8"].verdict == "PASS"
    assert model_verdicts(model, metrics, kv_dtype="fp8")["fp8"].verdict == "INCONCLUSIVE"
    assert set(model_verdicts(model, metrics, kv_dtype="auto")) == {"fp8"}
    assert verdicts["fp8"].evidence.endswith("serve/smollm2-135m-instruct-fp8-h200.json")
    (metrics / "evaluate" / "smollm2-135m-instruct-nvfp4.json").write_text("{not json")
    with pytest.raises(Exception, match="smollm2-135m-instruct-nvfp4.json.*cannot read the metrics file"):
        model_verdicts(model, metrics)


def test_cli_prints_the_cheapest_and_writes_the_plot(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    plot = tmp_path / "pareto.png"
    argv = ["recommend", "recipes/llama-3-1-8b-instruct", "--input-len", "1000", "--output-len", "200", "--rate", "40",
            "--ttft-ms", "2000", "--tpot-ms", "50", "--gpu", "h200", "--gpu", "b200", "--price", "b200=4.0",
            "--format", "fp8", "--plot", str(plot)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "(all figures predicted)" in out and "cheapest:" in out and "$/Mtok" in out
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert cli.main([*argv[:-2], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["predicted"] is True and data["prices"]["b200"] == {"usd_per_gpu_hour": 4.0, "source": "--price"}
    assert data["cheapest"] == data["options"][0]
    assert data["prices"]["h200"]["source"].startswith("catalog default")


@pytest.mark.parametrize("extra,message", [
    (["--price", "h200=free"], "--price: 'h200=free' is not GPU=USD"),
    (["--price", "h200=nan"], "--price: 'h200=nan' is not GPU=USD"),
    (["--gpu", "h100", "--price", "h200=3"], "--price: h200 is priced but not a candidate"),
    (["--gpu", "a100"], "--gpu: unknown GPU ['a100']"),
    (["--model-config", "recipes/llama-3-1-8b-instruct/config.json"], "give one model"),
    (["--rate", "nan"], "--rate: nan is not a positive finite number"),
    (["--percentile", "120"], "--percentile: 120.0 is outside (0, 100]"),
    (["--top", "0"], "--top: 0 rows"),
])
def test_cli_refuses_bad_input_in_one_line(capsys, monkeypatch, extra, message):
    monkeypatch.chdir(ROOT)
    argv = ["recommend", "recipes/llama-3-1-8b-instruct", "--input-len", "100", "--output-len", "20", "--rate", "1",
            "--ttft-ms", "1000", "--tpot-ms", "50", *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_missing_lengths(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    base = ["recommend", "recipes/llama-3-1-8b-instruct", "--rate", "1", "--ttft-ms", "1000", "--tpot-ms", "50"]
    assert cli.main(base) == 2
    assert "no request lengths" in capsys.readouterr().err
    bad = tmp_path / "lengths.csv"
    bad.write_text("isl,osl\n100,x\n")
    assert cli.main([*base, "--lengths", str(bad)]) == 2
    assert f"{bad}: cannot read request lengths" in capsys.readouterr().err
