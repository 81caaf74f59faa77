"""The modelcar image and the ModelPack artifact forge publishes beside its own OCI artifact
(pipeline/registry/modelcar.py), taken from the consumer's side: Debian's skopeo copies them out of a real
registry (docker-registry on loopback, htpasswd auth) and umoci unpacks the image, as a container runtime
would lay out an image volume; every file under /models must be the bundle's, byte for byte."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_registry import NAME, make_bundle, metadata, tree

from pipeline.core.errors import VerificationError
from pipeline.registry import modelcar
from pipeline.registry.artifacts import bundle_files
from pipeline.registry.oci import OciRegistry


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:  # the consumer-side check is the acceptance of the modelcar work: fail, never skip
        raise RuntimeError(f"{name} not found. Fix: `make oci-registry` (apt-get install skopeo umoci).")
    return found


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr[-2000:]}"
    return done.stdout


def skopeo_copy(oci, repository: str, tag: str, layout: Path) -> None:
    """`skopeo copy docker://... oci:DIR:TAG`: plain HTTP (--src-tls-verify=false), the test's htpasswd user;
    --insecure-policy skips signature policy only (the digests are checked by skopeo and below). skopeo
    gzips uncompressed layers into an oci: layout unless told not to; --preserve-digests refuses any change."""
    run(tool("skopeo"), "--insecure-policy", "copy", "--dest-oci-accept-uncompressed-layers", "--preserve-digests",
        "--src-tls-verify=false", "--src-creds",
        f"{oci.user}:{oci.password}", f"docker://{oci.host}/forge/{repository}:{tag}", f"oci:{layout}:{tag}")


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}


def layout_manifest(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    return json.loads(layout_blob(layout, entry["digest"]))


def layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def test_modelcar_image_unpacked_by_skopeo_and_umoci_is_the_bundle(oci, logged_in, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(modelcar, "OWN_LAYER_BYTES", 100_000)  # the 131 kB safetensors file gets its own layer
    bundle = make_bundle(tmp_path)
    registry = OciRegistry(logged_in)
    with caplog.at_level(logging.INFO, logger="pipeline.registry.modelcar"):
        assert registry.publish(bundle, NAME, metadata()).version == "v1.0.0"
    where = f"oci://{oci.host}/forge/{NAME}"
    assert f"published {NAME} v1.0.0 as a modelcar image: {where}/modelcar:v1.0.0 (2 layers, " in caplog.text
    assert f"published {NAME} v1.0.0 as a ModelPack artifact: {where}/modelpack:v1.0.0 (5 layers, 132,167 bytes" \
           in caplog.text
    registry.assign_stage(NAME, "v1.0.0", "prod")  # the forms' stage tags follow the artifact's

    layout, unpacked = tmp_path / "layout", tmp_path / "unpacked"
    skopeo_copy(oci, f"{NAME}/modelcar", "prod", layout)
    run(tool("umoci"), "unpack", "--rootless", "--image", f"{layout}:prod", str(unpacked))
    models = unpacked / "rootfs" / "models"
    assert sha256s(tree(models)) == sha256s(tree(bundle))  # every file, byte-identical, nothing else
    assert sorted(p.name for p in (unpacked / "rootfs").iterdir()) == ["models"]
    for path in models.rglob("*"):  # fixed attributes: readable by a server running as another user
        assert (path.stat().st_mode & 0o777, path.stat().st_mtime) == ((0o755 if path.is_dir() else 0o644), 0)

    image = layout_manifest(layout, "prod")
    assert [layer["mediaType"] for layer in image["layers"]] == [modelcar.IMAGE_LAYER] * 2
    config = json.loads(layout_blob(layout, image["config"]["digest"]))
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    labels = config["config"]["Labels"]
    assert labels["dev.forge.gpu"] == "h200" and labels["dev.forge.format"] == "fp8"
    assert labels["org.opencontainers.image.version"] == "v1.0.0" and "org.opencontainers.image.created" not in labels
    inspected = json.loads(run(tool("skopeo"), "inspect", "--tls-verify=false", "--creds", f"{oci.user}:{oci.password}",
                               f"docker://{oci.host}/forge/{NAME}/modelcar:v1.0.0"))
    assert inspected["Labels"]["dev.forge.compute-capability"] == "9.0"
    assert inspected["Digest"] == layout_index_digest(layout)  # v1.0.0 and prod: one image
    assert registry.versions(NAME) == ["v1.0.0"] and NAME + "/modelcar" not in registry.names()


def layout_index_digest(layout: Path) -> str:
    return json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]


def test_modelpack_artifact_copied_by_skopeo_holds_the_bundle(oci, logged_in, tmp_path):
    bundle = make_bundle(tmp_path, seed="mp")
    name = "modelpack-fp8-h200"
    OciRegistry(logged_in).publish(bundle, name, metadata())
    layout = tmp_path / "layout"
    skopeo_copy(oci, f"{name}/modelpack", "v1.0.0", layout)
    artifact = layout_manifest(layout, "v1.0.0")
    # model-spec docs/spec.md: the manifest's artifactType and config media type; specs-go/v1/mediatype.go
    assert artifact["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert artifact["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    files = {layer["annotations"]["org.cncf.model.filepath"]: layer for layer in artifact["layers"]}
    assert {path: layer["mediaType"] for path, layer in files.items()} == {
        "checkpoint/config.json": "application/vnd.cncf.model.weight.config.v1.raw",
        "checkpoint/model.safetensors": "application/vnd.cncf.model.weight.v1.raw",
        "checkpoint/shards/rank0.safetensors": "application/vnd.cncf.model.weight.v1.raw",
        "empty.txt": "application/vnd.cncf.model.doc.v1.raw",
        "llm_api_options.yaml": "application/vnd.cncf.model.weight.config.v1.raw",
    }
    assert {path: layout_blob(layout, layer["digest"]) for path, layer in files.items()} == tree(bundle)
    assert json.loads(files["empty.txt"]["annotations"]["org.cncf.model.file.metadata+json"]) == {
        "name": "empty.txt", "mode": 0o644, "uid": 0, "gid": 0, "size": 0, "mtime": "1970-01-01T00:00:00Z",
        "typeflag": ord("0")}
    config = json.loads(layout_blob(layout, artifact["config"]["digest"]))
    assert config["descriptor"] == {"name": "smollm2-135m-instruct", "title": name, "version": "v1.0.0"}
    assert config["config"] == {"precision": "fp8", "quantization": "modelopt", "format": "safetensors"}
    assert config["modelfs"] == {"type": "layers", "diffIds": [layer["digest"] for layer in artifact["layers"]]}


def test_same_files_give_the_same_layers_whatever_their_mtimes_and_paths(oci, logged_in, tmp_path):
    first = make_bundle(tmp_path / "one", seed="same")
    second = make_bundle(tmp_path / "two", seed="same")
    for path in second.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    registry = OciRegistry(logged_in)
    registry.publish(first, "same-a-fp8-h200", metadata())
    registry.publish(second, "same-b-fp8-h200", metadata())
    layers = [modelcar_layers(registry, f"same-{x}-fp8-h200/modelcar") for x in "ab"]
    assert layers[0] == layers[1] and len(layers[0]) == 1


def modelcar_layers(registry: OciRegistry, repository: str) -> list[str]:
    body = modelcar.FormTarget(registry).manifest_bytes(repository, "v1.0.0")
    return [layer["digest"] for layer in json.loads(body)["layers"]]


def test_a_file_changed_during_publish_is_refused_by_name(tmp_path):
    bundle = make_bundle(tmp_path)
    entries = bundle_files(bundle)
    (bundle / "checkpoint" / "config.json").write_text('{"quantization_config": {"quant_algo": "NVFP4"}}')
    with pytest.raises(VerificationError) as err:
        modelcar.write_layer(bundle, entries, tmp_path / "layer.tar")
    expected = next(e["sha256"] for e in entries if e["relpath"] == "checkpoint/config.json")
    assert str(err.value).startswith(f"bundle {bundle}: file checkpoint/config.json changed while it was published")
    assert f"forge's manifest says {expected}. Fix: leave the bundle alone while publishing" in str(err.value)


def test_layers_past_the_runtime_limit_are_merged_in_order():
    files = [{"relpath": f"checkpoint/model-{i:05d}.safetensors", "size": modelcar.OWN_LAYER_BYTES} for i in range(250)]
    groups = modelcar.layer_groups([{"relpath": "config.json", "size": 10}, *files])
    assert len(groups) <= modelcar.MAX_LAYERS
    assert [f["relpath"] for group in groups for f in group] == ["config.json"] + [f["relpath"] for f in files]
