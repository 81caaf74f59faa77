"""The plain layout: written by forge, served by a plain static HTTP server (Python's http.server,
which answers no range requests), read by forge, by curl, by sha256sum, and by the Kubernetes init
container's exact command (deploy/kubernetes/init-container.yaml)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_registry import H200, NAME, make_bundle, metadata, tree

from pipeline import cli
from pipeline.core.errors import RegistryError, VerificationError
from pipeline.registry.backends import open_registry

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def static_server(directory: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d",
                             str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    registry = open_registry(f"plain+{root}")
    bundle = make_bundle(tmp_path)
    assert registry.publish(bundle, NAME, metadata()).version == "v1.0.0"
    registry.assign_stage(NAME, "v1.0.0", "prod")
    with static_server(root) as url:
        yield root, url, bundle


def test_layout_is_plain_files_with_sha256sums_and_forge_json(served):
    root, _, bundle = served
    version_dir = root / NAME / "v1.0.0"
    assert tree(version_dir).keys() == {*tree(bundle), "SHA256SUMS", "forge.json"}
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], check=False, cwd=version_dir).returncode == 0
    forge = json.loads((version_dir / "forge.json").read_text())
    assert (forge["name"], forge["version"], forge["metadata"]["gpu"]) == (NAME, "v1.0.0", "h200")
    assert json.loads((root / NAME / "index.json").read_text()) == {"stages": {"prod": "v1.0.0"},
                                                                   "versions": ["v1.0.0"]}


def test_forge_pulls_over_http_without_range_requests(served, tmp_path, capsys):
    _, url, bundle = served
    dest = tmp_path / "pulled"
    assert cli.main(["pull", NAME, "--stage", "prod", "--registry", url, "--dest", str(dest)]) == 0
    assert f"pulled {NAME} v1.0.0 into {dest}" in capsys.readouterr().out
    got = tree(dest)
    assert json.loads(got.pop("forge-artifact.json"))["version"] == "v1.0.0"
    got.pop("SHA256SUMS")
    assert got == tree(bundle)
    assert cli.main(["list", "--registry", url, "--json"]) == 0
    assert [row["name"] for row in json.loads(capsys.readouterr().out)] == [NAME]
    assert cli.main(["list", "--registry", url, "--gpu", "h100", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["compatible"] and row["selected"] and "built for h200, same compute capability" in row["reason"]


def test_curl_fetches_a_version_directory_as_is(served, tmp_path):
    _, url, bundle = served
    out = tmp_path / "curl"
    out.mkdir()
    base = f"{url}/{NAME}/v1.0.0"
    subprocess.run(["curl", "-fsS", "--max-time", "30", "-o", "SHA256SUMS", f"{base}/SHA256SUMS"], cwd=out, check=True)
    for line in (out / "SHA256SUMS").read_text().splitlines():
        path = line.split("  ", 1)[1]
        subprocess.run(["curl", "-fsS", "--max-time", "30", "--create-dirs", "-o", path, f"{base}/{path}"], cwd=out,
                       check=True)
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], check=False, cwd=out).returncode == 0
    assert {k: v for k, v in tree(out).items() if k != "SHA256SUMS"} == tree(bundle)


def test_kubernetes_init_container_command_runs_as_written(served, tmp_path):
    _, url, bundle = served
    pod = next(doc for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes/init-container.yaml").read_text())
               if doc["kind"] == "Pod")
    [init] = pod["spec"]["initContainers"]
    env = {e["name"]: e["value"] for e in init["env"]}
    dest = tmp_path / "models"
    dest.mkdir()
    env.update(ARTIFACT_URL=f"{url}/{NAME}/v1.0.0", DEST=str(dest), PATH="/usr/bin:/bin")
    done = subprocess.run(init["command"], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "checkpoint/model.safetensors: OK" in done.stdout
    assert {k: v for k, v in tree(dest).items() if k != "SHA256SUMS"} == tree(bundle)


def test_tampered_or_missing_file_is_refused_over_http(served, tmp_path):
    root, url, _ = served
    target = root / NAME / "v1.0.0" / "checkpoint" / "model.safetensors"
    target.write_bytes(b"Y" + target.read_bytes()[1:])
    with pytest.raises(VerificationError, match="file checkpoint/model.safetensors: expected sha256"):
        open_registry(url).pull(NAME, tmp_path / "d1", local_gpu=H200)
    target.unlink()
    with pytest.raises(VerificationError, match="file checkpoint/model.safetensors is missing from the registry"):
        open_registry(url).pull(NAME, tmp_path / "d2")
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


def test_http_url_that_is_not_a_plain_layout_is_one_line(tmp_path, capsys):
    (tmp_path / "www").mkdir()
    with static_server(tmp_path / "www") as url:
        assert cli.main(["list", "--registry", url]) == 2
    assert capsys.readouterr().err.strip() == (f"error: registry {url}: has no index.json: not a forge plain-layout "
                                               "registry. Fix: publish with --registry plain+DIR and serve that "
                                               "directory.")
    with pytest.raises(RegistryError, match="is read-only over HTTP"):
        open_registry("http://127.0.0.1:9/x").publish(make_bundle(tmp_path), NAME, metadata())


def _race(args):
    url, bundle, seed, barrier = args
    barrier.wait()
    return open_registry(url).publish(Path(bundle), NAME, metadata(gate={"verdict": "pass", "n": seed})).version


def test_racing_plain_publishers_get_distinct_versions(tmp_path):
    url = f"plain+{tmp_path / 'plain'}"
    bundles = [str(make_bundle(tmp_path, seed=f"p{i}")) for i in range(4)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        versions = pool.map(_race, [(url, b, i, barrier) for i, b in enumerate(bundles)], chunksize=1)
    assert sorted(versions) == ["v1.0.0", "v1.0.1", "v1.0.2", "v1.0.3"]
    registry = open_registry(url)
    assert {registry.get_manifest(NAME, v)["metadata"]["gate"]["n"] for v in versions} == {0, 1, 2, 3}
    for v in versions:
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], check=False, cwd=tmp_path / "plain" / NAME / v).returncode == 0


@pytest.mark.parametrize("url, extra", [("s3://bucket/forge", "s3"), ("gs://bucket/forge", "gcs")])
def test_object_stores_without_their_extra_name_it(url, extra, capsys):
    try:
        __import__({"s3": "s3fs", "gcs": "gcsfs"}[extra])
    except ImportError:
        pass
    else:
        pytest.skip(f"the {extra} extra is installed here")
    assert cli.main(["list", "--registry", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: registry {url}: {url.split(':')[0]}:// needs a package that is not installed")
    assert err.rstrip().endswith(f"Fix: pip install 'forge-quant[{extra}]'.") and "Traceback" not in err


def test_promote_over_http_is_refused_and_through_the_served_directory_it_is_seen(served, tmp_path, capsys):
    """Issue 26 item 9: a plain layout served over HTTP is read only; promotion goes to the directory it serves."""
    root, url, _ = served
    open_registry(f"plain+{root}").publish(make_bundle(tmp_path, "b"), NAME, metadata())
    assert cli.main(["promote", NAME, "--version", "v1.0.1", "--to", "prod", "--registry", url]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: registry {url}: is read-only over HTTP: nothing can be published or promoted through it. "
        "Fix: write to the directory or bucket the server serves (--registry plain+DIR).")
    assert cli.main(["promote", NAME, "--version", "v1.0.1", "--to", "prod", "--registry", f"plain+{root}"]) == 0
    assert "(it pointed at v1.0.0)" in capsys.readouterr().out
    assert cli.main(["pull", NAME, "--stage", "prod", "--registry", url, "--dest", str(tmp_path / "d")]) == 0
    assert f"pulled {NAME} v1.0.1 into" in capsys.readouterr().out
