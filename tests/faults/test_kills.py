"""Fault injection: kill -9 in the middle of a stage (issue 12, items 32 and the kill cases).

A stage writes into `.<out>.tmp-*` beside its output and renames it at the end, holding an flock
on it meanwhile (pipeline/core/files.py staged_output). Killed with SIGKILL, it leaves no output,
only that directory; the next writer into the same parent removes it, and never touches the
directory of a writer that is still alive. The kills here are real: a `forge` subprocess on a
tiny Llama, paused at a known point (after ModelOpt's export; after the bundle's checkpoint is
linked) by wrapping one function so that it signals and sleeps, then sent SIGKILL. Every wait is
bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as forge
from pipeline.core.files import collect_leftovers, staged_output

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 240.0  # importing torch + ModelOpt in a subprocess on a loaded 2-core machine


@pytest.fixture(scope="module")
def workspace(tiny_llama, tmp_path_factory):
    """recipes/tiny-llama (local source, fp8 -> h200), downloaded and with its calibration set."""
    root = tmp_path_factory.mktemp("kills")
    for name in ("calibration", "eval"):
        (root / name).symlink_to(ROOT / name)
    (root / "recipes/tiny-llama").mkdir(parents=True)
    shutil.copy(tiny_llama.model_dir / "config.json", root / "recipes/tiny-llama/config.json")
    (root / "recipes/tiny-llama/model.yaml").write_text(yaml.safe_dump({
        "source": {"kind": "local", "path": str(tiny_llama.model_dir)}, "eval": {"suite": "smoke"}}))
    (root / "recipes/tiny-llama/fp8.yaml").write_text(yaml.safe_dump({
        "quant": {"format": "fp8", "kv_cache_dtype": "fp8"},
        "calibration": {"set": "generated-en", "num_samples": 4, "seq_len": 32},
        "targets": {"h200": {"max_input_len": 256, "max_output_len": 256, "concurrency": 8}},
        "eval": {"suite": "smoke"}}))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert forge(["download", "recipes/tiny-llama/model.yaml", "--out", "data/models/tiny-llama"]) == 0
        assert forge(["calibration-set", "recipes/tiny-llama/fp8.yaml", "--model", "data/models/tiny-llama",
                      "--out", "data/calibration/tiny-llama-fp8"]) == 0
    finally:
        os.chdir(cwd)
    return root


CALIBRATE = ["calibrate", "recipes/tiny-llama/fp8.yaml", "--model", "data/models/tiny-llama", "--calibration",
             "data/calibration/tiny-llama-fp8", "--out", "data/quantized/tiny-llama-fp8",
             "--metrics", "metrics/calibrate/tiny-llama-fp8.json"]
BUILD = ["build", "recipes/tiny-llama/fp8.yaml", "--gpu", "h200", "--quantized", "data/quantized/tiny-llama-fp8",
         "--out", "data/bundles/tiny-llama-fp8-h200", "--metrics", "metrics/build/tiny-llama-fp8-h200.json"]


def run_paused(cwd: Path, argv: list[str], module: str, function: str, flag: Path) -> subprocess.Popen:
    """`forge argv` in a subprocess, with module.function wrapped to touch `flag` and sleep once it returns."""
    code = textwrap.dedent(f"""
        import importlib, pathlib, sys, time
        module = importlib.import_module({module!r})
        real = getattr(module, {function!r})
        def paused(*args, **kwargs):
            out = real(*args, **kwargs)
            pathlib.Path({str(flag)!r}).write_text("paused")
            time.sleep(600)
            return out
        setattr(module, {function!r}, paused)
        from pipeline.cli import main
        sys.exit(main({argv!r}))
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when_paused(process: subprocess.Popen, flag: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    try:
        while not flag.exists():
            if process.poll() is not None:
                pytest.fail(f"the stage ended (rc {process.returncode}) before the kill point: "
                            f"{process.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the stage did not reach the kill point within {WAIT_S:.0f} s")
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        process.stderr.close()


def leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*"))


def test_kill_9_in_calibrate_leaves_no_output_and_the_next_run_cleans_up(workspace, tmp_path):
    out = workspace / "data/quantized/tiny-llama-fp8"
    # Paused after ModelOpt wrote the whole checkpoint into the temporary directory: the worst moment.
    process = run_paused(workspace, CALIBRATE, "pipeline.quant.hf_export", "export_unified", tmp_path / "flag")
    kill_when_paused(process, tmp_path / "flag")
    assert not out.exists(), "a killed calibrate must leave no output"
    assert not (workspace / "metrics/calibrate/tiny-llama-fp8.json").exists()
    left = leftovers(out.parent, out.name)
    assert len(left) == 1 and list(left[0].glob("checkpoint/*.safetensors")), "the partial export is where it was written"

    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        assert forge(CALIBRATE) == 0
    finally:
        os.chdir(cwd)
    assert leftovers(out.parent, out.name) == [] and not left[0].exists()
    assert json.loads((out / "manifest.json").read_text())["stage"] == "calibrate"


def test_kill_9_in_build_leaves_no_bundle_and_the_next_run_cleans_up(workspace, tmp_path):
    quantized = workspace / "data/quantized/tiny-llama-fp8"
    if not (quantized / "manifest.json").is_file():
        cwd = os.getcwd()
        os.chdir(workspace)
        try:
            assert forge(CALIBRATE) == 0
        finally:
            os.chdir(cwd)
    out = workspace / "data/bundles/tiny-llama-fp8-h200"
    # Paused after the checkpoint was hard-linked and the options written, before the manifest.
    process = run_paused(workspace, BUILD, "pipeline.stages.build", "write_options", tmp_path / "flag")
    kill_when_paused(process, tmp_path / "flag")
    assert not out.exists() and not (workspace / "metrics/build/tiny-llama-fp8-h200.json").exists()
    left = leftovers(out.parent, out.name)
    assert len(left) == 1 and (left[0] / "llm_api_options.yaml").is_file() and not (left[0] / "manifest.json").exists()

    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        assert forge(BUILD + ["--load-test", "never"]) == 0
    finally:
        os.chdir(cwd)
    assert leftovers(out.parent, out.name) == []
    assert json.loads((out / "manifest.json").read_text())["stage"] == "build"


def test_a_live_writers_directory_is_never_collected(tmp_path):
    """Another process inside staged_output holds its directory's flock: collection skips it; once
    that process is killed with -9, the lock is gone and the directory is collected."""
    flag = tmp_path / "flag"
    code = textwrap.dedent(f"""
        import pathlib, time
        from pipeline.core.files import staged_output
        with staged_output(pathlib.Path({str(tmp_path / 'out')!r})) as tmp:
            (tmp / "part.bin").write_bytes(b"x" * 1000)
            pathlib.Path({str(flag)!r}).write_text(str(tmp))
            time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer did not start within 60 s"
            time.sleep(0.05)
        live = Path(flag.read_text())
        assert collect_leftovers(tmp_path) == [] and (live / "part.bin").is_file()
        with staged_output(tmp_path / "out") as mine:  # a second writer of the same output
            assert (live / "part.bin").is_file() and mine != live
        assert (live / "part.bin").is_file()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert collect_leftovers(tmp_path) == [live] and not live.exists()
        assert (tmp_path / "out").is_dir()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        process.stderr.close()
