"""Fault injection, bad recipes and hostile input (issue 12, items 24, 27, 31): every case ends in
one bounded error naming the file, in bounded time, with no traceback and no echo of the input.

The slow-to-fail cases (billion laughs, 20,000 nested brackets, a 10 MB file) run in a subprocess
with a timeout, so a regression shows up as a failed test rather than a hung suite.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMOL = ROOT / "recipes/smollm2-135m-instruct"
# Every case must fail well inside this; the subprocess timeout is the hard stop.
FAST_S = 10
HARD_TIMEOUT_S = 60
# One line of "error: <file>:<line>: <problem> Fix: <fix>" stays short whatever the input was.
MAX_MESSAGE_CHARS = 600


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    target = tmp_path / "recipes" / "smollm2-135m-instruct"
    shutil.copytree(SMOL, target)
    return target


def _validate_subprocess(path: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=HARD_TIMEOUT_S, check=False)
    return proc, time.monotonic() - start


def _validate(capsys, path: Path) -> tuple[int, str, float]:
    start = time.monotonic()
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err, time.monotonic() - start


def _assert_one_clear_line(err: str, path: Path, *expected: str) -> None:
    assert err.startswith(f"error: {path}"), err[:300]
    assert err.count("\n") == 1 and len(err) < MAX_MESSAGE_CHARS, err[:300]
    assert "Traceback" not in err and " Fix: " in err
    for text in expected:
        assert text in err, err


# ---------------------------------------------------------------------------- item 24


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """9 levels of 9 aliases inside quant.format: 9^9 = 387 million strings once expanded."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    lines.append(f"quant:\n  format: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_billion_laughs_fails_fast_with_a_clear_error(model_dir):
    path = model_dir / "fp8.yaml"
    path.write_text(billion_laughs())
    proc, elapsed = _validate_subprocess(path)
    assert proc.returncode == 2
    assert elapsed < FAST_S, f"took {elapsed:.1f} s"
    _assert_one_clear_line(proc.stderr, path, "anchors and aliases expand to more than 10,000 nodes.",
                           "Fix: write the values out, or use fewer aliases.")
    assert "lol" not in proc.stderr  # the input is never echoed


def test_small_aliases_still_work(model_dir, capsys):
    """Anchors are legitimate YAML: one target shape shared by two GPUs validates."""
    path = model_dir / "fp8.yaml"
    data = yaml.safe_load(path.read_text())
    shape = yaml.safe_dump({"h200": data["targets"]["h200"]})
    text = path.read_text().replace("targets:\n  h200:", "targets:\n  h200: &shape", 1)
    text = text.replace("calibration:", "  h100: *shape\ncalibration:", 1)
    path.write_text(text)
    assert shape and main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_oversized_recipe_is_refused_before_parsing(model_dir):
    path = model_dir / "fp8.yaml"
    padding = "# " + "x" * 1000 + "\n"
    path.write_text(SMOL.joinpath("fp8.yaml").read_text() + padding * 10_400)  # ~10.4 MB, as in the run
    proc, elapsed = _validate_subprocess(path)
    assert proc.returncode == 2 and elapsed < FAST_S
    _assert_one_clear_line(proc.stderr, path, "bytes, over the 262,144-byte limit for a YAML file.")


def test_a_long_bad_value_is_not_echoed(model_dir, capsys):
    path = model_dir / "fp8.yaml"
    data = yaml.safe_load(path.read_text())
    data["quant"]["format"] = "fp" + "8" * 100_000
    path.write_text(yaml.safe_dump(data))
    code, err, _ = _validate(capsys, path)
    assert code == 2
    _assert_one_clear_line(err, path, "quant.format: input should be 'fp8', 'nvfp4', 'mxfp4' or 'w4a8_mxfp4_fp8', got 'fp888")
    assert "…" in err


def test_a_long_unknown_key_is_not_echoed(model_dir, capsys):
    path = model_dir / "fp8.yaml"
    data = yaml.safe_load(path.read_text())
    data["k" * 50_000] = 1
    path.write_text(yaml.safe_dump(data, width=10**6))
    code, err, _ = _validate(capsys, path)
    assert code == 2 and len(err) < 2 * MAX_MESSAGE_CHARS and "unknown key 'kkkk" in err


# ---------------------------------------------------------------------------- item 27


def test_duplicate_top_level_block_is_refused(model_dir, capsys):
    """A second `targets:` block would silently replace the first (the h200 target vanished)."""
    path = model_dir / "fp8.yaml"
    path.write_text(path.read_text() + "targets:\n  b200:\n    max_input_len: 1024\n    max_output_len: 1024\n")
    code, err, _ = _validate(capsys, path)
    assert code == 2
    first = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith("targets:"))
    _assert_one_clear_line(err, path, f"duplicate key 'targets' in the top level (first at line {first}); "
                           "YAML would silently keep only the last. Fix: merge the two 'targets' blocks into one.")


