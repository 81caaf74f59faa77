"""forge against a real OCI registry (Debian's docker-registry, distribution 2.8) on loopback, with
htpasswd auth: publish, pull with forge, fetch with curl alone, tampering, anonymous push, races."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_registry import H200, NAME, make_bundle, metadata, tree

from pipeline import cli
from pipeline.core.errors import RegistryError, VerificationError
from pipeline.registry.backends import open_registry
from pipeline.registry.oci import CONFIG_MEDIA_TYPE, OCI_MANIFEST, OciRegistry

ACCEPT = f"Accept: {OCI_MANIFEST}"


def curl(oci, *args: str, auth: bool = True) -> bytes:
    """Plain curl, no forge: what an init container without forge would run."""
    cmd = ["curl", "-fsS", "--max-time", "30", *(["-u", f"{oci.user}:{oci.password}"] if auth else []), *args]
    return subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout


def without_pull_files(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k not in ("forge-artifact.json", "SHA256SUMS")}


def test_publish_pull_with_forge_and_with_curl_byte_identical(oci, logged_in, tmp_path, capsys):
    bundle = make_bundle(tmp_path)
    registry = open_registry(logged_in)
    assert isinstance(registry, OciRegistry)
    first = registry.publish(bundle, NAME, metadata())
    assert (first.version, first.created) == ("v1.0.0", True)
    assert registry.publish(bundle, NAME, metadata()).created is False  # same content: no new version
    registry.assign_stage(NAME, "v1.0.0", "staging")

    # forge, through the CLI
    dest = tmp_path / "forge-pulled"
    assert cli.main(["pull", NAME, "--stage", "staging", "--registry", logged_in, "--dest", str(dest)]) == 0
    assert f"pulled {NAME} v1.0.0 into {dest}" in capsys.readouterr().out
    assert without_pull_files(tree(dest)) == tree(bundle)
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], check=False, cwd=dest).returncode == 0

    # curl: /v2/<repo>/manifests/<tag>, then /blobs/<digest> per layer, titled by path
    repo = f"http://{oci.host}/v2/forge/{NAME}"
    assert set(json.loads(curl(oci, f"{repo}/tags/list"))["tags"]) >= {"v1.0.0", "staging"}
    manifest = json.loads(curl(oci, "-H", ACCEPT, f"{repo}/manifests/v1.0.0"))
    assert manifest["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    notes = manifest["annotations"]
    assert notes["dev.forge.model"] == "smollm2-135m-instruct" and notes["dev.forge.gpu"] == "h200"
    assert notes["dev.forge.compute-capability"] == "9.0" and notes["dev.forge.gate-verdict"] == "pass"
    assert notes["dev.forge.engine-compatibility"] == "tensorrt_llm==1.2.1 (pytorch backend), compute capability 9.0"
    assert json.loads(notes["dev.forge.tool-versions"]) == {"modelopt": "0.47.0", "tensorrt_llm": "1.2.1"}
    config = json.loads(curl(oci, f"{repo}/blobs/{manifest['config']['digest']}"))
    assert config["name"] == NAME and config["metadata"]["format"] == "fp8"
    fetched = tmp_path / "curl-fetched"
    for layer in manifest["layers"]:
        title = layer["annotations"]["org.opencontainers.image.title"]
        curl(oci, "--create-dirs", "-o", str(fetched / title), f"{repo}/blobs/{layer['digest']}")
        assert "sha256:" + hashlib.sha256((fetched / title).read_bytes()).hexdigest() == layer["digest"]
    assert tree(fetched) == tree(bundle) == without_pull_files(tree(dest))
    # the stage tag is the version's manifest
    assert curl(oci, "-H", ACCEPT, f"{repo}/manifests/staging") == curl(oci, "-H", ACCEPT, f"{repo}/manifests/v1.0.0")


def _blob_file(oci, digest: str) -> Path:
    hexdigest = digest.split(":", 1)[1]
    return oci.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def test_tampered_and_missing_blobs_are_refused(oci, logged_in, tmp_path):
    name = "tamper-fp8-h200"
    bundle = make_bundle(tmp_path, seed="tamper")
    registry = OciRegistry(logged_in)
    registry.publish(bundle, name, metadata())
    layer = next(m for m in registry.get_manifest(name)["files"] if m["relpath"] == "checkpoint/model.safetensors")
    blob = _blob_file(oci, f"sha256:{layer['sha256']}")
    original = blob.read_bytes()
    blob.write_bytes(b"X" + original[1:])  # same size, one byte changed, behind the registry's back
    with pytest.raises(VerificationError) as err:
        registry.pull(name, tmp_path / "d1", local_gpu=H200)
    assert f"file checkpoint/model.safetensors: expected sha256 {layer['sha256']}" in str(err.value)
    assert not (tmp_path / "d1").exists() and not list(tmp_path.glob(".d1.partial-*"))
    blob.unlink()
    with pytest.raises(VerificationError, match=f"blob sha256:{layer['sha256']} is missing from the registry"):
        registry.pull(name, tmp_path / "d2")
    blob.write_bytes(original)
    assert registry.pull(name, tmp_path / "d3").files == 5


def test_anonymous_push_is_refused(oci, anonymous, tmp_path):
    with pytest.raises(RegistryError) as err:
        OciRegistry(anonymous).publish(make_bundle(tmp_path), "anon-fp8-h200", metadata())
    assert "401 unauthorized (no valid credentials for" in str(err.value)
    assert "docker login HOST" in str(err.value) and "ORAS_USER" in str(err.value)
    # and the protocol itself, without forge: starting a blob upload anonymously is refused
    answer = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                             f"http://{oci.host}/v2/forge/anon-fp8-h200/blobs/uploads/"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert answer.stdout == "401"


def _race(args):
    url, bundle, seed, barrier, config = args
    os.environ["DOCKER_CONFIG"] = config
    barrier.wait()
    return OciRegistry(url).publish(Path(bundle), "race-fp8-h200", metadata(gate={"verdict": "pass", "n": seed})).version


def test_racing_publishers_get_distinct_versions(oci, logged_in, tmp_path):
    bundles = [str(make_bundle(tmp_path, seed=f"r{i}")) for i in range(3)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            versions = pool.map(_race, [(logged_in, b, i, barrier, os.environ["DOCKER_CONFIG"])
                                        for i, b in enumerate(bundles)], chunksize=1)
    assert sorted(versions) == ["v1.0.0", "v1.0.1", "v1.0.2"]
    registry = OciRegistry(logged_in)
    for version in versions:  # each version holds one publisher's content, whole
        assert registry.get_manifest("race-fp8-h200", version)["metadata"]["gate"]["n"] in (0, 1, 2)
    assert {registry.get_manifest("race-fp8-h200", v)["metadata"]["gate"]["n"] for v in versions} == {0, 1, 2}
    # every claim tag the race used was deleted once decided (issue 26 item 8): tag lists show versions only
    tags = json.loads(curl(oci, f"http://{oci.host}/v2/forge/race-fp8-h200/tags/list"))["tags"]
    assert sorted(tags) == ["v1.0.0", "v1.0.1", "v1.0.2"]


def test_unreachable_and_malformed_oci_urls_are_one_line(tmp_path):
    with pytest.raises(RegistryError, match=r"oci\+http://127.0.0.1:9/forge: cannot be reached"):
        OciRegistry("oci+http://127.0.0.1:9/forge").versions("x")
    with pytest.raises(RegistryError, match="is not an OCI registry URL. Fix: write oci://HOST"):
        open_registry("oci://no-namespace")


# ---- issue 26: promotion as a registry operation, claim tags, pulling again


def test_promote_moves_the_stage_tag_and_pull_by_stage_follows(oci, logged_in, tmp_path, capsys, monkeypatch):
    name = "promote-fp8-h200"
    registry = OciRegistry(logged_in)
    registry.publish(make_bundle(tmp_path, seed="p0"), name, metadata())
    registry.publish(make_bundle(tmp_path, seed="p1"), name, metadata())
    monkeypatch.chdir(tmp_path)  # anywhere: no checkout
    repo = f"http://{oci.host}/v2/forge/{name}"
    # the claim tags a publish races with are gone once it is decided: versions only
    assert json.loads(curl(oci, f"{repo}/tags/list"))["tags"] == ["v1.0.0", "v1.0.1"]

    assert cli.main(["promote", name, "--version", "1.0.0", "--to", "prod", "--registry", logged_in]) == 0
    assert capsys.readouterr().out == (f"promoted {name} v1.0.0 to prod (a new stage) in {logged_in}; "
                                       f"`forge pull {name} --stage prod` gets v1.0.0\n")
    assert curl(oci, "-H", ACCEPT, f"{repo}/manifests/prod") == curl(oci, "-H", ACCEPT, f"{repo}/manifests/v1.0.0")
    dest = tmp_path / "prod"
    assert cli.main(["pull", name, "--stage", "prod", "--registry", logged_in, "--dest", str(dest)]) == 0
    assert f"pulled {name} v1.0.0 into {dest}" in capsys.readouterr().out
    assert without_pull_files(tree(dest)) == tree(tmp_path / "bundle-p0")

    assert cli.main(["promote", name, "--version", "v1.0.1", "--to", "prod", "--registry", logged_in]) == 0
    assert "(it pointed at v1.0.0)" in capsys.readouterr().out
    assert cli.main(["promote", name, "--from", "prod", "--to", "canary", "--registry", logged_in]) == 0
    assert registry.stages(name) == {"canary": "v1.0.1", "prod": "v1.0.1"}
    assert cli.main(["promote", name, "--version", "v1.0.1", "--to", "prod", "--registry", logged_in]) == 0
    assert capsys.readouterr().out.endswith(f"{name}: prod already points at v1.0.1; nothing changed\n")
    again = tmp_path / "prod-again"
    assert cli.main(["pull", name, "--stage", "prod", "--registry", logged_in, "--dest", str(again)]) == 0
    assert without_pull_files(tree(again)) == tree(tmp_path / "bundle-p1")
    assert sorted(json.loads(curl(oci, f"{repo}/tags/list"))["tags"]) == ["canary", "prod", "v1.0.0", "v1.0.1"]


def test_promote_without_credentials_is_refused_in_one_line(oci, logged_in, tmp_path, capsys, monkeypatch):
    name = "anon-promote-fp8-h200"
    OciRegistry(logged_in).publish(make_bundle(tmp_path), name, metadata())
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.main(["promote", name, "--version", "v1.0.0", "--to", "prod", "--registry", logged_in]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: registry {logged_in}: ") and "401 unauthorized" in err and "docker login" in err


def test_pulling_again_from_oci_is_a_verified_no_op(oci, logged_in, tmp_path, capsys):
    name = "again-fp8-h200"
    OciRegistry(logged_in).publish(make_bundle(tmp_path), name, metadata())
    argv = ["pull", name, "--registry", logged_in, "--dest", str(tmp_path / "d")]
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"already present, verified: {name} v1.0.0 in {tmp_path / 'd'}: 5 files")
