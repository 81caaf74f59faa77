"""quant.algorithm / quant.overrides / quant.auto: the vocabulary against the installed ModelOpt,
their mapping onto ModelOpt quant configs, and the recipe errors (no model needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.quant.algorithms import ALGORITHMS, NOT_OFFERED, algorithm_problem, allowed_quant_algos
from pipeline.recipe.schema import QuantSection

ROOT = Path(__file__).resolve().parents[2]
SMOL = ROOT / "recipes/smollm2-135m-instruct"


def test_every_offered_algorithm_is_a_modelopt_method_and_its_preset_uses_it():
    config = pytest.importorskip("modelopt.torch.quantization.config")
    mtq = pytest.importorskip("modelopt.torch.quantization")
    for algo in ALGORITHMS.values():
        cls = getattr(config, algo.modelopt_class)
        assert cls.model_fields["method"].default == algo.name, algo
        if algo.preset:
            preset_algo = getattr(mtq, algo.preset)["algorithm"]
            assert (preset_algo if isinstance(preset_algo, str) else preset_algo["method"]) == algo.name, algo
    methods = {c.model_fields["method"].default for c in vars(config).values()
               if isinstance(c, type) and issubclass(c, config.QuantizeAlgorithmConfig) and "method" in c.model_fields}
    assert set(NOT_OFFERED) <= methods
    assert set(ALGORITHMS) | set(NOT_OFFERED) >= methods - {None}  # nothing ModelOpt has is unaccounted for


def test_algorithm_problems_name_what_applies():
    assert algorithm_problem("awq_lite", "nvfp4") is None
    problem, fix = algorithm_problem("awq_lite", "fp8")
    assert "does not apply to fp8" in problem and fix == "use one of max, mse for fp8."
    assert "INT8" in algorithm_problem("smoothquant", "nvfp4")[0]
    assert "unknown calibration algorithm 'awqlite'" in algorithm_problem("awqlite", "nvfp4")[0]


def test_algorithm_maps_onto_the_modelopt_config():
    pytest.importorskip("modelopt.torch.quantization")
    from pipeline.quant.mixed import quant_config_for

    assert quant_config_for(QuantSection(format="nvfp4"))["algorithm"] == "max"  # the preset's
    # MXFP4 presets have none (the FP8 KV entries would add "max", hf_ptq.py style).
    assert quant_config_for(QuantSection(format="mxfp4", kv_cache_dtype="auto"))["algorithm"] is None
    assert quant_config_for(QuantSection(format="nvfp4", algorithm="awq_full"))["algorithm"] == "awq_full"
    assert quant_config_for(QuantSection(format="fp8", algorithm="mse"))["algorithm"] == "mse"


def test_overrides_map_onto_quant_cfg_entries_after_the_exclusions():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from pipeline.quant.mixed import quant_config_for

    quant = QuantSection(format="nvfp4", exclude=["*layers.5.*"],
                         overrides={"*down_proj": "fp8", "model.layers.0.mlp.gate_proj": "bf16"})
    entries = quant_config_for(quant)["quant_cfg"]
    names = [e["quantizer_name"] for e in entries]
    fp8_w = next(e for e in mtq.FP8_DEFAULT_CFG["quant_cfg"] if e["quantizer_name"] == "*weight_quantizer")["cfg"]
    assert {"quantizer_name": "*down_proj.weight_quantizer", "cfg": fp8_w, "enable": True} in entries
    assert names.index("*down_proj.input_quantizer") > names.index("*layers.5.*")  # overrides win over exclude
    assert {"quantizer_name": "model.layers.0.mlp.gate_proj.*", "enable": False} in entries
    assert names.index("*[kv]_bmm_quantizer") > names.index("*down_proj.weight_quantizer")  # KV stays uniform


def test_allowed_quant_algos_follow_the_recipe():
    assert allowed_quant_algos(QuantSection(format="nvfp4")) == ["NVFP4"]
    assert allowed_quant_algos(QuantSection(format="nvfp4", algorithm="awq_lite")) == ["NVFP4", "NVFP4_AWQ"]
    assert allowed_quant_algos(QuantSection(format="nvfp4", overrides={"*down_proj": "fp8"}))[-1] == "MIXED_PRECISION"


def _validate(tmp_path: Path, capsys, edit) -> str:
    model_dir = tmp_path / "recipes" / "smollm2-135m-instruct"
    shutil.copytree(SMOL, model_dir)
    path = model_dir / "nvfp4.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data["quant"])
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


SCHEMA_ERRORS = {
    "algorithm for another format": (
        lambda q: q.update(format="fp8", algorithm="awq_lite"),
        ("nvfp4.yaml: quant.algorithm: Value error, 'awq_lite' does not apply to fp8 (it applies to nvfp4); "
        "use one of max, mse for fp8.")),
    "unknown algorithm": (
        lambda q: q.update(algorithm="awqlite"),
        "quant.algorithm: Value error, unknown calibration algorithm 'awqlite'; use one of max, mse, awq_lite"),
    "not offered": (lambda q: q.update(algorithm="svdquant"), ("quant.algorithm: Value error, 'svdquant' is a ModelOpt "
                    "method forge does not offer: exports NVFP4_SVD")),
    "override format": (lambda q: q.update(overrides={"*down_proj": "int8"}),
                        ("quant.overrides.*down_proj: input should be 'fp8', 'nvfp4', 'mxfp4', 'w4a8_mxfp4_fp8' or 'bf16', "
                        "got 'int8'. Fix: use one of the listed values.")),
    "auto bits unreachable": (lambda q: q.update(auto={"effective_bits": 4, "formats": ["nvfp4", "fp8"]}),
                              "quant.auto: Value error, effective_bits 4 is outside what nvfp4, fp8 can reach (4.5-8"),
    "auto without the recipe's format": (lambda q: q.update(auto={"effective_bits": 6, "formats": ["fp8", "w4a8_mxfp4_fp8"]}),
                                         ("quant.auto: Value error, formats ['fp8', 'w4a8_mxfp4_fp8'] must include "
                                         "quant.format 'nvfp4'")),
    "auto typo": (lambda q: q.update(auto={"effective_bits": 5, "formats": ["nvfp4", "fp8"], "score": 3}),
                  ("quant.auto.score: unknown key 'score'. Fix: remove it or correct the spelling; allowed keys here: "
                  "effective_bits, formats, method, score_batches.")),
}


@pytest.mark.parametrize("case", SCHEMA_ERRORS, ids=list(SCHEMA_ERRORS))
def test_schema_errors_name_file_field_problem_and_fix(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    edit, expected = SCHEMA_ERRORS[case]
    err = _validate(tmp_path, capsys, edit)
    assert expected in err, err
    assert "Fix:" in err