def test_duplicate_nested_key_is_refused(model_dir, capsys):
    path = model_dir / "fp8.yaml"
    path.write_text(path.read_text().replace("    tp: 1\n", "    tp: 1\n    tp: 2\n", 1))
    code, err, _ = _validate(capsys, path)
    assert code == 2
    _assert_one_clear_line(err, path, "duplicate key 'tp' in targets.h200", "Fix: merge the two 'targets.h200.tp'")


# ---------------------------------------------------------------------------- item 31


def test_non_utf8_recipe(model_dir, capsys):
    path = model_dir / "fp8.yaml"
    path.write_bytes(path.read_bytes().replace(b"fp8", b"fp\xff8", 1))
    code, err, _ = _validate(capsys, path)
    assert code == 2
    _assert_one_clear_line(err, path, "not UTF-8 text (byte 0xff at offset", "Fix: save the file as UTF-8.")


def test_deep_nesting_is_refused_without_recursion_error(model_dir):
    path = model_dir / "fp8.yaml"
    path.write_text("quant: " + "[" * 20_000 + "]" * 20_000 + "\n")
    proc, elapsed = _validate_subprocess(path)
    assert proc.returncode == 2 and elapsed < FAST_S
    _assert_one_clear_line(proc.stderr, path, "nested deeper than 32 levels.")
    assert "RecursionError" not in proc.stderr


def test_recursive_alias_is_refused(model_dir, capsys):
    path = model_dir / "fp8.yaml"
    path.write_text("quant: &loop\n  format: fp8\n  exclude: [*loop]\n")
    code, err, _ = _validate(capsys, path)
    assert code == 2
    _assert_one_clear_line(err, path, "an alias refers to its own anchor (a recursive structure).")


def test_deeply_nested_config_json(model_dir, capsys):
    (model_dir / "config.json").write_text("[" * 20_000 + "]" * 20_000)
    path = model_dir / "fp8.yaml"
    code, err, _ = _validate(capsys, path)
    assert code == 2 and "RecursionError" not in err
    assert f"error: {model_dir / 'config.json'}: nested too deeply to be a model config." in err


def test_symlinked_model_yaml_from_outside(model_dir, tmp_path, capsys):
    outside = tmp_path / "model.yaml"
    shutil.move(model_dir / "model.yaml", outside)
    (model_dir / "model.yaml").symlink_to(outside)
    code, err, _ = _validate(capsys, model_dir / "fp8.yaml")
    assert code == 2 and f"model.yaml: a symlink to {outside}, outside {model_dir}." in err


def test_architecture_must_be_beside_model_yaml(model_dir, capsys):
    path = model_dir / "model.yaml"
    path.write_text(path.read_text() + "architecture: ../../etc/config.json\n")
    code, err, _ = _validate(capsys, model_dir / "fp8.yaml")
    assert code == 2
    assert "model.yaml: architecture: Value error, architecture is a file name beside model.yaml" in err


def test_tokenizer_auto_map_is_refused_like_config_auto_map(tmp_path):
    """No code runs either way; the refusal replaces a transformers traceback deep in loading."""
    from pipeline.core.errors import SourceError
    from pipeline.sources.models import copy_local

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"")
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    with pytest.raises(SourceError) as info:
        copy_local(model, tmp_path / "out")
    assert ("tokenizer_config.json has auto_map ['AutoTokenizer']: the tokenizer needs its own Python code. "
            "Fix: Review that code, then set trust_remote_code: true in the recipe.") in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_long_target_key_is_not_echoed(model_dir, capsys):
    path = model_dir / "fp8.yaml"
    data = yaml.safe_load(path.read_text())
    data["targets"]["g" * 100_000] = data["targets"]["h200"]
    path.write_text(yaml.safe_dump(data, width=10**6))
    code, err, _ = _validate(capsys, path)
    assert code == 2 and len(err) < MAX_MESSAGE_CHARS
    assert "unknown GPU 'gggg" in err and "…" in err


def test_many_problems_are_listed_up_to_a_bound(model_dir, capsys):
    path = model_dir / "fp8.yaml"
    data = yaml.safe_load(path.read_text())
    data["quant"].update({f"unknown_{i}": i for i in range(500)})
    path.write_text(yaml.safe_dump(data))
    code, err, _ = _validate(capsys, path)
    lines = err.splitlines()
    assert code == 2 and lines[0] == "error: 500 problems:"
    assert len(lines) == 22 and lines[-1] == "  ... and 480 more; fix these first."
