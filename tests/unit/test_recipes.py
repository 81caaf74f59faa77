"""Every shipped recipe validates; every way a recipe can be wrong gives one clear message naming
file, field, problem and fix, exit code 2, and no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.core.errors import ForgeError
from pipeline.core.formats import FORMATS
from pipeline.core.gpus import load_catalog
from pipeline.planning.validate import Definitions, validate_recipe
from pipeline.recipe.loading import discover_recipes, load_recipe

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = discover_recipes(ROOT / "recipes")
SMOL = ROOT / "recipes/smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_recipes_are_shipped_for_every_model_and_format():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in SHIPPED}
    assert {"smollm2-135m-instruct/fp8.yaml", "smollm2-135m-instruct/nvfp4.yaml", "smollm2-135m-instruct/mxfp4.yaml",
            "llama-3-1-8b-instruct/fp8.yaml", "llama-3-1-8b-instruct/nvfp4.yaml",
            "llama-3-3-70b-instruct/fp8.yaml", "llama-3-3-70b-instruct/nvfp4.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path.relative_to(ROOT))
    plans = validate_recipe(recipe, load_catalog(), Definitions.of_checkout(ROOT))
    assert plans and all(p.fits for p in plans.values())
    if recipe.model.spec.source.kind == "hf":
        assert len(recipe.model.spec.source.revision) == 40  # pinned commit


def _bad_recipe(tmp_path: Path, variant: str, edit) -> Path:
    model_dir = tmp_path / "recipes" / "smollm2-135m-instruct"
    shutil.copytree(SMOL, model_dir)
    path = model_dir / f"{variant}.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    return path


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


CASES = {
    "unknown key": (
        "fp8", lambda d: d["quant"].update(formt="fp8"),
        ("fp8.yaml: quant.formt: unknown key 'formt'. Fix: remove it or correct the spelling; "
        "allowed keys here: format, kv_cache_dtype, exclude, algorithm, overrides, auto."),
    ),
    "wrong type": (
        "fp8", lambda d: d["calibration"].update(num_samples="many"),
        "fp8.yaml: calibration.num_samples: Input should be a valid integer",
    ),
    "unknown gpu": (
        "fp8", lambda d: d["targets"].update(a100=d["targets"]["h200"]),
        "fp8.yaml: targets.a100: unknown GPU 'a100'. Fix: use one of h100, h200, b200, l40s, rtx-pro-6000",
    ),
    "unknown format": (
        "fp8", lambda d: d["quant"].update(format="int3"),
        "fp8.yaml: quant.format: input should be 'fp8', 'nvfp4', 'mxfp4' or 'w4a8_mxfp4_fp8', got 'int3'. Fix: use one of the listed values.",
    ),
    "nvfp4 on hopper": (
        "nvfp4", lambda d: d["targets"].update(h200=d["targets"].pop("b200")),
        ("nvfp4.yaml: targets.h200: nvfp4 needs compute capability >= 10.0, h200 is 9.0. "
        "Fix: target b200 or rtx-pro-6000, or use fp8."),
    ),
    "nvfp4 kv cache on hopper": (
        "fp8", lambda d: d["quant"].update(kv_cache_dtype="nvfp4"),
        "fp8.yaml: quant.kv_cache_dtype: a nvfp4 KV cache needs compute capability >= 10.0, h200 is 9.0.",
    ),
    "seq len below a request": (
        "fp8", lambda d: d["targets"]["h200"].update(max_seq_len=100),
        "fp8.yaml: targets.h200: Value error, max_seq_len 100 < max_input_len + max_output_len (2560)",
    ),
    "unknown eval suite": (
        "fp8", lambda d: d["eval"].update(suite="mmlu-pro"),
        "fp8.yaml: eval.suite: unknown eval suite 'mmlu-pro'. Fix: use one of smoke, standard, zero-shot.",
    ),
    "gate override for a metric the suite lacks": (
        "fp8", lambda d: d["eval"]["gates"].update(overrides={"forge_mc/acc": 0.99}),
        ("fp8.yaml: eval.gates.overrides: no metric 'forge_mc/acc' in eval suite 'zero-shot'. "
        "Fix: use the suite's metric keys: commonsense_0shot/acc,none,"),
    ),
    "unknown calibration set": (
        "fp8", lambda d: d["calibration"].update(set="nope"),
        "fp8.yaml: calibration.set: unknown calibration set 'nope'. Fix: use one of",
    ),
    # issue 12 item 7: the misspelt key is named first, with the key it should be; the "missing"
    # problem it causes is the same mistake, so it is folded into that one line.
    "top-level typo": (
        "fp8", lambda d: d.update(calibraton=d.pop("calibration")),
        ("fp8.yaml: calibraton: unknown key 'calibraton'. Fix: did you mean 'calibration'? "
        "(that required field is missing) Allowed keys here: quant, calibration, targets, eval, build, publish, frontier."),
    ),
    # items 8 and 28: recovery is a ratio in (0, 1]
    "recovery above 1": (
        "fp8", lambda d: d["eval"]["gates"].update(default_min_recovery=1.05),
        ("fp8.yaml: eval.gates.default_min_recovery: Value error, default_min_recovery is a recovery ratio "
        "(quantized / baseline) in (0, 1], e.g. 0.95 keeps 95% of the baseline; got 1.05; for 1.05% write 0.0105."),
    ),
    "recovery written as a percentage": (
        "fp8", lambda d: d["eval"]["gates"].update(default_min_recovery=99),
        ("default_min_recovery is a recovery ratio (quantized / baseline) in (0, 1], e.g. 0.95 keeps 95% of the "
        "baseline; got 99; for 99% write 0.99."),
    ),
    "negative override": (
        "fp8", lambda d: d["eval"]["gates"].update(overrides={"forge_mc/acc,none": -1}),
        ("fp8.yaml: eval.gates.overrides: Value error, the override for 'forge_mc/acc,none' is a recovery ratio "
        "(quantized / baseline) in (0, 1]"),
    ),
    "override above 1": (
        "fp8", lambda d: d["eval"]["gates"].update(overrides={"forge_mc/acc,none": 2.0}),
        ("the override for 'forge_mc/acc,none' is a recovery ratio (quantized / baseline) in (0, 1], e.g. 0.95 "
        "keeps 95% of the baseline; got 2; for 2% write 0.02."),
    ),
    # item 9: YAML booleans are not integers
    "boolean sample count": (
        "fp8", lambda d: d["calibration"].update(num_samples=True),
        ("fp8.yaml: calibration.num_samples: Input should be a valid integer, got the YAML boolean true. "
        "Fix: write a number (YAML reads true/false/yes/no/on/off as booleans)."),
    ),
    "boolean tp": (
        "fp8", lambda d: d["targets"]["h200"].update(tp=True),
        "fp8.yaml: targets.h200.tp: Value error, tp is a number of GPUs (1, 2, 4 or 8), got the YAML boolean true.",
    ),
    # items 10 and 31: no sequence past the model's positions (SmolLM2: 8192, no rope scaling)
    "max_seq_len past the model's positions": (
        "fp8", lambda d: d["targets"]["h200"].update(max_seq_len=1_000_000),
        ("fp8.yaml: targets.h200.max_seq_len: max_seq_len 1,000,000 exceeds the 8,192 positions "
        "smollm2-135m-instruct's config allows (max_position_embeddings, with any rope_scaling). "
        "Fix: set max_seq_len: 8192 or less."),
    ),
    "calibration longer than the model's positions": (
        "fp8", lambda d: d["calibration"].update(seq_len=100_000),
        ("fp8.yaml: calibration.seq_len: 100,000 tokens exceeds the 8,192 positions smollm2-135m-instruct's "
        "config allows. Fix: set seq_len: 8192 or less"),
    ),
    # item 11: the file and the field are named
    "tp that does not divide the heads": (
        "fp8", lambda d: d["targets"]["h200"].update(tp=2),
        "fp8.yaml: targets.h200.tp: 9 attention heads / 3 KV heads cannot be split 2 ways. Fix: use tp: 1.",
    ),
    # item 29 (first half): names are plain file stems, never paths
    "calibration set as a path": (
        "fp8", lambda d: d["calibration"].update(set="../recipes/gpus"),
        ("fp8.yaml: calibration.set: Value error, calibration set names are plain file stems "
        "(calibration/<name>.yaml), got '../recipes/gpus'; use up to 64 letters, digits, '-' and '_', no '/' or '..'."),
    ),
    "eval suite as a path": (
        "fp8", lambda d: d["eval"].update(suite="../suites/smoke"),
        ("fp8.yaml: eval.suite: Value error, eval suite names are plain file stems (eval/suites/<name>.yaml), "
        "got '../suites/smoke'"),
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_recipe_gives_one_clear_message(case, tmp_path, capsys):
    variant, edit, expected = CASES[case]
    path = _bad_recipe(tmp_path, variant, edit)
    code, err = _run(capsys, "validate", str(path))
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err
    assert err.count("\n") == 1  # one line


def test_model_that_fits_at_no_tp(tmp_path, capsys):
    """A 1.6 T-parameter dense model fits no TP up to 8 on an 80 GB H100, even in FP8."""
    def edit(d):
        d["targets"] = {"h100": {"max_input_len": 1024, "max_output_len": 1024, "tp": 8}}
    path = _bad_recipe(tmp_path, "fp8", edit)
    config = path.parent / "config.json"
    huge = json.loads(config.read_text())
    huge.update(hidden_size=32768, intermediate_size=131072, num_hidden_layers=120, num_attention_heads=256,
                num_key_value_heads=8)
    config.write_text(json.dumps(huge))
    code, err = _run(capsys, "validate", str(path))
    assert code == 2
    assert "targets.h100: smollm2-135m-instruct fp8 does not fit: weights" in err
    # What would fit is computed: the 4-bit formats an engine loads, on b200 at TP 8, nothing else
    # in the catalog (plain mxfp4 fits too, but no engine loads it: pipeline/engines/contracts.py).
    serving = next(line for line in err.splitlines() if "targets.h100:" in line)
    assert "Fix: no TP up to 8 fits fp8 on h100; what fits: w4a8_mxfp4_fp8 on b200 x8 (max batch " in serving
    assert "nvfp4 on b200 x8" in serving and "h200" not in serving.split("Fix:")[1]
    assert "mxfp4 on b200" not in serving.replace("w4a8_mxfp4_fp8 on b200", "")
    # The BF16 model cannot be calibrated on the default node (8 x h100) either: the placement says what would.
    assert "calibration.node" in err


def test_too_small_tp_suggests_the_smallest_that_fits(tmp_path, capsys):
    model_dir = tmp_path / "recipes" / "llama-3-3-70b-instruct"
    shutil.copytree(ROOT / "recipes/llama-3-3-70b-instruct", model_dir)
    path = model_dir / "fp8.yaml"
    data = yaml.safe_load(path.read_text())
    data["targets"]["h100"]["tp"] = 1
    data["targets"]["h100"]["max_seq_len"] = 131072
    path.write_text(yaml.safe_dump(data))
    code, err = _run(capsys, "validate", str(path))
    assert code == 2
    assert "targets.h100: llama-3-3-70b-instruct fp8 does not fit: KV pool" in err
    assert "Fix: set tp: 2 (the smallest TP that fits on h100), or a smaller format or max_seq_len; also fits: " in err


def test_debug_shows_traceback(tmp_path):
    path = _bad_recipe(tmp_path, "fp8", lambda d: d["quant"].update(formt="fp8"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--debug", "validate", str(path)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_format_choices_derive_from_the_registry():
    from pipeline.cli import build_parser

    plan_parser = build_parser()._subparsers._group_actions[0].choices["plan"]
    fmt = next(a for a in plan_parser._actions if a.dest == "format")
    assert list(fmt.choices) == list(FORMATS)


def test_plan_json_carries_the_documented_keys(capsys):
    code = main(["plan", "--model-config", "recipes/llama-3-3-70b-instruct/config.json", "--format", "fp8",
                 "--gpu", "h200", "--kv-dtype", "fp8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("params", "weights_bytes", "kv_bytes_per_token", "kv_capacity_tokens", "max_batch_at_seq_len",
                "fits", "min_tp", "decode_tok_s_batch1", "decode_tok_s_max_batch", "joules_per_token", "inputs"):
        assert key in out
    # "predicted" names the predicted run and its price; the roofline's keys are ceilings (issue 26)
    assert "predicted_output_tok_s" in out["predicted"] and "usd_per_mtok" in out["predicted"]
    assert "decode_tok_s_batch1" not in out["predicted"] and out["roofline_is"].startswith("ceiling")
    assert out["inputs"]["gpu"] == "h200" and out["inputs"]["format"] == "fp8"


def test_plan_file_is_fresh(capsys):
    assert main(["plan", "--dvc", "--check"]) == 0, capsys.readouterr().err


def test_formats_verb_prints_every_registry_entry(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells to the terminal width
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in (*FORMATS, *load_catalog()):
        assert name in out


# ---------------------------------------------------------------------------- issue 12, item 1: validate


def test_validate_walks_a_model_directory(capsys):
    """The example in `forge validate --help` names a directory: every recipe in it is checked."""
    code = main(["validate", "recipes/llama-3-3-70b-instruct"])
    out = capsys.readouterr().out
    assert code == 0
    assert "ok  recipes/llama-3-3-70b-instruct/fp8.yaml" in out and "ok  recipes/llama-3-3-70b-instruct/nvfp4.yaml" in out
    assert "model.yaml" not in out
    assert "2 of 2 recipe(s) valid" in out


def test_validate_walks_nested_directories_and_skips_the_catalog(capsys):
    code = main(["validate", "recipes"])
    out = capsys.readouterr().out
    assert code == 0 and f"{len(SHIPPED)} of {len(SHIPPED)} recipe(s) valid" in out
    assert "gpus.yaml" not in out.split("GPU catalog")[0]


def test_validate_that_matches_nothing_fails(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "model.yaml").write_text("description: x\n")
    code, err = _run(capsys, "validate", str(tmp_path))
    assert code == 2
    assert "no recipes found (model.yaml and gpus.yaml are not recipes). Fix: pass recipes/<model>/<variant>.yaml" in err
    code, err = _run(capsys, "validate", str(tmp_path / "missing"))
    assert code == 2 and "missing: no such file or directory." in err


def test_validate_reports_every_problem_of_every_file(tmp_path, capsys):
    def two_problems(d):
        d["quant"]["formt"] = "fp8"
        d["calibration"]["num_samples"] = True

    first = _bad_recipe(tmp_path, "fp8", two_problems)
    second = first.parent / "nvfp4.yaml"
    data = yaml.safe_load(second.read_text())
    data["targets"]["h200"] = data["targets"].pop("b200")  # nvfp4 on Hopper
    data["targets"]["b200"] = {"max_input_len": 1024, "max_output_len": 1024, "tp": 2}  # 9 heads: no TP 2
    second.write_text(yaml.safe_dump(data))
    code = main(["validate", str(first.parent)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert lines[0] == "error: 4 problems:"
    assert lines[1].endswith("fp8.yaml: quant.formt: unknown key 'formt'. Fix: remove it or correct the spelling; "
                             "allowed keys here: format, kv_cache_dtype, exclude, algorithm, overrides, auto.")
    assert "fp8.yaml: calibration.num_samples: Input should be a valid integer, got the YAML boolean true." in lines[2]
    rest = "\n".join(lines[3:5])  # targets in file order (safe_dump sorts b200 first)
    assert "nvfp4.yaml: targets.h200: nvfp4 needs compute capability >= 10.0, h200 is 9.0." in rest
    assert "nvfp4.yaml: targets.b200.tp: 9 attention heads / 3 KV heads cannot be split 2 ways." in rest
    assert all(" Fix: " in line for line in lines[1:])
    assert "ok  " in captured.out and "mxfp4.yaml" in captured.out  # the healthy files are still reported
    shipped = len([p for p in first.parent.glob("*.yaml") if p.name != "model.yaml"])
    assert f"{shipped - 2} of {shipped} recipe(s) valid" in captured.out


def test_debug_after_the_verb_shows_traceback(tmp_path):
    path = _bad_recipe(tmp_path, "fp8", lambda d: d["quant"].update(formt="fp8"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", "--debug", str(path)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "RecipeError" in proc.stderr


def test_kv_dtype_aliases_in_a_recipe(tmp_path, capsys):
    """Item 6: bf16/fp16 name the unquantized KV cache in recipes too (pipeline/core/formats.py)."""
    path = _bad_recipe(tmp_path, "fp8", lambda d: d["quant"].update(kv_cache_dtype="bf16"))
    assert load_recipe(path).spec.quant.kv_cache_dtype == "auto"


def test_symlinked_recipe_from_outside_is_refused(tmp_path, capsys):
    """Item 31: a recipe whose file lives outside its model directory."""
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((SMOL / "fp8.yaml").read_text())
    model_dir = tmp_path / "recipes" / "smollm2-135m-instruct"
    shutil.copytree(SMOL, model_dir)
    (model_dir / "linked.yaml").symlink_to(outside)
    code, err = _run(capsys, "validate", str(model_dir / "linked.yaml"))
    assert code == 2
    assert f"linked.yaml: a symlink to {outside}, outside {model_dir}. Fix: copy the file into {model_dir}" in err


def test_validation_reads_the_definitions_it_is_given_not_the_working_directory(tmp_path, monkeypatch):
    recipe = load_recipe(ROOT / "recipes/smollm2-135m-instruct/fp8.yaml")
    monkeypatch.chdir(tmp_path)  # no calibration/ or eval/ here
    assert validate_recipe(recipe, load_catalog(), Definitions.of_checkout(ROOT))
    assert validate_recipe(recipe, load_catalog(), Definitions())  # a stage that reads neither
    (tmp_path / "suites").mkdir()
    with pytest.raises(ForgeError) as err:
        validate_recipe(recipe, load_catalog(), Definitions(calibration_dir=tmp_path, suites_dir=tmp_path / "suites"))
    assert "calibration.set: unknown calibration set 'generated-en'" in str(err.value)
    assert "eval.suite: unknown eval suite 'zero-shot'" in str(err.value)
