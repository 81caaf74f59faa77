"""The deployment install: a fresh venv with only the core distribution (no torch, ModelOpt, lm-eval,
DVC), `forge pull` from a folder outside the checkout, `sha256sum -c`, and files an unprivileged user
reads. Builds the wheel from this checkout with pip (about a minute on 2 cores)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_registry import NAME, make_bundle, metadata, tree

from pipeline.registry.directory import Registry

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "modelopt", "lm_eval", "dvc", "matplotlib", "transformers", "datasets")


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


@pytest.mark.slow
def test_slim_install_pulls_from_anywhere_and_files_are_world_readable(tmp_path):
    venv = tmp_path / "slim"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                         check=False, capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    for heavy in HEAVY:
        missing = subprocess.run([str(py), "-c", f"import {heavy}"], check=False, capture_output=True, timeout=60)
        assert missing.returncode != 0, f"{heavy} is installed by the slim distribution"
    print(f"slim venv: {_size_mb(venv):.1f} MB")

    registry = tmp_path / "registry"
    Registry(str(registry)).publish(make_bundle(tmp_path), NAME, metadata())
    elsewhere = Path(tempfile.mkdtemp(prefix="forge-slim-", dir="/tmp"))  # not the checkout; world-traversable
    try:
        os.chmod(elsewhere, 0o755)
        done = subprocess.run([str(venv / "bin" / "forge"), "pull", NAME, "--registry", str(registry), "--gpu", "h200",
                               "--dest", "served"], check=False, cwd=elsewhere, capture_output=True, text=True, timeout=120,
                              preexec_fn=lambda: os.umask(0o022))
        assert done.returncode == 0, done.stderr
        dest = elsewhere / "served"
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], check=False, cwd=dest).returncode == 0
        assert {k: v for k, v in tree(dest).items() if k not in ("SHA256SUMS", "forge-artifact.json")} == \
            tree(make_bundle(tmp_path / "again"))
        modes = {p.relative_to(dest).as_posix(): p.stat().st_mode & 0o777 for p in [dest, *dest.rglob("*")]}
        assert set(modes.values()) == {0o755, 0o644}, modes
        listed = subprocess.run([str(venv / "bin" / "forge"), "list", "--registry", str(registry), "--gpu", "h100"],
                                check=False, cwd=elsewhere, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0 and NAME in listed.stdout and "SELECTED" in listed.stdout, listed.stdout
        if os.geteuid() == 0 and shutil.which("runuser"):
            read = subprocess.run(["runuser", "-u", "nobody", "--", "sha256sum", "-c", "--quiet", "SHA256SUMS"],
                                  check=False, cwd=dest, capture_output=True, text=True, timeout=60)
            assert read.returncode == 0, read.stderr
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
