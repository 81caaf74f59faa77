"""pipeline/measure/bench.py and `forge probe` on a CPU machine: datasets, command lines, report parsing,
energy/cost arithmetic, probe files and ceilings, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.errors import ForgeError, RecipeError, StageInputError
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.measure.bench import BenchRun, NotRun, measured_summary, run_bench
from pipeline.measure.bench_io import bench_commands, make_bench_dataset, parse_bench_report
from pipeline.measure.power import PowerSampler, energy_and_cost, measured_vs_predicted
from pipeline.measure.probe import (
    ProbeResult,
    copy_bytes_moved,
    gemm_flops,
    load_ceilings,
    match_gpu_key,
    median_rate,
    probe_gpu,
    save_probe,
)

CATALOG = load_catalog(DEFAULT_CATALOG)


# ----------------------------------------------------------------------------------- dataset


class FakeTokenizer:
    """What make_bench_dataset reads from a HF tokenizer: len() and all_special_ids."""

    def __init__(self, size: int, special: list[int]):
        self.size, self.all_special_ids = size, special

    def __len__(self) -> int:
        return self.size


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dataset_lines_follow_trtllm_bench_schema(tmp_path):
    ds = make_bench_dataset(FakeTokenizer(50, special=[0, 1, 2]), 7, 33, 17, seed=3, path=tmp_path / "ds.jsonl")
    rows = _lines(ds.path)
    assert len(rows) == 7 == ds.num_requests
    for i, row in enumerate(rows):
        # tensorrt_llm/bench/utils/data.py reads task_id, input_ids (or prompt), output_tokens.
        assert set(row) == {"task_id", "input_ids", "output_tokens"}
        assert row["task_id"] == i
        assert row["output_tokens"] == 17
        assert len(row["input_ids"]) == 33
        assert all(3 <= t < 50 for t in row["input_ids"])  # no special tokens, inside the vocabulary
    assert ds.vocab_size == 50
    assert len({tuple(r["input_ids"]) for r in rows}) == 7  # prompts differ from each other


def test_dataset_is_deterministic_per_seed(tmp_path):
    a = make_bench_dataset(1000, 4, 64, 8, seed=1, path=tmp_path / "a.jsonl")
    b = make_bench_dataset(1000, 4, 64, 8, seed=1, path=tmp_path / "b.jsonl")
    c = make_bench_dataset(1000, 4, 64, 8, seed=2, path=tmp_path / "c.jsonl")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sha256 == b.sha256 != c.sha256
    assert a.path.read_bytes() != c.path.read_bytes()


def test_dataset_refuses_bad_lengths(tmp_path):
    with pytest.raises(ForgeError, match=r"input_len must be >= 1, got 0\. Fix: pass a positive input_len\."):
        make_bench_dataset(1000, 4, 0, 8, seed=1, path=tmp_path / "x.jsonl")


# ------------------------------------------------------------------------------ command lines


def test_bench_commands_exact_argv(tmp_path):
    throughput, latency = bench_commands(
        "meta-llama/Llama-3.1-8B-Instruct", Path("/b/bundle"), Path("/b/ds.jsonl"), Path("/b/extra.yaml"),
        tp=2, report_dir=Path("/b/reports"), workspace=Path("/b/ws"), concurrency=64, num_requests=100,
    )
    top = ["trtllm-bench", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--model_path", "/b/bundle",
           "--workspace", "/b/ws"]
    assert list(throughput.argv) == top + [
        "throughput", "--dataset", "/b/ds.jsonl", "--backend", "pytorch", "--extra_llm_api_options", "/b/extra.yaml",
        "--tp", "2", "--warmup", "2", "--num_requests", "100", "--streaming", "--concurrency", "64",
        "--report_json", "/b/reports/trtllm_bench_throughput.json",
    ]
    assert list(latency.argv) == top + [
        "latency", "--dataset", "/b/ds.jsonl", "--backend", "pytorch", "--extra_llm_api_options", "/b/extra.yaml",
        "--tp", "2", "--warmup", "2", "--num_requests", "100",
        "--report_json", "/b/reports/trtllm_bench_latency.json",
    ]
    assert (throughput.mode, latency.mode, throughput.tp) == ("throughput", "latency", 2)


def test_bench_commands_for_latency_without_options_flag():
    _, latency = bench_commands("m", Path("d"), Path("ds"), Path("o.yaml"), 1, Path("r"), Path("w"),
                                     latency_extra_options=False)
    assert "--extra_llm_api_options" not in latency.argv
    assert "--concurrency" not in latency.argv


# --------------------------------------------------------------------------------- report


def _pct(scale: float) -> dict[str, float]:
    keys = ("minimum", "maximum", "average", "p50", "p90", "p95", "p99")
    return {k: scale * (i + 1) for i, k in enumerate(keys)}


def report_dict(streaming: bool = True) -> dict:
    """Shaped like TensorRT-LLM tensorrt_llm/bench/dataclasses/reporting.py
    ReportUtility.get_statistics_dict (1.2 line): section and key names copied from that source."""
    out = {
        "engine": {"model": "meta-llama/Llama-3.1-8B-Instruct", "model_path": "/b/bundle", "engine_dir": "None",
                   "version": "1.2.1", "backend": "Pytorch", "dtype": "bfloat16", "kv_cache_dtype": "FP8",
                   "quantization": "FP8"},
        "machine": {"name": "NVIDIA H200", "memory.total": 139.8, "clocks.mem": 3.2},
        "world_info": {"tp_size": 1, "pp_size": 1, "ep_size": 1, "world_size": 1, "max_batch_size": 2048,
                       "max_num_tokens": 8192, "scheduling_policy": "GUARANTEED_NO_EVICT",
                       "kv_cache_percentage": 0.9, "issue_rate": 1.0e9},
        "request_info": {"num_requests": 512, "avg_num_concurrent_requests": 251.5,
                         "avg_input_length": 1000.0, "avg_output_length": 1000.0},
        "performance": {"total_latency_ms": 28853.0, "avg_request_latency_ms": 14000.0,
                        "request_throughput_req_s": 17.745, "system_output_throughput_tok_s": 17744.6,
                        "system_total_throughput_tok_s": 35489.2, "output_throughput_per_user_tok_s": 71.3,
                        "output_throughput_per_gpu_tok_s": 17744.6, "request_latency_percentiles_ms": _pct(1000.0)},
        "dataset": {"num_requests": 512},
    }
    if streaming:
        out["streaming_metrics"] = {"token_output_speed_tok_s": 74.2, "avg_ttft_ms": 812.5, "avg_tpot_ms": 13.4,
                                    "tpot_percentiles": _pct(2.0), "ttft_percentiles": _pct(100.0),
                                    "gen_tps_percentiles": _pct(10.0)}
    return out


def test_parse_report_streaming(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report_dict()))
    r = parse_bench_report(path)
    assert r.output_tok_s == 17744.6
    assert r.output_tok_s_per_gpu == 17744.6
    assert r.output_tok_s_per_user == 71.3
    assert r.request_throughput_req_s == 17.745
    assert r.ttft_ms == {"minimum": 100.0, "maximum": 200.0, "average": 300.0, "p50": 400.0, "p90": 500.0,
                         "p95": 600.0, "p99": 700.0}
    assert r.tpot_ms["p99"] == 14.0 and r.tpot_ms["p50"] == 8.0
    assert (r.avg_ttft_ms, r.avg_tpot_ms, r.per_user_output_speed_tok_s) == (812.5, 13.4, 74.2)
    assert r.request_latency_ms["p95"] == 6000.0
    assert (r.num_requests, r.avg_input_length, r.avg_concurrency, r.tp_size) == (512, 1000.0, 251.5, 1)
    assert r.engine == {"model": "meta-llama/Llama-3.1-8B-Instruct", "model_path": "/b/bundle", "version": "1.2.1",
                        "backend": "Pytorch", "dtype": "bfloat16", "kv_cache_dtype": "FP8", "quantization": "FP8"}


def test_parse_report_without_streaming_has_no_latency_percentiles():
    r = parse_bench_report(report_dict(streaming=False))
    assert r.ttft_ms is None and r.tpot_ms is None and r.avg_ttft_ms is None
    assert r.output_tok_s == 17744.6


def test_parse_report_missing_key_names_it():
    bad = report_dict()
    del bad["performance"]["system_output_throughput_tok_s"]
    with pytest.raises(StageInputError, match=r"trtllm-bench report: trtllm-bench report has no "
                                              r"'system_output_throughput_tok_s'\. Fix: re-run trtllm-bench"):
        parse_bench_report(bad)


# ---------------------------------------------------------------------------- energy / cost


def test_energy_from_nvml_power():
    e = energy_and_cost(tok_s=1000.0, watts=600.0, tdp_watts=700.0, tp=1, price_per_gpu_hour=2.0)
    assert e["power_source"] == "nvml"
    assert e["joules_per_token"] == pytest.approx(0.6)  # 600 J/s / 1000 tok/s
    assert e["gpu_hours_per_mtok"] == pytest.approx(1e6 / 1000 / 3600)  # 0.2778 h
    assert e["usd_per_mtok"] == pytest.approx(2.0 * 0.277777, rel=1e-5)


def test_energy_falls_back_to_tdp_for_every_gpu():
    e = energy_and_cost(tok_s=2909.0, watts=None, tdp_watts=700.0, tp=2, price_per_gpu_hour=None)
    assert e["power_source"] == "tdp"
    assert e["watts"] == 1400.0
    assert e["joules_per_token"] == pytest.approx(1400.0 / 2909.0)
    assert e["gpu_hours_per_mtok"] == pytest.approx(2 * 1e6 / (2909.0 * 3600))
    assert e["usd_per_mtok"] is None


def test_energy_refuses_zero_throughput():
    with pytest.raises(ForgeError, match=r"throughput must be > 0 tok/s, got 0"):
        energy_and_cost(0.0, None, 700.0, 1, None)


def test_measured_vs_predicted():
    assert measured_vs_predicted(17744.0, 50000.0) == pytest.approx(0.35488)
    with pytest.raises(ForgeError, match="predicted throughput must be > 0"):
        measured_vs_predicted(1.0, 0.0)


# ----------------------------------------------------------------------------------- power


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self, milliwatts: dict[int, list[int]]):
        self.milliwatts = {i: list(v) for i, v in milliwatts.items()}
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetPowerUsage(self, handle):
        values = self.milliwatts[handle]
        return values.pop(0) if len(values) > 1 else values[0]


def test_power_sampler_sums_gpus_and_averages():
    nvml = FakeNvml({0: [300_000, 500_000], 1: [250_000]})
    with PowerSampler(devices=(0, 1), interval_s=0.005, nvml=nvml) as sampler:
        import time

        time.sleep(0.05)
    reading = sampler.reading
    assert reading.samples >= 2
    # First sample 300 + 250 W, every later one 500 + 250 W.
    expected = (550.0 + 750.0 * (reading.samples - 1)) / reading.samples
    assert reading.mean_watts == pytest.approx(expected)
    assert reading.devices == (0, 1)
    assert nvml.shutdown


def test_power_sampler_without_nvml_reports_none():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise self.NVMLError("Driver Not Loaded")

    reading = PowerSampler(nvml=Broken({})).start().stop()
    assert reading.mean_watts is None
    assert reading.note == "NVML unavailable: Driver Not Loaded"


# ------------------------------------------------------------------------------- run_bench


def test_run_bench_not_run_without_trtllm_bench(tmp_path):
    (cmd, _) = bench_commands("m", tmp_path, tmp_path / "ds", None, 1, tmp_path, tmp_path)
    result = run_bench(cmd, which=lambda name: None, cuda_available=lambda: True)
    assert result == NotRun("trtllm-bench not found on PATH (TensorRT-LLM is not installed here)")


def test_run_bench_not_run_without_cuda(tmp_path):
    (cmd, _) = bench_commands("m", tmp_path, tmp_path / "ds", None, 1, tmp_path, tmp_path)
    result = run_bench(cmd, which=lambda name: "/usr/bin/true", cuda_available=lambda: False)
    assert result == NotRun("no CUDA GPU visible")
    assert not (tmp_path / "trtllm_bench_throughput.json").exists()


def test_run_bench_parses_report_of_a_real_subprocess(tmp_path):
    # A stand-in executable that writes the report where --report_json says: proves the argv reaches
    # the process and the report is read back, without TensorRT-LLM.
    report = report_dict()
    fake = tmp_path / "trtllm-bench"
    fake.write_text(
        "#!/usr/bin/env python3\nimport sys, json\n"
        f"path = sys.argv[sys.argv.index('--report_json') + 1]\nopen(path, 'w').write(json.dumps({report!r}))\n"
    )
    fake.chmod(0o755)
    (cmd, _) = bench_commands("m", tmp_path, tmp_path / "ds", None, 1, tmp_path / "out", tmp_path)
    nvml = FakeNvml({0: [400_000]})
    run = run_bench(cmd, which=lambda name: str(fake), cuda_available=lambda: True,
                         power_interval_s=0.001, nvml=nvml)
    assert isinstance(run, BenchRun)
    assert run.report.output_tok_s == 17744.6
    assert run.power.mean_watts == pytest.approx(400.0)
    summary = measured_summary(run, predicted_tok_s=50000.0, tdp_watts=700.0, price_per_gpu_hour=3.0)
    assert summary["measured_over_predicted"] == pytest.approx(17744.6 / 50000.0)
    assert summary["energy"]["power_source"] == "nvml"
    assert summary["energy"]["joules_per_token"] == pytest.approx(400.0 / 17744.6)


def test_run_bench_failure_raises_with_output_tail(tmp_path):
    fake = tmp_path / "trtllm-bench"
    fake.write_text("#!/bin/sh\necho 'Error: No such option: --extra_llm_api_options' >&2\nexit 2\n")
    fake.chmod(0o755)
    (_, cmd) = bench_commands("m", tmp_path, tmp_path / "ds", tmp_path / "o.yaml", 1, tmp_path, tmp_path)
    with pytest.raises(ForgeError, match=r"trtllm-bench latency: exited with status 2: Error: No such option"):
        run_bench(cmd, which=lambda name: str(fake), cuda_available=lambda: True, nvml=FakeNvml({0: [1]}))


# ------------------------------------------------------------------------ probe files, ceilings


def probe_result(name: str = "NVIDIA H100 80GB HBM3", cc: str = "9.0", fp8: float | None = 1310.0):
    return ProbeResult(
        gpu_name=name, compute_capability=cc, copy_bandwidth_bytes_per_s=3.0e12, bf16_tflops=798.0,
        fp8_tflops=fp8, method={"copy": {"buffer_bytes": 1 << 30}}, torch_version="2.13.0",
        cuda_version="13.0", measured_at="2026-11-01T00:00:00+00:00",
    )


def test_match_gpu_key_uses_catalog_nvml_names():
    assert match_gpu_key("NVIDIA H100 80GB HBM3", CATALOG) == "h100"
    assert match_gpu_key("NVIDIA H200", CATALOG) == "h200"
    assert match_gpu_key("NVIDIA A100-SXM4-80GB", CATALOG) is None


def test_save_and_load_probe_gives_measured_ceilings(tmp_path):
    path = save_probe(probe_result(), CATALOG, tmp_path)
    assert path == tmp_path / "h100.json"
    data = json.loads(path.read_text())
    assert (data["schema"], data["gpu"], data["bf16_tflops"]) == ("forge.probe/1", "h100", 798.0)
    bf16 = load_ceilings("h100", "bf16", tmp_path)
    assert bf16.source == "measured"
    assert (bf16.memory_bandwidth_bytes_per_s, bf16.peak_flops) == (3.0e12, 798.0e12)
    assert load_ceilings("h100", "fp8", tmp_path).peak_flops == 1310.0e12
    assert load_ceilings("h100", "fp4", tmp_path) is None  # the probe measures no FP4 GEMM
    assert load_ceilings("h200", "bf16", tmp_path) is None  # never probed


def test_measured_ceilings_change_the_plan(tmp_path):
    from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
    from pipeline.sizing.memory import ServingShape
    from pipeline.sizing.plan import plan

    config = json.loads(Path("recipes/llama-3-1-8b-instruct/config.json").read_text())
    serving = ServingShape(max_input_len=1000, max_output_len=1000, seq_len=2000)
    args = (config, FORMATS["fp8"], KV_CACHE_DTYPES["fp8"], CATALOG["h100"], "h100", serving)
    datasheet = plan(*args)
    save_probe(probe_result(), CATALOG, tmp_path)
    measured = plan(*args, ceilings=load_ceilings("h100", "fp8", tmp_path))
    assert measured.roofline["ceilings_source"] == "measured"
    # Batch-1 decode is memory-bound: the rate scales with bandwidth, 3.0 / 3.35 TB/s.
    assert measured.decode_tok_s_batch1 / datasheet.decode_tok_s_batch1 == pytest.approx(3.0 / 3.35)


def test_save_probe_refuses_unknown_gpu(tmp_path):
    with pytest.raises(RecipeError) as info:
        save_probe(probe_result(name="NVIDIA A100-SXM4-80GB", cc="8.0", fp8=None), CATALOG, tmp_path)
    text = str(info.value)
    assert text.startswith("GPU catalog: GPU 'NVIDIA A100-SXM4-80GB' is not in the catalog (known: h100: ")
    for key in CATALOG:
        assert f"{key}: " in text
    assert text.endswith(
        "Fix: add it to pipeline/core/data/gpus.yaml with its NVML name under nvml_names, then re-run `forge probe`."
    )
    assert not list(tmp_path.iterdir())


def test_save_probe_refuses_compute_capability_mismatch(tmp_path):
    with pytest.raises(RecipeError, match=r"reports compute capability 8\.0, the catalog says 9\.0"):
        save_probe(probe_result(cc="8.0"), CATALOG, tmp_path)


def test_load_probe_refuses_file_for_another_gpu(tmp_path):
    save_probe(probe_result(), CATALOG, tmp_path)
    (tmp_path / "h200.json").write_text((tmp_path / "h100.json").read_text())
    expected = r"expected schema 'forge.probe/1' for GPU 'h200', found 'forge.probe/1' for 'h100'"
    with pytest.raises(RecipeError, match=expected):
        load_ceilings("h200", "bf16", tmp_path)


def test_rate_arithmetic():
    # 1 GiB copied in a median 0.7 ms: 2 GiB of traffic.
    assert median_rate(copy_bytes_moved(1 << 30), [0.9, 0.7, 0.6]) == pytest.approx(2 * (1 << 30) / 0.7e-3)
    assert gemm_flops(8192, 8192, 8192) == 2 * 8192**3
    # 8192^3 in 1.378 ms is ~798 TFLOP/s, the figure measured here on one H100 (2026-11).
    assert median_rate(gemm_flops(8192, 8192, 8192), [1.378]) / 1e12 == pytest.approx(797.9, abs=0.1)
    with pytest.raises(ValueError):
        median_rate(1.0, [])


# ---------------------------------------------------------------------------- CPU refusals


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_probe_refuses_without_cuda(no_cuda):
    with pytest.raises(ForgeError) as info:
        probe_gpu()
    text = str(info.value)
    assert text.startswith("forge probe: no CUDA GPU visible (torch ")
    assert text.endswith("Fix: run on a GPU node with an NVIDIA driver and a CUDA build of torch.")


def test_forge_probe_exits_2_on_cpu(no_cuda, monkeypatch, tmp_path, capsys):
    from pipeline import cli
    from pipeline.verbs import probe

    monkeypatch.setattr(cli, "stage_verbs", lambda: {"probe": probe.register})
    code = cli.main(["probe", "--out-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: forge probe: no CUDA GPU visible")
    assert "Fix: run on a GPU node" in err
    assert not list(tmp_path.iterdir())


def test_forge_probe_help_has_example(capsys):
    from pipeline import cli
    from pipeline.verbs import probe

    parser = cli.build_parser({"probe": probe.register})
    with pytest.raises(SystemExit):
        parser.parse_args(["probe", "--help"])
    out = capsys.readouterr().out
    assert "forge probe --device 1 --out-dir" in out
    assert "--catalog" in out and "recipes/measured" in out
