"""The throughput model (pipeline/sizing/perfmodel.py): its physics behaves monotonically, its fit meets the
calibration bound (computed from the rows, not copied), and `forge plan --json` carries it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.core.errors import RecipeError
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.core.gpus import load_catalog
from pipeline.sizing.iteration import CONSTANTS_FILE, Efficiency, Hardware, step_model
from pipeline.sizing.perfmodel import Workload, predict, simulate
from pipeline.sizing.published import CALIBRATION_ROWS, MOE_CALIBRATION_ROWS, errors, load_rows, summary
from pipeline.sizing.shapes import ModelShape, count_params

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")
LLAMA_8B = json.loads((ROOT / "recipes/llama-3-1-8b-instruct/config.json").read_text())
LLAMA_70B = json.loads((ROOT / "recipes/llama-3-3-70b-instruct/config.json").read_text())
FP8, NVFP4, KV8 = FORMATS["fp8"], FORMATS["nvfp4"], KV_CACHE_DTYPES["fp8"]
EFF = Efficiency.load()


def tok_s(config, fmt, gpu, work, tp=1, **kw):
    return predict(config, fmt, KV8, gpu, tp, work, eff=EFF, **kw).predicted_output_tok_s


@pytest.mark.parametrize("isl,osl", [(128, 2048), (1000, 1000), (2048, 128)])
def test_more_bandwidth_never_lowers_throughput(isl, osl):
    work = Workload(isl, osl, 1000)
    h200 = CATALOG["h200"]
    rates = [tok_s(LLAMA_8B, FP8, h200.model_copy(update={"memory_bandwidth_bytes_per_s": bw}), work)
             for bw in (2.4e12, 3.35e12, 4.8e12, 8e12)]
    assert rates == sorted(rates)
    assert rates[-1] > rates[0]


def test_longer_input_lowers_output_throughput_at_fixed_output():
    rates = [tok_s(LLAMA_8B, FP8, CATALOG["h200"], Workload(isl, 500, 1000)) for isl in (128, 500, 1000, 2048, 5000)]
    assert rates == sorted(rates, reverse=True)
    assert rates[0] > 2 * rates[-1]  # prefill of 5000 tokens per request dominates


def test_fp4_on_b200_beats_fp8_on_h200_for_70b():
    work = Workload.published(1000, 1000)
    b200 = tok_s(LLAMA_70B, NVFP4, CATALOG["b200"], work)
    h200 = tok_s(LLAMA_70B, FP8, CATALOG["h200"], work)
    assert b200 > 1.5 * h200


@pytest.mark.parametrize("config,gpu", [(LLAMA_8B, "h100"), (LLAMA_8B, "h200"), (LLAMA_70B, "h200")])
def test_tp2_per_gpu_throughput_is_below_tp1_when_tp1_fits(config, gpu):
    work = Workload.published(1000, 1000)
    one = predict(config, FP8, KV8, CATALOG[gpu], 1, work, eff=EFF)
    two = predict(config, FP8, KV8, CATALOG[gpu], 2, work, eff=EFF)
    assert two.predicted_output_tok_s_per_gpu < one.predicted_output_tok_s_per_gpu
    assert two.predicted_output_tok_s_per_gpu == pytest.approx(two.predicted_output_tok_s / 2)


@pytest.mark.parametrize("path,key,rows,median,worst", [(CALIBRATION_ROWS, "dense", 22, 0.10, 0.30),
                                                         (MOE_CALIBRATION_ROWS, "moe", 6, 0.20, 0.40)])
def test_calibration_error_is_within_the_acceptance_bound(path, key, rows, median, worst):
    result = errors(load_rows(path), CATALOG, EFF)
    stats = summary([e for _, _, e in result])
    assert stats["rows"] == rows
    assert stats["median_abs_error"] <= median
    assert stats["worst_abs_error"] <= worst
    # The constants file records the fit that produced it; it must still describe these constants.
    recorded = json.loads(CONSTANTS_FILE.read_text())["fit"][key]
    assert recorded["median_abs_error"] == pytest.approx(stats["median_abs_error"], abs=1e-4)
    assert recorded["worst_abs_error"] == pytest.approx(stats["worst_abs_error"], abs=1e-4)


def test_constants_are_physical_shares_and_times():
    for share in (EFF.gemm, EFF.gemm_fp4, EFF.hbm, EFF.attention, EFF.moe_gemm):
        assert 0 < share <= 1
    assert EFF.step_overhead_s >= 0 and EFF.seq_overhead_s >= 0 and EFF.moe_layer_overhead_s >= 0
    assert EFF.roofline_p >= 1  # between the sum of the two limits and their max


def test_a_prediction_is_fast_and_self_consistent():
    work = Workload.published(128, 128)  # the largest published dataset: 30,000 requests
    start = time.perf_counter()
    p = predict(LLAMA_8B, FP8, KV8, CATALOG["h200"], 1, work, eff=EFF, limits=(2048, 8192))
    assert time.perf_counter() - start < 1.0
    assert p.concurrency <= p.max_batch_size == 2048 and p.max_num_tokens == 8192
    # Little's law over the run: tokens/s = in-flight requests x per-request speed, at most.
    assert p.predicted_output_tok_s <= p.concurrency * 1e3 / p.predicted_tpot_ms * 1.01
    assert p.predicted_ttft_ms > 0 and p.bound_prefill != "-"


def test_single_request_decodes_at_one_token_per_step():
    shape = ModelShape.from_hf_config(LLAMA_8B)
    step = step_model(shape, count_params(shape), FP8, KV8, Hardware.of(CATALOG["h200"], FP8), 1, EFF)
    p = simulate(step, Workload(100, 50, 1), 1, 8192, 10**6)
    assert p.iterations == 50  # one prefill iteration (first token) + 49 decode iterations
    assert p.concurrency == 1
    assert p.predicted_output_tok_s == pytest.approx(50 / (p.predicted_ttft_ms / 1e3 + 49 * p.predicted_tpot_ms / 1e3))


def test_the_memoized_iteration_prices_as_the_formula_does():
    """StepModel memoizes the terms that depend on the batch's token and request counts; an iteration's
    price must be the unmemoized formula's, bit for bit, whatever came before (an MoE, so the expert
    terms are in it too)."""
    from pipeline.sizing.iteration import roof

    config = json.loads((ROOT / "recipes/qwen3-30b-a3b/config.json").read_text())
    shape = ModelShape.from_hf_config(config)
    step = step_model(shape, count_params(shape), FP8, KV8, Hardware.of(CATALOG["h200"], FP8), 1, EFF)
    gemm, weights, kv_tok, attn, ring, fixed_ar, per_seq, per_step, expert_gemm, hbm, a2a, fixed_a2a = step.seconds_per()
    e, p = step.experts, EFF.roofline_p
    cases = [(0, 0.0, 512, 512 * 513 / 2, 1), (64, 64 * 1500.0, 0, 0, 0), (64, 64 * 1500.0, 448, 448 * 300.0, 2),
             (64, 70_000.0, 0, 0, 0), (1, 1000.0, 0, 0, 0)]
    for decode, ctx, tokens, work, seqs in cases + cases:  # the second pass reads the memo
        t, s = decode + tokens, decode + seqs
        compute = (t * step.linear_flops_per_token + s * step.head_flops_per_seq) * gemm
        experts = roof(t * e.top_k / e.ep * e.flops_per_slot * expert_gemm, e.touched(t) * e.bytes_per_expert * hbm,
                       p) + e.moe_layers * EFF.moe_layer_overhead_s
        want = (roof(compute, weights, p) + experts + ctx * kv_tok + work * attn + (fixed_ar + t * ring)
                + (t * a2a + fixed_a2a) + (per_step + per_seq * s))
        assert step.time(decode, ctx, tokens, work, seqs)[0] == want
        assert step.seconds(decode, ctx, tokens, work, seqs) == want


def test_no_request_fits_is_one_clear_error():
    shape = ModelShape.from_hf_config(LLAMA_70B)
    step = step_model(shape, count_params(shape), FP8, KV8, Hardware.of(CATALOG["h200"], FP8), 1, EFF)
    with pytest.raises(RecipeError, match="holds no request of 20000\\+2000 tokens"):
        simulate(step, Workload(20000, 2000, 10), 64, 8192, 1000)


def test_bad_constants_file_names_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text('{"constants": {"gemm": 0.5}}')
    with pytest.raises(RecipeError) as err:
        Efficiency.load(bad)
    assert str(bad) in str(err.value) and "bench/fit_perfmodel.py" in str(err.value)


def test_plan_json_carries_the_prediction_for_the_adhoc_form(capsys):
    argv = ["plan", "--model-config", str(ROOT / "recipes/llama-3-1-8b-instruct/config.json"), "--format", "fp8",
            "--gpu", "h200", "--kv-dtype", "fp8", "--input-len", "1000", "--output-len", "1000", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    expected = predict(LLAMA_8B, FP8, KV8, CATALOG["h200"], 1, Workload.published(1000, 1000), token_cap=8192)
    assert out["predicted_output_tok_s"] == pytest.approx(expected.predicted_output_tok_s)
    assert out["throughput"]["max_batch_size"] == out["decode_batch"] == expected.max_batch_size
    assert out["inputs"]["max_num_tokens"] == out["throughput"]["max_num_tokens"]
    assert out["roofline_is"].startswith("ceiling") and out["decode_tok_s_max_batch"] > out["predicted_output_tok_s"]


def test_plan_json_carries_the_prediction_for_recipes(capsys):
    assert cli.main(["plan", str(ROOT / "recipes/llama-3-3-70b-instruct/fp8.yaml"), "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    h100, h200 = plans["llama-3-3-70b-instruct-fp8-h100"], plans["llama-3-3-70b-instruct-fp8-h200"]
    assert h100["inputs"]["tp"] == 2
    assert h100["predicted_output_tok_s_per_gpu"] == pytest.approx(h100["predicted_output_tok_s"] / 2)
    for p in (h100, h200):
        assert 0 < p["predicted_output_tok_s"] < p["decode_tok_s_max_batch"]
        assert p["throughput"]["hardware_source"] == "datasheet"


def test_plan_table_shows_the_prediction_beside_the_ceiling(capsys):
    assert cli.main(["plan", str(ROOT / "recipes/llama-3-3-70b-instruct/fp8.yaml")]) == 0
    out = capsys.readouterr().out
    assert "output tok/s, ISL/OSL 1024/1024 (predicted)" in out
    assert "decode tok/s, batch 205 (ceiling)" in out  # the H200 target: KV admits 205 requests of 1024+1024
    assert "ceiling = decode/prefill roofline" in out
