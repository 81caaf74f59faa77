"""`forge plan` in all its forms (issue 12, items 2-6, 12-14, 22): the ad-hoc form runs the recipe
checks, a plan that does not fit exits 2 with what would fit, overrides on a recipe are what-ifs,
one set of defaults, KV-cache aliases, and the CLI's global behaviour."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from pipeline.cli import build_parser, main
from pipeline.core.formats import FORMATS, KV_CACHE_ALIASES, KV_CACHE_DTYPES, KV_CACHE_NAMES
from pipeline.core.gpus import load_catalog
from pipeline.recipe.loading import load_recipe
from pipeline.recipe.schema import TARGET_DEFAULTS
from pipeline.sizing.memory import ServingShape
from pipeline.sizing.parallel import Parallelism
from pipeline.sizing.plan import plan
from pipeline.planning.plan_view import significant

ROOT = Path(__file__).resolve().parents[2]
CONFIG_70B = "recipes/llama-3-3-70b-instruct/config.json"
CATALOG = load_catalog(ROOT / "pipeline/core/data/gpus.yaml")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _adhoc(*extra: str, config: str = CONFIG_70B) -> list[str]:
    return ["plan", "--model-config", config, *extra]


# ---------------------------------------------------------------------------- item 2


def test_adhoc_runs_the_recipe_checks_with_the_same_message(tmp_path, capsys):
    code, out, err = _run(capsys, *_adhoc("--format", "nvfp4", "--gpu", "h200"))
    assert code == 2 and out == ""
    problem = "nvfp4 needs compute capability >= 10.0, h200 is 9.0. Fix: target b200 or rtx-pro-6000, or use fp8."
    assert err == f"error: forge plan --gpu h200: {problem}\n"
    # The recipe form of the same mistake: the same problem and fix, after its own file and field.
    model_dir = tmp_path / "llama-3-3-70b-instruct"
    shutil.copytree(ROOT / "recipes/llama-3-3-70b-instruct", model_dir)
    data = yaml.safe_load((model_dir / "nvfp4.yaml").read_text())
    data["targets"] = {"h200": data["targets"]["b200"]}
    (model_dir / "nvfp4.yaml").write_text(yaml.safe_dump(data))
    code, _, recipe_err = _run(capsys, "validate", str(model_dir / "nvfp4.yaml"))
    assert code == 2 and recipe_err.endswith(f"nvfp4.yaml: targets.h200: {problem}\n")


def test_adhoc_refuses_an_nvfp4_kv_cache_on_hopper(capsys):
    code, out, err = _run(capsys, *_adhoc("--format", "fp8", "--gpu", "h200", "--kv-dtype", "nvfp4"))
    assert code == 2 and out == ""
    assert err == ("error: --kv-dtype: a nvfp4 KV cache needs compute capability >= 10.0, h200 is 9.0. "
                   "Fix: use --kv-dtype auto or --kv-dtype fp8 for this target.\n")


def test_adhoc_refuses_a_tp_the_heads_do_not_split(capsys):
    code, _, err = _run(capsys, *_adhoc("--format", "fp8", "--gpu", "h200", "--tp", "2",
                                       config="recipes/smollm2-135m-instruct/config.json"))
    assert code == 2
    assert err == "error: --tp: 9 attention heads / 3 KV heads cannot be split 2 ways. Fix: use --tp 1.\n"


def test_adhoc_unknown_gpu(capsys):
    code, _, err = _run(capsys, *_adhoc("--format", "fp8", "--gpu", "a100"))
    assert code == 2 and "error: forge plan --gpu a100: unknown GPU 'a100'. Fix: use one of h100, h200, b200" in err


# ---------------------------------------------------------------------------- item 3


LLAMA_405B = {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
              "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 131072}


def test_plan_that_does_not_fit_exits_2_without_throughput_and_says_what_fits(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    config = tmp_path / "llama-405b" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(LLAMA_405B))
    code, out, err = _run(capsys, *_adhoc("--format", "bf16", "--gpu", "h100", config=str(config)))
    assert code == 2
    # 86 GB: the H100's 81,559 MiB as nvidia-smi reports it (pipeline/core/data/gpus.yaml).
    assert "NO: weights 811.7 GB/GPU + reserve 3.4 GB exceed 86 GB at TP 1" in out
    assert "tok/s" not in out and "J/token" not in out and "bound by" not in out
    assert "what would fit (same model and serving shape): " in out
    assert err.startswith("error: forge plan --gpu h100: llama-405b bf16 does not fit: weights 811.7 GB/GPU")
    assert "Fix: no TP up to 8 fits bf16 on h100; what fits: " in err


def test_what_would_fit_is_computed_by_the_planner(tmp_path, capsys):
    config = tmp_path / "llama-405b" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(LLAMA_405B))
    code, out, _ = _run(capsys, *_adhoc("--format", "bf16", "--gpu", "h100", "--json", config=str(config)))
    result = json.loads(out)
    assert code == 2 and result["fits"] is False
    assert result["decode_tok_s_max_batch"] is None and result["joules_per_token"] is None
    assert result["predicted"] == []
    alternatives = result["would_fit"]
    assert alternatives, "405B fits somewhere in the catalog (4-bit on B200)"
    serving = ServingShape(1024, 1024, 2048)
    for alt in alternatives:  # each one fits at its TP, and not at the next smaller TP
        kv = KV_CACHE_DTYPES[TARGET_DEFAULTS.kv_cache_dtype]
        fitted = plan(LLAMA_405B, FORMATS[alt["format"]], kv, CATALOG[alt["gpu"]], alt["gpu"], serving, Parallelism(alt["tp"]))
        # The alternative's max batch is at the default max_num_tokens; the full plan sizes the runtime
        # to the workload (pipeline/sizing/perfmodel.py), which moves the activation reserve a little.
        assert fitted.fits and abs(fitted.max_batch_at_seq_len - alt["max_batch"]) <= 0.02 * alt["max_batch"]
        if alt["tp"] > 1:
            smaller = plan(LLAMA_405B, FORMATS[alt["format"]], kv, CATALOG[alt["gpu"]], alt["gpu"], serving,
                           Parallelism(alt["tp"] // 2))
            assert not smaller.fits
    assert {a["gpu"] for a in alternatives} <= {"b200", "h200", "rtx-pro-6000", "h100", "l40s"}
    assert not any(a["format"] == "bf16" and a["gpu"] == "h100" for a in alternatives)


def test_recipe_what_if_that_does_not_fit_exits_2(capsys):
    code, out, err = _run(capsys, "plan", "recipes/llama-3-3-70b-instruct/fp8.yaml", "--gpu", "h100", "--tp", "1",
                          "--seq-len", "131072")
    assert code == 2
    assert "decode tok/s" not in out and "NO: " in out
    assert "fp8.yaml (what-if --gpu h100 --tp 1 --seq-len 131072): llama-3-3-70b-instruct fp8 does not fit" in err
    assert "Fix: set --tp 2 (the smallest TP that fits on h100)" in err


# ---------------------------------------------------------------------------- item 4


def test_overrides_on_a_recipe_are_applied_as_what_ifs(capsys):
    code, out, _ = _run(capsys, "plan", "recipes/llama-3-3-70b-instruct/fp8.yaml", "--gpu", "b200",
                        "--format", "nvfp4", "--tp", "2", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["inputs"]["gpu"] == "b200" and result["inputs"]["format"] == "nvfp4" and result["inputs"]["tp"] == 2
    assert result["what_ifs"] == {"gpu": "b200", "format": "nvfp4", "tp": 2}
    recipe = load_recipe(Path("recipes/llama-3-3-70b-instruct/fp8.yaml"))
    base = next(iter(recipe.spec.targets.values()))
    assert result["inputs"]["seq_len"] == base.seq_len  # the rest of the target is the recipe's
    assert result["inputs"]["kv_cache_dtype"] == recipe.spec.quant.kv_cache_dtype


def test_what_if_on_an_existing_target_changes_only_that(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = _run(capsys, "plan", "recipes/llama-3-1-8b-instruct/fp8.yaml", "--gpu", "h200", "--seq-len", "16384")
    assert code == 0
    assert "llama-3-1-8b-instruct-fp8-h200 (what-if)" in out
    assert "1,024 / 1,024 / 16,384" in out
    assert "what-if: gpu=h200, seq_len=16384 (on top of the recipe)" in out


def test_what_if_that_breaks_a_check_is_refused(capsys):
    code, _, err = _run(capsys, "plan", "recipes/llama-3-3-70b-instruct/fp8.yaml", "--format", "nvfp4", "--gpu", "h200")
    assert code == 2
    assert "fp8.yaml (what-if --gpu h200 --format nvfp4): nvfp4 needs compute capability >= 10.0, h200 is 9.0." in err


# ---------------------------------------------------------------------------- item 5


def test_one_set_of_defaults_for_recipes_and_adhoc(tmp_path, capsys, monkeypatch):
    """A recipe target that sets nothing and an ad-hoc plan that passes nothing give one answer."""
    model_dir = tmp_path / "llama-3-3-70b-instruct"
    shutil.copytree(ROOT / "recipes/llama-3-3-70b-instruct", model_dir)
    data = yaml.safe_load((model_dir / "fp8.yaml").read_text())
    data["targets"] = {"h200": {}}
    del data["quant"]["kv_cache_dtype"]
    (model_dir / "fp8.yaml").write_text(yaml.safe_dump(data))
    code, out, _ = _run(capsys, "plan", str(model_dir / "fp8.yaml"), "--json")
    from_recipe = json.loads(out)
    code2, out2, _ = _run(capsys, *_adhoc("--format", "fp8", "--gpu", "h200", "--json"))
    adhoc = json.loads(out2)
    assert code == code2 == 0
    for key in ("kv_capacity_tokens", "max_batch_at_seq_len", "weights_bytes", "decode_tok_s_max_batch"):
        assert from_recipe[key] == adhoc[key]
    assert {k: v for k, v in from_recipe["inputs"].items()} == adhoc["inputs"]
    assert adhoc["inputs"]["kv_cache_dtype"] == TARGET_DEFAULTS.kv_cache_dtype == "fp8"
    assert adhoc["defaults"]["--kv-dtype"] == "fp8"
    assert from_recipe["defaults"] == {"max_input_len": 1024, "max_output_len": 1024,
                                       "max_seq_len": "max_input_len + max_output_len", "tp": 1,
                                       "max_num_tokens": 8192, "kv_cache_free_gpu_memory_fraction": 0.9,
                                       "kv_cache_dtype": "fp8"}
    monkeypatch.setenv("COLUMNS", "200")
    _run(capsys, *_adhoc("--format", "fp8", "--gpu", "h200"))
    code, out, _ = _run(capsys, *_adhoc("--format", "fp8", "--gpu", "h200"))
    assert "defaults: --tp=1, --kv-dtype=fp8, --input-len=1024, --output-len=1024, --seq-len=input + output" in out


def test_plan_help_prints_the_defaults_and_documents_every_flag():
    parser = build_parser()._subparsers._group_actions[0].choices["plan"]
    undocumented = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert undocumented == []
    text = parser.format_help()
    assert TARGET_DEFAULTS.describe().split(",")[0] in text.replace("\n", " ")
    for flag in ("--tp", "--kv-dtype", "--input-len", "--output-len", "--seq-len", "--concurrency", "--price",
                 "--model", "--dvc", "--all", "--check"):
        assert flag in text


# ---------------------------------------------------------------------------- item 6


def test_bf16_and_fp16_name_the_unquantized_kv_cache(capsys):
    assert set(KV_CACHE_ALIASES) == {"bf16", "fp16"} and all(v in KV_CACHE_DTYPES for v in KV_CACHE_ALIASES.values())
    kv_flag = next(a for a in build_parser()._subparsers._group_actions[0].choices["plan"]._actions
                   if a.dest == "kv_dtype")
    assert list(kv_flag.choices) == list(KV_CACHE_NAMES)  # derived from pipeline/core/formats.py
    answers = {}
    for name in ("auto", "bf16", "fp16"):
        code, out, _ = _run(capsys, *_adhoc("--format", "fp8", "--gpu", "h200", "--kv-dtype", name, "--json"))
        assert code == 0
        answers[name] = json.loads(out)["kv_bytes_per_token"]
    assert answers["bf16"] == answers["fp16"] == answers["auto"] == 320 * 1024  # 70B, 2 bytes per element


# ---------------------------------------------------------------------------- items 12-14


def test_broken_pipe_ends_quietly():
    proc = subprocess.run(
        f"{sys.executable} -m pipeline.cli plan recipes/llama-3-3-70b-instruct/fp8.yaml | head -1",
        shell=True, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_version(capsys):
    from pipeline import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"forge {__version__}\n"


def test_significant_digits():
    assert significant(0.015234, 3, " J") == "0.0152 J"
    assert significant(0.0123) == "0.0123"
    assert significant(2587.4, 4) == "2,587"
    assert significant(None) == "-"


def test_small_costs_are_not_rounded_to_zero(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = _run(capsys, "plan", "recipes/llama-3-1-8b-instruct/fp8.yaml")
    assert code == 0
    joules = [line for line in out.splitlines() if "J/token" in line]
    dollars = [line for line in out.splitlines() if "$ per M" in line]
    assert joules and all("0.0 J" not in line and "0.0" in line for line in joules)
    assert dollars and all(" 0.0 " not in line and "$0.0" in line for line in dollars)


def test_names_are_never_truncated_off_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # rich assumes 80 columns off a terminal
    code, out, _ = _run(capsys, "plan", "recipes/smollm2-135m-instruct/fp8.yaml")
    assert code == 0 and "smollm2-135m-instruct-fp8-h200" in out and "…" not in out
    code, out, _ = _run(capsys, "formats")
    assert code == 0 and "rtx-pro-6000" in out and "…" not in out


def test_list_title_does_not_say_registry_twice(capsys, monkeypatch):
    from pipeline.verbs.listing import render_list

    class Summary:  # the fields render_list reads
        name = "smollm2-135m-instruct-fp8-rtx-pro-6000-with-a-long-suffix"
        latest, versions, stages = "v1.0.0", ("v1.0.0",), {"staging": "v1.0.0"}
        format, bits_per_weight, gpu, compute_capability, gate_verdict = "fp8", 8.0, "rtx-pro-6000", "12.0", "pass"
        metrics: ClassVar[dict[str, float]] = {"accuracy.x.recovery": 0.98}

    monkeypatch.delenv("COLUMNS", raising=False)
    render_list("registry", [Summary()])
    out = capsys.readouterr().out
    assert "registry registry" not in out and "artifacts in registry" in out
    assert Summary.name in out and "…" not in out


# ---------------------------------------------------------------------------- item 22


def test_dvc_plan_for_one_model(tmp_path, capsys, monkeypatch):
    for name in ("recipes", "calibration", "eval"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(capsys, "plan", "--dvc", "--all", "--model", "llama-3-1-8b-instruct")
    assert code == 0
    plan_yaml = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert set(plan_yaml["models"]) == {"llama-3-1-8b-instruct"}
    assert set(plan_yaml["targets"]) == {"llama-3-1-8b-instruct-fp8-h100", "llama-3-1-8b-instruct-fp8-h200",
                                         "llama-3-1-8b-instruct-nvfp4-b200"}
    assert "dvc repro publish@llama-3-1-8b-instruct-fp8-h200" in out
    code, _, err = _run(capsys, "plan", "--dvc", "--all", "--model", "llama-9")
    assert code == 2 and "--model: no recipes for 'llama-9' under recipes. Fix: use one of gpt-oss-120b, llama-3-1-8b-instruct" in err


# ---------------------------------------------------------------------------- item 15


def test_plan_reads_a_nested_text_config(tmp_path, capsys):
    # Gemma-3's layout (google/gemma-3-4b-it config.json): the language model under text_config.
    gemma3 = {"model_type": "gemma3", "vision_config": {"hidden_size": 1152},
              "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                              "vocab_size": 262208, "max_position_embeddings": 131072}}
    config = tmp_path / "gemma-3-4b-it" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(gemma3))
    code, out, err = _run(capsys, *_adhoc("--format", "fp8", "--gpu", "h200", "--json", config=str(config)))
    assert code == 0, err
    result = json.loads(out)
    assert result["inputs"]["shape"]["hidden"] == 2560 and result["inputs"]["shape"]["layers"] == 34
    assert result["fits"] is True


# ---------------------------------------------------------------------------- issue 26, item 12


def test_plan_dvc_says_what_make_repro_gains_and_generates_gpu_compare_deps(tmp_path, capsys, monkeypatch):
    """A new variant silently joined `make repro`, and a new real model left gpu-compare "up to date"
    (its deps named two recipe folders by hand): `forge plan --dvc` says the one and regenerates the other."""
    for name in ("recipes", "calibration", "eval"):
        shutil.copytree(ROOT / name, tmp_path / name)
    for name in ("plan.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    smol = tmp_path / "recipes/smollm2-135m-instruct"
    shutil.copy(smol / "fp8.yaml", smol / "fp8-b.yaml")
    (smol / "fp8-c.yaml").write_text((smol / "fp8.yaml").read_text() + "frontier: true\n")
    shutil.copytree(tmp_path / "recipes/llama-3-1-8b-instruct", tmp_path / "recipes/llama-3-1-8b-copy")
    code, _, err = _run(capsys, "plan", "--dvc", "--check")
    assert code == 2 and "dvc.yaml: stale" in err
    code, out, _ = _run(capsys, "plan", "--dvc")
    assert code == 0
    assert ("`make repro` (dvc repro report): gains smollm2-135m-instruct-fp8-b-h200 "
            "(recipes/smollm2-135m-instruct/fp8-b.yaml) (now 3 target(s)); to run a variant only in `make frontier`, "
            "set `frontier: true` in its recipe\n") in out
    assert ("`make frontier` (dvc repro report-frontier): gains smollm2-135m-instruct-fp8-b-h200 "
            "(recipes/smollm2-135m-instruct/fp8-b.yaml), smollm2-135m-instruct-fp8-c-h200 "
            "(recipes/smollm2-135m-instruct/fp8-c.yaml) (now 9 target(s))\n") in out
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert [d for d in stages["gpu-compare"]["deps"] if d.startswith("recipes/")] == [
        "recipes/gpt-oss-120b", "recipes/llama-3-1-8b-copy", "recipes/llama-3-1-8b-instruct",
        "recipes/llama-3-3-70b-instruct", "recipes/mixtral-8x22b-instruct", "recipes/mixtral-8x7b-instruct",
        "recipes/qwen3-30b-a3b"]
    assert list(stages).count("gpu-compare") == 1 and (tmp_path / "dvc.yaml").read_text().count("# ---- generated") == 1
    code, out, _ = _run(capsys, "plan", "--dvc")
    assert "`make repro` (dvc repro report): unchanged, 3 target(s)\n" in out
    assert _run(capsys, "plan", "--dvc", "--check")[0] == 0
