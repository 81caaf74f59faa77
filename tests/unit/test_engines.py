"""Engine contracts (pipeline/engines/contracts.py): one refusal per engine x reason on small synthetic
checkpoints written here, the loads that must still load, real ModelOpt exports of a tiny Llama
checked against the contracts, and `forge validate`'s refusal of a format no engine loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.errors import RecipeError, RegistryError
from pipeline.core.formats import FORMATS, ComputeCapability
from pipeline.engines.checkpoint_check import check_checkpoint, compatibility_table, require_loadable
from pipeline.engines.contracts import ENGINES, MIXED, engines_loading_format

H200, B200 = ComputeCapability(9, 0), ComputeCapability(10, 0)
HIDDEN = 64
SHAPES = {"self_attn.q_proj": 64, "self_attn.k_proj": 32, "self_attn.v_proj": 32, "self_attn.o_proj": 64,
          "mlp.gate_proj": 128, "mlp.up_proj": 128, "mlp.down_proj": 64}
ALGO = {"fp8": "FP8", "nvfp4": "NVFP4", "mxfp4": "mxfp4", "w4a8_mxfp4_fp8": "W4A8_MXFP4_FP8"}


def _linear(fmt: str, rows: int, cols: int, scale: float) -> dict[str, torch.Tensor]:
    """One quantized Linear in the layout ModelOpt 0.47 writes (pipeline/engines/export_rules.py)."""
    if fmt == "fp8":
        return {"weight": torch.ones(rows, cols).to(torch.float8_e4m3fn), "weight_scale": torch.tensor(scale),
                "input_scale": torch.tensor(0.02)}
    if fmt == "nvfp4":
        return {"weight": torch.zeros(rows, cols // 2, dtype=torch.uint8),
                "weight_scale": torch.ones(rows, cols // 16).to(torch.float8_e4m3fn),
                "weight_scale_2": torch.tensor(scale), "input_scale": torch.tensor(0.02)}
    out = {"weight": torch.zeros(rows, cols // 2, dtype=torch.uint8),
           "weight_scale": torch.full((rows, cols // 32), 127, dtype=torch.uint8)}
    if fmt == "w4a8_mxfp4_fp8":
        out["input_scale"] = torch.tensor(0.02)
    return out


def make_checkpoint(directory: Path, fmt: str | None, *, algo: str | None = None, kv: str | None = None,
                    exclude: tuple[str, ...] = ("lm_head",), group_size: int | None = None, layers: int = 1,
                    unequal: bool = False, bf16: tuple[str, ...] = ()) -> Path:
    """config.json + hf_quant_config.json + one safetensors file, as a ModelOpt export lays them out."""
    directory.mkdir(parents=True)
    tensors = {"lm_head.weight": torch.zeros(256, HIDDEN, dtype=torch.bfloat16)}
    for layer in range(layers):
        for i, (name, rows) in enumerate(SHAPES.items()):
            module = f"model.layers.{layer}.{name}"
            if fmt is None or module in bf16:
                tensors[f"{module}.weight"] = torch.zeros(rows, HIDDEN, dtype=torch.bfloat16)
                continue
            for suffix, t in _linear(fmt, rows, HIDDEN, 0.01 * (1 + i) if unequal else 0.01).items():
                tensors[f"{module}.{suffix}"] = t
            if kv and name in ("self_attn.k_proj", "self_attn.v_proj"):
                tensors[f"{module}.{name[-6]}_scale"] = torch.tensor(0.001)
    save_file(tensors, directory / "model.safetensors")
    config: dict = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers}
    if fmt is not None:
        algo = algo or ALGO[fmt]
        nested = {"quant_algo": algo, "kv_cache_quant_algo": kv, "exclude_modules": list(exclude)}
        flat = {"quant_method": "modelopt", "quant_algo": algo, "ignore": list(exclude)}
        if group_size:
            nested["group_size"] = group_size
            flat["config_groups"] = {"group_0": {"weights": {"group_size": group_size}}}
        if kv == "FP8":
            flat["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        elif kv:
            flat["kv_cache_quant_algo"] = kv
        config["quantization_config"] = flat
        (directory / "hf_quant_config.json").write_text(json.dumps({"quantization": nested}))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def verdict(ckpt: Path, engine: str, gpu: str = "b200", cc: ComputeCapability | None = B200):
    if ENGINES[engine].device == "cpu":
        gpu, cc = "cpu", None
    return check_checkpoint(ckpt, ENGINES[engine], gpu, cc)


# ------------------------------------------------------------------ loads that must load


def test_engine_table_cites_a_source_for_every_engine_and_formats_are_registry_names():
    for engine in ENGINES.values():
        assert engine.source and engine.version
        for c in engine.formats:
            assert c.format in FORMATS or c.format == MIXED, (engine.name, c.format)
            if c.format != "bf16":
                assert c.source, (engine.name, c.format)


def test_equal_scale_fp8_loads_everywhere_with_the_flags_each_engine_needs(tmp_path):
    ckpt = make_checkpoint(tmp_path / "fp8", "fp8", kv="FP8")
    rows = {v.engine: v for v in compatibility_table(ckpt, "h200", H200)}
    assert all(v.loads for v in rows.values()), rows
    assert rows["tensorrt-llm"].reason.endswith("KV FP8: ignored: k/v scales stay 1.0")
    assert rows["vllm"].flags == ("--quantization", "modelopt", "--kv-cache-dtype", "fp8")
    assert rows["vllm-cpu"].device == "cpu" and "--dtype" in rows["vllm-cpu"].flags
    assert rows["sglang"].flags == ("--quantization", "modelopt_fp8", "--kv-cache-dtype", "fp8_e4m3")


def test_bf16_checkpoint_loads_without_quantization_flags(tmp_path):
    ckpt = make_checkpoint(tmp_path / "bf16", None)
    assert all(v.loads for v in compatibility_table(ckpt, "h200", H200))


# ------------------------------------------------------------------ one refusal per engine x reason


@pytest.mark.parametrize(("engine", "fmt", "algo", "expected"), [
    ("tensorrt-llm", "mxfp4", None, "quant_algo 'mxfp4' is not accepted (accepts FP8, NVFP4, W4A8_MXFP4_FP8, MIXED_PRECISION)"),
    ("vllm", "w4a8_mxfp4_fp8", None, "quant_algo 'W4A8_MXFP4_FP8' is not accepted (accepts FP8, NVFP4)"),
    ("vllm-cpu", "mxfp4", None, "quant_algo 'mxfp4' is not accepted (accepts FP8)"),
    # SGLang compares as written; vLLM upper-cases (so the same checkpoint loads there).
    ("sglang", "fp8", "fp8", "quant_algo 'fp8' is not accepted (accepts FP8, NVFP4)"),
])
def test_unaccepted_quant_algo(tmp_path, engine, fmt, algo, expected):
    ckpt = make_checkpoint(tmp_path / "c", fmt, algo=algo, group_size=32)
    v = verdict(ckpt, engine)
    assert (v.loads, v.reason) == (False, expected)
    if engine == "sglang":
        assert verdict(ckpt, "vllm").loads


@pytest.mark.parametrize(("engine", "fmt", "cc", "expected"), [
    ("tensorrt-llm", "nvfp4", H200, "NVFP4 needs compute capability >= 10.0, h200 is 9.0"),
    ("tensorrt-llm", "w4a8_mxfp4_fp8", H200, "W4A8_MXFP4_FP8 needs compute capability >= 10.0, h200 is 9.0"),
    ("vllm", "fp8", ComputeCapability(7, 5), "FP8 needs compute capability >= 8.0, h200 is 7.5"),
    ("sglang", "nvfp4", H200, "NVFP4 needs compute capability >= 10.0, h200 is 9.0"),
])
def test_compute_capability(tmp_path, engine, fmt, cc, expected):
    ckpt = make_checkpoint(tmp_path / "c", fmt, group_size=16 if fmt == "nvfp4" else 32)
    v = verdict(ckpt, engine, "h200", cc)
    assert (v.loads, v.reason) == (False, expected)


def test_vllm_on_h200_runs_nvfp4_weight_only(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", "nvfp4", group_size=16)
    v = verdict(ckpt, "vllm", "h200", H200)
    assert v.loads and "Marlin" in v.reason and v.flags == ("--quantization", "modelopt_fp4")


def test_vllm_cpu_has_no_nvfp4_kernel(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", "nvfp4", group_size=16)
    assert verdict(ckpt, "vllm-cpu").reason == "quant_algo 'NVFP4': no CPU kernel for the NVFP4 linear layer"


@pytest.mark.parametrize(("engine", "source"), [
    ("tensorrt-llm", "hf_quant_config.json"), ("vllm", "config.json"), ("sglang", "config.json")])
def test_nvfp4_without_group_size(tmp_path, engine, source):
    ckpt = make_checkpoint(tmp_path / "c", "nvfp4")
    assert verdict(ckpt, engine).reason == f"{source} quantization config lacks group_size"


@pytest.mark.parametrize(("engine", "kv"), [("sglang", "NVFP4"), ("vllm-cpu", "NVFP4")])
def test_unaccepted_kv_cache_algo(tmp_path, engine, kv):
    ckpt = make_checkpoint(tmp_path / "c", "fp8", kv=kv)
    v = verdict(ckpt, engine)
    assert not v.loads and v.reason.startswith(f"kv_cache_quant_algo '{kv}' is not accepted")
    assert verdict(ckpt, "tensorrt-llm").loads  # TensorRT-LLM reads NVFP4 KV scales


@pytest.mark.parametrize(("engine", "fmt", "suffix"), [
    ("tensorrt-llm", "nvfp4", "weight_scale_2"),  # asserts equal (NVFP4LinearMethod.load_weight_scales)
    ("vllm", "nvfp4", "weight_scale_2"),          # keeps the max without re-deriving block scales
    ("vllm-cpu", "fp8", "weight_scale"),          # the re-quantize op is CUDA-only
])
def test_unequal_fused_shard_scales(tmp_path, engine, fmt, suffix):
    ckpt = make_checkpoint(tmp_path / "c", fmt, group_size=16, unequal=True)
    v = verdict(ckpt, engine)
    assert not v.loads
    assert v.reason.startswith(f"model.layers.0.mlp: fused shards have different {suffix}; "
                               f"model.layers.0.self_attn: fused shards have different {suffix}")


def test_unequal_fp8_scales_are_rescaled_by_gpu_engines(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", "fp8", unequal=True)
    for engine in ("tensorrt-llm", "vllm", "sglang"):
        assert verdict(ckpt, engine, "h200", H200).loads, engine


def test_trtllm_matches_excludes_on_its_fused_names(tmp_path):
    # "*gate_up*" names TensorRT-LLM's fused Linear: it loads gate/up unquantized, but they are FP8.
    ckpt = make_checkpoint(tmp_path / "c", "fp8", exclude=("lm_head", "*gate_up*"))
    v = verdict(ckpt, "tensorrt-llm", "h200", H200)
    assert v.reason == ("model.layers.0.mlp.gate_proj is F8_E4M3 but tensorrt-llm matches it as excluded "
                        "(loads it unquantized); model.layers.0.mlp.up_proj is F8_E4M3 but tensorrt-llm "
                        "matches it as excluded (loads it unquantized)")
    assert verdict(ckpt, "vllm", "h200", H200).loads and verdict(ckpt, "sglang", "h200", H200).loads


def test_vllm_matches_excludes_by_substring(tmp_path):
    # "model.layers.1" (no wildcard) is a substring of "model.layers.10...": vLLM skips layer 10 too.
    ckpt = make_checkpoint(tmp_path / "c", "fp8", layers=11, exclude=("lm_head", "model.layers.1"),
                           bf16=tuple(f"model.layers.1.{n}" for n in SHAPES))
    v = verdict(ckpt, "vllm", "h200", H200)
    assert not v.loads and v.reason.startswith("model.layers.10.mlp.down_proj is F8_E4M3 but vllm matches it as excluded")
    assert verdict(ckpt, "tensorrt-llm", "h200", H200).reason.startswith(
        "model.layers.1.mlp.down_proj.weight is BF16, expected F8_E4M3")  # fnmatch: "model.layers.1" is not its children
    assert not verdict(ckpt, "sglang", "h200", H200).loads


def test_sglang_fullmatch_does_not_match_a_prefix(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", "fp8", exclude=("lm", "model.layers.0.mlp.down_proj"),
                           bf16=("model.layers.0.mlp.down_proj",))
    v = verdict(ckpt, "sglang", "h200", H200)
    assert v.reason == "lm_head.weight is BF16, expected F8_E4M3"
    assert verdict(ckpt, "vllm", "h200", H200).loads  # substring "lm" in "lm_head"


@pytest.mark.parametrize("engine", ["tensorrt-llm", "vllm", "sglang"])
def test_partly_excluded_fused_layer(tmp_path, engine):
    ckpt = make_checkpoint(tmp_path / "c", "fp8", exclude=("lm_head", "model.layers.0.self_attn.q_proj"),
                           bf16=("model.layers.0.self_attn.q_proj",))
    assert verdict(ckpt, engine, "h200", H200).reason == (
        "model.layers.0.self_attn.k_proj: exclude patterns cover some but not all shards of its fused layer")


def test_wrong_block_scale_dtype_for_trtllm_nvfp4(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", "nvfp4", group_size=16)
    from safetensors.torch import load_file
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight_scale"] = tensors["model.layers.0.mlp.down_proj.weight_scale"].float()
    save_file(tensors, ckpt / "model.safetensors")
    assert verdict(ckpt, "tensorrt-llm").reason == "model.layers.0.mlp.down_proj.weight_scale is F32, expected F8_E4M3"


def test_unreadable_weights_and_wrong_device(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", "fp8")
    (ckpt / "model.safetensors").write_bytes(b"not safetensors")
    assert verdict(ckpt, "vllm").reason.startswith("cannot read the safetensors headers")
    assert check_checkpoint(ckpt, ENGINES["vllm-cpu"], "b200", B200).reason == "a cpu engine; this check is for b200"


def test_publish_refuses_a_table_without_a_gpu_loader():
    rows = [{"engine": "tensorrt-llm", "device": "b200", "loads": False, "reason": "quant_algo 'mxfp4' is not accepted"},
            {"engine": "vllm-cpu", "device": "cpu", "loads": True, "reason": ""}]
    with pytest.raises(RegistryError) as err:
        require_loadable(rows, "bundle x")
    assert str(err.value).startswith("bundle x: no engine loads this bundle on its GPU "
                                     "(tensorrt-llm: quant_algo 'mxfp4' is not accepted).")
    with pytest.raises(RegistryError, match="no compatibility table"):
        require_loadable([], "bundle x")
    require_loadable([dict(rows[0], loads=True)], "bundle x")


# ------------------------------------------------------------------ the static view validate uses


def test_formats_loadable_per_gpu():
    assert engines_loading_format("mxfp4", None, B200) == []
    assert engines_loading_format("w4a8_mxfp4_fp8", "FP8", B200) == ["tensorrt-llm"]
    assert engines_loading_format("nvfp4", None, H200) == ["vllm"]
    assert engines_loading_format("fp8", "FP8", H200) == ["tensorrt-llm", "vllm", "sglang"]


def test_validate_refuses_plain_mxfp4(tmp_path):
    from pipeline.core.gpus import load_catalog
    from pipeline.planning.validate import check_target
    from pipeline.recipe.loading import load_recipe

    root = Path(__file__).resolve().parents[2]
    model_dir = tmp_path / "recipes" / "smollm2-135m-instruct"
    model_dir.mkdir(parents=True)
    for name in ("model.yaml", "config.json"):
        (model_dir / name).write_text((root / "recipes/smollm2-135m-instruct" / name).read_text())
    text = (root / "recipes/smollm2-135m-instruct/mxfp4.yaml").read_text().replace(
        "format: w4a8_mxfp4_fp8", "format: mxfp4")
    (model_dir / "mx.yaml").write_text(text)
    recipe = load_recipe(model_dir / "mx.yaml")
    with pytest.raises(RecipeError) as err:
        check_target(recipe, "b200", load_catalog(root / "pipeline/core/data/gpus.yaml"))
    assert str(err.value) == (
        f"{recipe.path}: quant.format: no serving engine loads mxfp4 (quant_algo 'mxfp4', as ModelOpt writes it) "
        "on b200 (TensorRT-LLM, vLLM and SGLang contracts, pipeline/engines/contracts.py). "
        "Fix: use fp8 or nvfp4 or w4a8_mxfp4_fp8 for b200.")


# ------------------------------------------------------------------ real ModelOpt exports (tiny Llama, CPU)


@pytest.fixture(scope="module")
def real_exports(tmp_path_factory):
    pytest.importorskip("modelopt.torch.export")
    from tiny_models import random_tiny_llama

    from pipeline.quant.hf_export import export_unified
    from pipeline.quant.modelopt_glue import calibrate
    from pipeline.quant.quant_config import build_quant_config

    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 256, (2, 32), generator=g),
                "attention_mask": torch.ones(2, 32, dtype=torch.long)} for _ in range(2)]
    root = tmp_path_factory.mktemp("engine-exports")
    out = {}
    for fmt in ("fp8", "w4a8_mxfp4_fp8"):
        model = random_tiny_llama()
        calibrate(model, build_quant_config(FORMATS[fmt].modelopt_config, "fp8", []), batches, progress=False)
        out[fmt] = export_unified(model, root / fmt).path
    return out


def test_real_w4a8_mxfp4_fp8_export_loads_in_trtllm_on_b200_only(real_exports):
    from pipeline.engines.export_rules import EXPORT_RULES, verify_unified_export

    ckpt = real_exports["w4a8_mxfp4_fp8"]
    report = verify_unified_export(ckpt, "W4A8_MXFP4_FP8", "FP8", EXPORT_RULES["w4a8_mxfp4_fp8"])
    assert report.quant_algo == "W4A8_MXFP4_FP8"  # what ModelOpt 0.47 writes, upper case
    assert json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]["group_size"] == 32
    rows = {v.engine: v for v in compatibility_table(ckpt, "b200", B200)}
    assert rows["tensorrt-llm"].loads, rows["tensorrt-llm"]
    assert [e for e, v in rows.items() if v.loads] == ["tensorrt-llm"]
    assert not verdict(ckpt, "tensorrt-llm", "h200", H200).loads


def test_real_fp8_export_loads_in_vllm_cpu(real_exports):
    # Before the fused-shard unification this export was refused (unequal weight_scale).
    v = verdict(real_exports["fp8"], "vllm-cpu")
    assert v.loads, v.reason
