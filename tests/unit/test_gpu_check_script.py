"""scripts/gpu_check.sh on a machine without CUDA: it lists what it would run, says so, exits 0,
and writes nothing. (On a CUDA machine it runs for real; see the script's header.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_without_cuda_it_prints_the_plan_and_skips(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA machine: the script runs its checks for real there")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "skipped: no CUDA"
    for step in ("pytest tests/gpu", "scripts/gpu_check.py", "bench/reference_vs_modelopt.py", "pipeline.cli probe"):
        assert any(step in line for line in lines), step
    assert not (tmp_path / "out").exists()


def test_gpu_check_py_skips_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    done = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "skipped: no CUDA"
    assert not (tmp_path / "r.json").exists()


def test_fp8_scaled_mm_check_runs_on_cpu():
    """The GPU check's real-FP8 path (exported FP8 weights + input scales through torch._scaled_mm)
    run here on the CPU, where torch 2.13 has an FP8 _scaled_mm: it must match ModelOpt's fake
    quant within the 0.5% perplexity tolerance the GPU run is held to."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    calib, heldout = gpu_check.token_rows(256, 8, 64, seed=1), gpu_check.token_rows(256, 4, 64, seed=2)
    result = gpu_check.check_fp8_scaled_mm(None, calib, heldout, device="cpu")
    assert result["fp8_linears"] == 2 * 7
    assert result["relative_difference"] <= gpu_check.PPL_TOLERANCE, result
    assert result["ok"] is True
