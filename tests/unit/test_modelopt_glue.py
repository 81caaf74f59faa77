"""ModelOpt glue on a tiny random Llama, CPU only (nvidia-modelopt 0.47)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import random_tiny_llama

mtq = pytest.importorskip("modelopt.torch.quantization")
transformers = pytest.importorskip("transformers")

from pipeline.core.errors import CalibrationError, RecipeError, StageInputError
from pipeline.quant.hf_export import export_unified
from pipeline.quant.modelopt_glue import calibrate, check_calibrated
from pipeline.quant.quant_config import build_quant_config
from pipeline.quant.quant_state import restore_quant_state, save_quant_state

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
LAYERS = 2


def tiny_llama() -> torch.nn.Module:
    return random_tiny_llama()


@pytest.fixture
def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(0, 256, (2, 32), generator=g),
            "attention_mask": torch.ones(2, 32, dtype=torch.long),
        }
        for _ in range(2)
    ]


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


# -- build_quant_config ------------------------------------------------------------------------


def test_preset_is_not_mutated_and_deltas_are_appended():
    before = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    config = build_quant_config("FP8_DEFAULT_CFG", "fp8", ["*layers.0.*", "model.norm"])
    assert mtq.FP8_DEFAULT_CFG == before
    names = [e["quantizer_name"] for e in config["quant_cfg"]]
    # lm_head comes from ModelOpt's default_disabled_quantizers unit, not from us.
    assert {"quantizer_name": "*lm_head*", "enable": False} in config["quant_cfg"]
    # Our exclusions come after the preset, the KV entry after them (KV stays uniform).
    assert names[-4:] == ["*layers.0.*", "model.norm", "model.norm.*", "*[kv]_bmm_quantizer"]
    config["quant_cfg"].clear()
    assert mtq.FP8_DEFAULT_CFG == before


def test_kv_cache_on_a_preset_without_algorithm_gets_max_calibration():
    before = copy.deepcopy(mtq.MXFP4_DEFAULT_CFG)
    assert before["algorithm"] is None
    assert build_quant_config("MXFP4_DEFAULT_CFG", "auto", [])["algorithm"] is None
    with_kv = build_quant_config("MXFP4_DEFAULT_CFG", "nvfp4", [])
    assert with_kv["algorithm"] == "max"
    assert with_kv["quant_cfg"][-1]["cfg"]["block_sizes"]["scale_bits"] == (4, 3)
    assert mtq.MXFP4_DEFAULT_CFG == before


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("FP8_CFG", "auto", []), "'FP8_CFG' is not a ModelOpt"),
        (("FP8_KV_CFG", "auto", []), "'FP8_KV_CFG' is not a ModelOpt"),
        (("FP8_DEFAULT_CFG", "int8", []), "unknown KV-cache dtype 'int8'. Fix: use one of: auto"),
        (("FP8_DEFAULT_CFG", "auto", ["  "]), "exclude: exclude patterns must be non-empty"),
    ],
)
def test_build_quant_config_rejects_bad_input(args, text):
    with pytest.raises(RecipeError) as err:
        build_quant_config(*args)
    assert text in str(err.value)


# -- calibrate / check_calibrated --------------------------------------------------------------


def test_fp8_calibration_with_exclusions_and_kv(batches):
    model = tiny_llama()
    config = build_quant_config("FP8_DEFAULT_CFG", "fp8", ["*layers.0.*"])
    result = calibrate(model, config, batches, progress=False)
    s = result.quantizer_summary
    assert result.batches_seen == 2 and result.seconds > 0 and result.peak_cuda_bytes is None
    assert result.peak_rss_bytes > 100 * 2**20  # torch alone is larger than this
    assert s.enabled == {"weight": 7, "input": 7, "output": 0, "kv": 2 * LAYERS, "other": 0}
    # Disabled weight quantizers: layer 0's seven Linears, lm_head and the embedding.
    assert s.disabled["weight"] == LINEARS_PER_LAYER + 2
    assert s.static_ranges == 7 + 7 + 2 * LAYERS and s.dynamic_ranges == 0
    layer0, layer1 = model.model.layers
    assert not layer0.self_attn.q_proj.weight_quantizer.is_enabled
    assert layer1.self_attn.q_proj.weight_quantizer.is_enabled
    assert layer0.self_attn.k_bmm_quantizer.is_enabled  # KV cache stays quantized everywhere
    assert not model.lm_head.weight_quantizer.is_enabled
    assert float(layer1.mlp.down_proj.input_quantizer.amax) > 0


def test_nvfp4_calibrates_on_cpu_and_records_global_amax(batches):
    model = tiny_llama()
    result = calibrate(model, build_quant_config("NVFP4_DEFAULT_CFG", "auto", []), batches, False)
    s = result.quantizer_summary
    n = LINEARS_PER_LAYER * LAYERS
    assert result.batches_seen == 2
    assert s.enabled == {"weight": n, "input": n, "output": 0, "kv": 0, "other": 0}
    assert s.static_ranges == 2 * n  # per-tensor amax -> weight_scale_2 / input_scale


def test_mxfp4_needs_no_forward_pass(batches):
    model = tiny_llama()
    result = calibrate(model, build_quant_config("MXFP4_DEFAULT_CFG", "auto", []), batches, False)
    # algorithm None: ModelOpt never calls the loop; E8M0 block scales are all dynamic.
    assert result.batches_seen == 0
    assert result.quantizer_summary.static_ranges == 0
    assert result.quantizer_summary.dynamic_ranges == 2 * LINEARS_PER_LAYER * LAYERS


def test_quantizers_that_never_saw_data_are_named():
    model = tiny_llama()
    with pytest.raises(CalibrationError) as err:
        calibrate(model, build_quant_config("FP8_DEFAULT_CFG", "auto", []), [], progress=False)
    text = str(err.value)
    # Weight ranges come from the weights; the 14 input quantizers got nothing.
    assert text.startswith("calibration: 14 of 28 quantizers that need a calibrated range")
    assert "model.layers.0.self_attn.q_proj.input_quantizer (no amax)" in text
    assert "and 6 more." in text
    assert "Fix: calibrate with more or longer samples" in text
    assert "`exclude` list" in text


def test_zero_and_infinite_amax_are_rejected(batches):
    model = tiny_llama()
    calibrate(model, build_quant_config("FP8_DEFAULT_CFG", "auto", []), batches, False)
    model.model.layers[1].mlp.up_proj.input_quantizer.amax = torch.tensor(0.0)
    model.model.layers[0].self_attn.o_proj.weight_quantizer.amax = torch.tensor(float("inf"))
    with pytest.raises(CalibrationError) as err:
        check_calibrated(model)
    text = str(err.value)
    assert "2 of 28" in text
    assert "model.layers.1.mlp.up_proj.input_quantizer (amax min 0, max 0)" in text
    assert "model.layers.0.self_attn.o_proj.weight_quantizer (amax min inf" in text


def test_check_calibrated_needs_a_quantized_model():
    with pytest.raises(CalibrationError, match="has no ModelOpt quantizers"):
        check_calibrated(tiny_llama())


# -- save / restore ----------------------------------------------------------------------------


def test_state_roundtrip_is_exact_and_needs_the_buffers(batches, tmp_path):
    import modelopt.torch.opt as mto

    model = tiny_llama()
    calibrate(model, build_quant_config("FP8_DEFAULT_CFG", "fp8", []), batches, False)
    expected = _logits(model, batches[0])
    saved = save_quant_state(model, tmp_path / "state" / "quant_state.pt")
    assert saved.size_bytes < 200_000  # compact: no weights
    assert saved.quantizers_with_buffers == 2 * LINEARS_PER_LAYER * LAYERS + 2 * LAYERS
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["quant_state.pt"]
    # The same state gives the same bytes wherever it is written (the atomic write's temporary name
    # once leaked into the zip archive and made each run's file differ).
    again = save_quant_state(model, tmp_path / "elsewhere" / "quant_state.pt")
    assert again.path.read_bytes() == saved.path.read_bytes()

    restored = restore_quant_state(tiny_llama(), saved.path)
    assert torch.equal(_logits(restored, batches[0]), expected)
    check_calibrated(restored)

    # What the buffers buy: the layout alone does not reproduce the model.
    layout_only = mto.restore_from_modelopt_state(tiny_llama(), mto.modelopt_state(model))
    assert not torch.equal(_logits(layout_only, batches[0]), expected)


def test_restore_refuses_bad_inputs(batches, tmp_path):
    with pytest.raises(StageInputError, match="quant state file not found. Fix: re-run"):
        restore_quant_state(tiny_llama(), tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(StageInputError, match="not a forge quant state file"):
        restore_quant_state(tiny_llama(), tmp_path / "other.pt")
    model = tiny_llama()
    calibrate(model, build_quant_config("FP8_DEFAULT_CFG", "auto", []), batches, False)
    saved = save_quant_state(model, tmp_path / "s.pt")
    with pytest.raises(StageInputError, match="already quantized"):
        restore_quant_state(model, saved.path)


# -- export ------------------------------------------------------------------------------------


def test_export_casts_unquantized_tensors_and_replaces_atomically(batches, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    model = tiny_llama()
    calibrate(model, build_quant_config("FP8_DEFAULT_CFG", "auto", []), batches, False)
    amax = model.model.layers[0].mlp.up_proj.input_quantizer.amax.clone()
    result = export_unified(model, out)

    assert sorted(result.files) == [
        "config.json", "generation_config.json", "hf_quant_config.json", "model.safetensors"
    ]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial or old dirs left
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        # `dtype=` alone would leave these fp32 on a CPU-calibrated model.
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
        # Scales come from the fp32 amax the fake-quant model used: input_scale = amax / 448.
        scale = f.get_tensor("model.layers.0.mlp.up_proj.input_scale")
    assert scale.dtype == torch.float32
    assert torch.allclose(scale, (amax / 448.0).reshape(scale.shape), rtol=1e-6)


def test_failed_export_leaves_nothing_behind(batches, tmp_path, monkeypatch):
    import modelopt.torch.export as mte

    def broken_export(model, dtype, export_dir):
        (export_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(mte, "export_hf_checkpoint", broken_export)
    model = tiny_llama()
    calibrate(model, build_quant_config("FP8_DEFAULT_CFG", "auto", []), batches, False)
    with pytest.raises(RuntimeError, match="disk full"):
        export_unified(model, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_nvfp4_state_roundtrip_is_exact_under_cpu_simulation(batches, tmp_path):
    from pipeline.quant.simulate import reference_fp4_simulation

    model = tiny_llama()
    calibrate(model, build_quant_config("NVFP4_DEFAULT_CFG", "auto", []), batches, False)
    with reference_fp4_simulation(model):
        expected = _logits(model, batches[0])
    saved = save_quant_state(model, tmp_path / "nvfp4.pt")
    restored = restore_quant_state(tiny_llama(), saved.path)
    with reference_fp4_simulation(restored) as report:
        assert report.nvfp4_routed - report.disabled_routed == 2 * LINEARS_PER_LAYER * LAYERS
        assert torch.equal(_logits(restored, batches[0]), expected)


_SAVE_IN_A_FRESH_INTERPRETER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from tiny_models import random_tiny_llama
from pipeline.quant.modelopt_glue import calibrate
from pipeline.quant.quant_state import save_quant_state
from pipeline.quant.quant_config import build_quant_config
g = torch.Generator().manual_seed(1)
batches = [{"input_ids": torch.randint(0, 256, (2, 32), generator=g),
            "attention_mask": torch.ones(2, 32, dtype=torch.long)} for _ in range(2)]
for preset, fmt, name in (("FP8_DEFAULT_CFG", "fp8", "fp8.pt"), ("NVFP4_DEFAULT_CFG", "nvfp4", "nvfp4.pt")):
    model = random_tiny_llama()
    calibrate(model, build_quant_config(preset, fmt, []), batches, False)
    save_quant_state(model, sys.argv[1] + "/" + name)
"""


def test_state_file_bytes_do_not_depend_on_the_interpreters_hash_seed(tmp_path):
    # ModelOpt gathers each quantizer's saved attributes from a set, so their order follows
    # PYTHONHASHSEED, and its metadata snapshot of an FP4 calibration names forge's per-process
    # reference backend; two processes (a fleet worker and a plain `dvc repro`) must still write the
    # same bytes for the same calibration, FP8 and NVFP4 alike.
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = Path(__file__).resolve().parents[1]
    written = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(tests_dir.parent)}
        subprocess.run([sys.executable, "-c", _SAVE_IN_A_FRESH_INTERPRETER, str(out), str(tests_dir)],
                       env=env, check=True, capture_output=True, timeout=300)
        written.append({name: (out / name).read_bytes() for name in ("fp8.pt", "nvfp4.pt")})
    assert written[0]["fp8.pt"] == written[1]["fp8.pt"]
    assert written[0]["nvfp4.pt"] == written[1]["nvfp4.pt"]
    assert b"forge-" not in written[0]["nvfp4.pt"]  # no per-process backend name is saved
