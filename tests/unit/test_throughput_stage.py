"""The throughput stage: predicted numbers always (labelled, with their inputs), a measurement only
on the target GPU with trtllm-bench (faked here), refusals of stale or foreign bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.errors import ForgeError, StageInputError
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.core.local_gpu import LocalGpu
from pipeline.handoff.manifest import build_manifest, read_manifest, write_manifest
from pipeline.measure import bench as perf
from pipeline.measure.bench_io import parse_bench_report
from pipeline.measure.power import PowerReading
from pipeline.measure.probe import ProbeResult, load_ceilings, save_probe
from pipeline.planning.targets import plan_target
from pipeline.recipe.loading import load_recipe
from pipeline.serving.trtllm import LocalRuntime
from pipeline.stages import build, throughput

ROOT = Path(__file__).resolve().parents[2]
CATALOG = DEFAULT_CATALOG
FP8 = Path("recipes/smollm2-135m-instruct/fp8.yaml")
H200 = LocalGpu(name="NVIDIA H200", compute_capability="9.0", memory_bytes=141_000_000_000, count=1, sku="h200")


@pytest.fixture(autouse=True)
def _cpu_machine(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(build, "detect_runtime", lambda: LocalRuntime(None, None, None))
    monkeypatch.setattr(throughput, "detect_local_gpu", lambda known: None)
    monkeypatch.setattr(throughput.shutil, "which", lambda name: None)


@pytest.fixture(scope="module")
def bundle(tiny_llama, tmp_path_factory):
    """A real `forge build` bundle of the FP8 recipe for h200, from a fabricated calibrate output."""
    root = tmp_path_factory.mktemp("tput")
    quantized = root / "quantized"
    ckpt = quantized / "checkpoint"
    tiny_llama.tokenizer.save_pretrained(ckpt)
    quantization = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": quantization}))
    save_file({"w": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, ckpt / "model.safetensors")
    (quantized / "quant_state.pt").write_bytes(b"state")
    recipe = load_recipe(ROOT / FP8)
    write_manifest(quantized, build_manifest("calibrate", recipe.id, quantized, {},
                                             recipe=recipe.provenance("model", "quant", "calibration")))
    out = root / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setattr(build, "detect_runtime", lambda: LocalRuntime(None, None, None))
        build.main(FP8, "h200", quantized, out, root / "build.json", CATALOG, "never")
    return out


def plan_now(ceilings=None):
    return plan_target(load_recipe(FP8), "h200", load_catalog(CATALOG), ceilings)


def test_cpu_machine_gets_labelled_predictions_and_no_measurement(bundle, tmp_path):
    metrics_path = tmp_path / "m.json"
    assert throughput.main(FP8, "h200", bundle, metrics_path, measured_dir=tmp_path / "no-probes",
                           out_dir=tmp_path / "out") == 0
    m = json.loads((tmp_path / "out" / "throughput.json").read_text())
    # The DVC metrics file: the throughput KPIs only (pipeline/handoff/kpis.py); measured ones only when measured.
    assert json.loads(metrics_path.read_text()) == {"predicted_tok_s": round(m["predicted_output_tok_s"], 6),
                                                    "usd_per_mtok": round(m["predicted_usd_per_mtok"], 6),
                                                    "ceiling_tok_s": round(m["ceiling_decode_tok_s_max_batch"], 6)}
    plan = plan_now()
    tok_s = plan.throughput["predicted_output_tok_s"]  # the throughput model's run, not the ceiling
    assert tok_s < plan.decode_tok_s_max_batch
    assert (m["target"], m["format"], m["gpu"], m["tp"]) == ("smollm2-135m-instruct-fp8-h200", "fp8", "h200", 1)
    assert m["ceilings_source"] == "datasheet"
    assert m["predicted_inputs"]["memory_bandwidth_bytes_per_s"] == 4.8e12
    assert m["predicted_inputs"]["peak_flops"] == 1979e12  # fp8 GEMMs on an H200
    assert (m["predicted_inputs"]["max_input_len"], m["predicted_inputs"]["max_output_len"]) == (2048, 512)
    assert m["predicted_output_tok_s"] == tok_s and m["predicted_output_tok_s_per_gpu"] == tok_s  # TP 1
    assert m["predicted_max_batch_size"] == plan.roofline["decode_batch"]
    assert m["predicted_max_num_tokens"] == plan.inputs["max_num_tokens"]
    assert m["predicted_ttft_ms"] > 0 and m["predicted_tpot_ms"] > 0
    assert m["ceiling_decode_tok_s_max_batch"] == plan.decode_tok_s_max_batch  # the ceiling stays, named so
    assert m["ceiling_is"].startswith("roofline upper bounds") and "never priced" in m["ceiling_is"]
    assert not [k for k in m if k.startswith("predicted_decode") or k == "predicted_prefill_tok_s"]
    assert m["ceiling_decode_batch"] == plan.roofline["decode_batch"] == 256  # the recipe's concurrency
    assert m["ceiling_prefill_tok_s"] == plan.roofline["prefill_tok_s"]
    assert m["predicted_latency_includes"].startswith("queue wait: predicted_output_tok_s_per_user and predicted_ttft_ms")
    assert m["predicted_power_source"] == "tdp"
    assert m["predicted_joules_per_token"] == pytest.approx(700 / tok_s)
    assert m["predicted_usd_per_mtok"] == pytest.approx(3.50 / (tok_s * 3600) * 1e6)
    assert m["price_source"] == f"{FP8}: targets.h200.price_per_gpu_hour_usd"
    assert m["measured"] is None
    assert m["measured_reason"] == ("not run: this machine lacks a NVIDIA H200 SXM 141GB (no NVIDIA GPU visible "
                                    "through NVML) and trtllm-bench on PATH (TensorRT-LLM)")
    assert not any(k.startswith("measured_") and k != "measured_reason" for k in m)


def test_forge_plan_prices_the_same_run_the_stage_does(bundle, tmp_path, capsys):
    """One price basis, the prediction (issue 26: `forge plan` priced $/Mtok at the roofline ceiling,
    $0.121 for 70B FP8 on H200, where the report priced the predicted run, $0.298)."""
    from pipeline import cli
    from pipeline.planning.plan_view import significant

    throughput.main(FP8, "h200", bundle, tmp_path / "m.json", out_dir=tmp_path / "out", measured_dir=tmp_path)
    m = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert cli.main(["plan", str(FP8), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["usd_per_mtok"] == pytest.approx(m["predicted_usd_per_mtok"], rel=1e-12)
    assert planned["joules_per_token"] == pytest.approx(m["predicted_joules_per_token"], rel=1e-12)
    assert planned["usd_per_mtok"] > 3.50 / (planned["decode_tok_s_max_batch"] * 3600) * 1e6  # not the ceiling's
    assert "usd_per_mtok" in planned["predicted"] and "decode_tok_s_max_batch" not in planned["predicted"]
    assert cli.main(["plan", str(FP8)]) == 0
    rows = capsys.readouterr().out
    [price] = [line for line in rows.splitlines() if "$ per M output tokens" in line]
    assert "(predicted)" in price and price.rstrip(" │").endswith("$" + significant(m["predicted_usd_per_mtok"], 3))
    assert "at the ceiling" not in rows and "per user / TTFT, both incl. queue wait / TPOT (predicted)" in rows


def test_price_on_the_command_line_wins(bundle, tmp_path):
    throughput.main(FP8, "h200", bundle, tmp_path / "m.json", out_dir=tmp_path / "out", price=2.0, measured_dir=tmp_path)
    m = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert (m["price_per_gpu_hour_usd"], m["price_source"]) == (2.0, "--price")
    assert m["predicted_usd_per_mtok"] == pytest.approx(2.0 / (m["predicted_output_tok_s"] * 3600) * 1e6)


def test_probe_of_the_gpu_gives_measured_ceilings(bundle, tmp_path):
    probe = ProbeResult(gpu_name="NVIDIA H200", compute_capability="9.0", copy_bandwidth_bytes_per_s=4.3e12,
                        bf16_tflops=790.0, fp8_tflops=1300.0, method={}, torch_version="2.13.0", cuda_version="13.0",
                        measured_at="2026-11-01T00:00:00+00:00")
    save_probe(probe, load_catalog(CATALOG), tmp_path / "measured")
    throughput.main(FP8, "h200", bundle, tmp_path / "m.json", out_dir=tmp_path / "out", measured_dir=tmp_path / "measured")
    m = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert m["ceilings_source"] == "measured"
    assert (m["predicted_inputs"]["memory_bandwidth_bytes_per_s"], m["predicted_inputs"]["peak_flops"]) == (4.3e12, 1.3e15)
    measured_plan = plan_now(load_ceilings("h200", "fp8", tmp_path / "measured"))
    assert m["ceiling_decode_tok_s_max_batch"] == pytest.approx(measured_plan.decode_tok_s_max_batch)
    # The probe's rates replace the datasheet's in the predicted run too (at the same runtime limits).
    assert m["predicted_hardware_source"] == "measured"
    assert m["predicted_output_tok_s"] == pytest.approx(measured_plan.throughput["predicted_output_tok_s"])
    assert m["predicted_output_tok_s"] < plan_now().throughput["predicted_output_tok_s"]  # slower probe, fewer tok/s
    assert m["predicted_max_batch_size"] == plan_now().roofline["decode_batch"]


def test_require_on_a_cpu_machine_is_refused_before_writing(bundle, tmp_path):
    with pytest.raises(ForgeError) as err:
        throughput.main(FP8, "h200", bundle, tmp_path / "m.json", run_mode="require")
    assert str(err.value).startswith("h200: --run require: a measurement is required, but this machine lacks a NVIDIA "
                                     "H200 SXM 141GB (no NVIDIA GPU visible through NVML) and trtllm-bench on PATH")
    assert not (tmp_path / "m.json").exists()


def test_another_sku_of_the_same_compute_capability_is_not_measured(monkeypatch, bundle, tmp_path):
    h100 = LocalGpu(name="NVIDIA H100 80GB HBM3", compute_capability="9.0", memory_bytes=80_000_000_000, sku="h100")
    monkeypatch.setattr(throughput, "detect_local_gpu", lambda known: h100)
    monkeypatch.setattr(throughput.shutil, "which", lambda name: "/usr/bin/trtllm-bench")
    throughput.main(FP8, "h200", bundle, tmp_path / "m.json", out_dir=tmp_path / "out")
    m = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert m["measured"] is None
    assert m["measured_reason"] == "not run: this machine lacks a NVIDIA H200 SXM 141GB (this machine has NVIDIA H100 80GB HBM3)"


def _percentiles(scale: float) -> dict[str, float]:
    return {k: scale * (i + 1) for i, k in enumerate(("minimum", "maximum", "average", "p50", "p90", "p95", "p99"))}


def bench_report(output_tok_s: float) -> dict:
    """The sections of a trtllm-bench --report_json that pipeline.measure.bench_io.parse_bench_report reads."""
    return {
        "world_info": {"tp_size": 1, "world_size": 1},
        "request_info": {"num_requests": 3, "avg_num_concurrent_requests": 3.0, "avg_input_length": 2048.0,
                         "avg_output_length": 512.0},
        "performance": {"total_latency_ms": 1000.0, "request_throughput_req_s": 3.0,
                        "system_output_throughput_tok_s": output_tok_s, "system_total_throughput_tok_s": 5 * output_tok_s,
                        "output_throughput_per_user_tok_s": output_tok_s / 3, "output_throughput_per_gpu_tok_s": output_tok_s,
                        "request_latency_percentiles_ms": _percentiles(100.0)},
        "streaming_metrics": {"token_output_speed_tok_s": 500.0, "avg_ttft_ms": 20.0, "avg_tpot_ms": 2.0,
                              "ttft_percentiles": _percentiles(10.0), "tpot_percentiles": _percentiles(1.0)},
    }


def test_measurement_on_the_target_gpu(monkeypatch, bundle, tmp_path):
    monkeypatch.setattr(throughput, "detect_local_gpu", lambda known: H200)
    monkeypatch.setattr(throughput.shutil, "which", lambda name: f"/usr/bin/{name}")
    runs = []

    def fake_run_bench(command):
        runs.append(command)
        tok_s = {"throughput": 40_000.0, "latency": 900.0}[command.mode]
        power = PowerReading(mean_watts=450.0, samples=20, duration_s=2.0, devices=(0,))
        return perf.BenchRun(command.mode, command.argv, parse_bench_report(bench_report(tok_s)), power, 2.0)

    monkeypatch.setattr(perf, "run_bench", fake_run_bench)
    throughput.main(FP8, "h200", bundle, tmp_path / "m.json", out_dir=tmp_path / "out", num_requests=3, workdir=tmp_path / "work")
    m = json.loads((tmp_path / "out" / "throughput.json").read_text())
    plan = plan_now()
    assert [c.mode for c in runs] == ["throughput", "latency"]
    argv = runs[0].argv
    assert argv[argv.index("--model_path") + 1] == str(bundle / "checkpoint")
    assert argv[argv.index("--concurrency") + 1] == "256" and "--streaming" in argv
    assert argv[argv.index("--extra_llm_api_options") + 1] == str(bundle / "llm_api_options.yaml")
    lines = [json.loads(line) for line in (tmp_path / "work" / "bench_dataset.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and {len(x["input_ids"]) for x in lines} == {2048} and {x["output_tokens"] for x in lines} == {512}
    assert m["measured_output_tok_s"] == 40_000.0
    assert m["measured_over_predicted"] == pytest.approx(40_000.0 / plan.throughput["predicted_output_tok_s"])
    assert m["measured_latency_over_predicted_batch1"] == pytest.approx(900.0 / plan.decode_tok_s_batch1)
    assert (m["measured_ttft_ms_p50"], m["measured_ttft_ms_p99"], m["measured_tpot_ms_p90"]) == (40.0, 70.0, 5.0)
    assert m["measured_power_source"] == "nvml"
    assert m["measured_joules_per_token"] == pytest.approx(450.0 / 40_000.0)
    assert m["measured_usd_per_mtok"] == pytest.approx(3.50 / (40_000.0 * 3600) * 1e6)
    assert m["predicted_joules_per_token"] == pytest.approx(700 / plan.throughput["predicted_output_tok_s"])  # labelled
    assert m["measured"]["dataset"]["num_requests"] == 3 and "measured_reason" not in m


def test_stale_bundle_is_refused(bundle, tmp_path):
    import shutil

    stale = tmp_path / "bundle"
    shutil.copytree(bundle, stale)
    manifest = read_manifest(stale, "build")
    manifest["details"]["plan"]["kv_capacity_tokens"] = 1
    write_manifest(stale, manifest)
    with pytest.raises(StageInputError) as err:
        throughput.main(FP8, "h200", stale, tmp_path / "m.json")
    assert "the bundle was sized by another plan than recipes/smollm2-135m-instruct/fp8.yaml gives now: " \
           f"kv_capacity_tokens 1 (bundle) vs {plan_now().kv_capacity_tokens} (now)." in str(err.value)
    assert str(err.value).endswith("Fix: re-run its build: dvc repro build@smollm2-135m-instruct-fp8-h200")


def test_bundle_of_another_recipe_is_refused(bundle, tmp_path):
    with pytest.raises(StageInputError, match=r"is the bundle of 'smollm2-135m-instruct-fp8' for 'h200', not of "
                                              r"'smollm2-135m-instruct-nvfp4' for 'b200'\. Fix: pass --bundle "
                                              r"data/bundles/smollm2-135m-instruct-nvfp4-b200\."):
        throughput.main(Path("recipes/smollm2-135m-instruct/nvfp4.yaml"), "b200", bundle, tmp_path / "m.json")


def test_unknown_target_is_refused(bundle, tmp_path):
    with pytest.raises(ForgeError, match=r"fp8.yaml: targets: no target 'b200' in this recipe\. Fix: pass --gpu h200, or add a targets.b200 section\."):
        throughput.main(FP8, "b200", bundle, tmp_path / "m.json")
