"""Fixtures for the deploy tests: a real OCI registry on loopback, and docker-config credentials."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: oci_server, unit helpers
from oci_server import running_registry


@pytest.fixture(scope="module")
def oci(tmp_path_factory):
    with running_registry(tmp_path_factory.mktemp("oci-registry")) as server:
        yield server


@pytest.fixture
def logged_in(oci, tmp_path, monkeypatch):
    """Credentials the standard way: a docker config.json under $DOCKER_CONFIG (what `docker login` writes)."""
    folder = tmp_path / "docker-config"
    folder.mkdir()
    token = base64.b64encode(f"{oci.user}:{oci.password}".encode()).decode()
    (folder / "config.json").write_text(json.dumps({"auths": {oci.host: {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(folder))
    monkeypatch.delenv("ORAS_USER", raising=False)
    monkeypatch.delenv("ORAS_PASS", raising=False)
    return f"oci+http://{oci.host}/forge"


@pytest.fixture
def anonymous(oci, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.docker/config.json either
    monkeypatch.delenv("ORAS_USER", raising=False)
    monkeypatch.delenv("ORAS_PASS", raising=False)
    return f"oci+http://{oci.host}/forge"
