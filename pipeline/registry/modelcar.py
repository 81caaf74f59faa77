"""Two more forms of a version published to an OCI registry, beside forge's own artifact (pipeline/registry/oci.py),
for consumers that do not read forge's one-raw-file-per-layer artifact:

* **modelcar image** `NAMESPACE/<name>/modelcar:<tag>`: an OCI image (image config, uncompressed tar layers)
  whose filesystem holds the bundle under /models. Kubernetes image volumes mount it, and so does KServe's
  `storageUri: oci+native://...` (pkg/utils/storage.go ConfigureOciNativeToContainer mounts the image with
  subPath `models`). KServe's sidecar mode (`oci://` with ociModelMode `modelcar`) runs `sh -c "ln -sf
  /proc/$$/root/models ... && sleep infinity"` inside the image (modelcarCommand, same file): that needs
  a shell, which a data-only image does not have.
* **ModelPack artifact** `NAMESPACE/<name>/modelpack:<tag>`: the CNCF ModelPack manifest (modelpack/model-spec
  docs/spec.md; media types from specs-go/v1/mediatype.go, layer annotations from specs-go/v1/annotations.go)
  whose layers are forge's own raw-file blobs with the `.raw` media types, linked from `NAMESPACE/<name>` by a
  cross-repository mount: it costs the registry a config and a manifest, no file bytes.

Where: a repository per form and the *same tags* as the artifact's (the version `vX.Y.Z` and each stage label,
which `follow_stage` moves with the artifact's), so "the modelcar of NAME:prod" is `NAME/modelcar:prod`. A tag
suffix such as `v1.0.0-modelcar` would read as a semver pre-release of v1.0.0 to tag-policy tools, and the
artifact's repository keeps only forge's own tags. `NAME/modelcar` is not a valid artifact name
(artifacts.NAME_PATTERN), so `forge list` never shows a form as an artifact.

Determinism: the same bundle gives the same digests (layers, config and manifest), so a re-publish or a
racing publisher of the same content pushes nothing new, and an unchanged file (a tokenizer, a shard) is the
same layer blob in the next version. Tar entries are sorted, with mtime 0, uid/gid 0, no owner names,
mode 0644 (0755 for directories: a server running as another user reads them); no timestamp is recorded.

Why not the `olot` library (Red Hat's "oci layers on top", PyPI 1.2.1, checked for this): it appends layers
to a base image in an OCI layout on disk and tars each file with `tarfile.gettarinfo` (olot/utils/files.py
tarball_from_file), which keeps the file's own mtime and owner names, and stamps each history entry with the
blob's ctime (olot/basics.py), so the same bundle would give new digests on every publish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol

import oras.defaults
import requests

from pipeline.core.errors import RegistryError, VerificationError

log = logging.getLogger(__name__)

MODELCAR, MODELPACK = "modelcar", "modelpack"  # the forms, each a repository NAMESPACE/<name>/<form>
MODELS_DIR = "models"  # KServe's modelcar convention: the model lives under /models in the image
# The OCI image spec's media types (opencontainers/image-spec specs-go/v1/mediatype.go); oras-py names two.
IMAGE_MANIFEST = oras.defaults.default_manifest_media_type
IMAGE_LAYER = oras.defaults.default_blob_media_type  # uncompressed tar: weights do not compress
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
# ModelPack (modelpack/model-spec specs-go/v1/mediatype.go, annotations.go).
MODEL_MANIFEST = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
MODEL_WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
MODEL_DOC_RAW = "application/vnd.cncf.model.doc.v1.raw"
MODEL_FILEPATH = "org.cncf.model.filepath"
MODEL_FILE_METADATA = "org.cncf.model.file.metadata+json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".engine")  # checkpoints and TensorRT engines
DOC_SUFFIXES = (".md", ".txt")
TITLE = "org.opencontainers.image.title"  # oras pull writes a titled layer to that path
CREATED = "org.opencontainers.image.created"  # dropped from the forms' annotations: same bundle, same digest
VERSION = "org.opencontainers.image.version"
# Files from OWN_LAYER_BYTES up get a layer each (weight shards: an unchanged one is reused by the next
# version); smaller ones share one. Docker stacks at most 125 layers (moby/moby layer/layer_store.go
# maxLayerDepth, "the 127 max in some graphdrivers"), so neighbours are merged past MAX_LAYERS.
OWN_LAYER_BYTES = 16 << 20
MAX_LAYERS = 100
FILE_MODE, DIR_MODE = 0o644, 0o755
CHUNKED_ABOVE = 64 << 20  # oras-py's single PUT reads the whole file into memory (provider.put_upload)


class Blob(NamedTuple):
    path: Path
    digest: str  # "sha256:..."
    size: int
    media_type: str

    def descriptor(self, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                **({"annotations": dict(annotations)} if annotations else {})}


class Registry(Protocol):
    """The public face of pipeline/registry/oci.py's OciRegistry the forms use: its oras-py client (timeouts
    and credentials set up), its deadline (pipeline/registry/waiting.py) and where it points."""

    url: str
    host: str
    namespace: str
    scheme: str
    client: Any
    deadline: Any


class FormTarget:
    """Manifests and blobs of NAMESPACE/<repository> through the registry's client, failing as one line."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def _send(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        registry = self.registry
        url = f"{registry.scheme}://{registry.host}/v2/{registry.namespace}/{path}"
        try:
            with registry.deadline.waiting(what):
                return registry.client.do_request(url, method, **kwargs)
        except (ValueError, AttributeError) as exc:  # oras-py without credentials for a 401 (oci.py, _request)
            raise self._refused(what, str(exc)) from None
        except requests.RequestException as exc:
            raise registry.deadline.failure(what, exc) from None

    def _refused(self, what: str, answer: str) -> RegistryError:
        return RegistryError(f"registry {self.registry.url}", f"{what} was refused ({answer}).",
                             "check the credentials (`docker login HOST`, or ORAS_USER and ORAS_PASS) and the "
                             "registry's log.")

    def ref(self, repository: str, tag: str) -> str:
        return f"oci://{self.registry.host}/{self.registry.namespace}/{repository}:{tag}"

    def manifest_bytes(self, repository: str, reference: str) -> bytes | None:
        what = f"reading {repository}:{reference}"
        response = self._send("GET", f"{repository}/manifests/{reference}", what, headers={"Accept": IMAGE_MANIFEST})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._refused(what, f"HTTP {response.status_code}")
        return response.content

    def put_manifest(self, repository: str, reference: str, body: bytes) -> str:
        what = f"pushing the manifest of {repository}:{reference}"
        response = self._send("PUT", f"{repository}/manifests/{reference}", what, data=body,
                              headers={"Content-Type": IMAGE_MANIFEST})
        if response.status_code not in (200, 201):
            raise self._refused(what, f"HTTP {response.status_code} {response.text[:200]!r}")
        return self.ref(repository, reference)

    def push_blob(self, repository: str, blob: Blob, mount_from: str | None = None) -> None:
        """Nothing when the repository has the blob; a cross-repository mount (distribution spec, "Mounting a
        blob from another repository") when `mount_from` has it; else an upload (oras-py, chunked past
        CHUNKED_ABOVE as pipeline/registry/oci.py does)."""
        what = f"pushing {blob.digest} to {repository}"
        if self._send("HEAD", f"{repository}/blobs/{blob.digest}", what).status_code == 200:
            return
        # A refused mount answers 202 with an upload session, left to the registry's upload purging.
        if mount_from and self._send("POST", f"{repository}/blobs/uploads/?mount={blob.digest}&from="
                                             f"{self.registry.namespace}/{mount_from}", what).status_code == 201:
            return
        import oras.container

        container = oras.container.Container(f"{self.registry.host}/{self.registry.namespace}/{repository}",
                                             registry=self.registry.host)
        layer = {"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}
        try:
            with self.registry.deadline.waiting(what):
                response = self.registry.client.upload_blob(str(blob.path), container, layer,
                                                            do_chunked=blob.size > CHUNKED_ABOVE)
        except requests.RequestException as exc:
            raise self.registry.deadline.failure(what, exc) from None
        if response.status_code not in (200, 201, 202):
            raise self._refused(what, f"HTTP {response.status_code} {response.text[:200]!r}")


# --------------------------------------------------------------------------- publishing the forms


class Release(NamedTuple):
    """One published version, as the forms need it."""

    bundle: Path
    name: str
    version: str
    files: Sequence[Mapping[str, Any]]  # forge's verified entries: relpath, sha256, size
    metadata: Mapping[str, Any]  # the artifact's metadata (pipeline/registry/artifacts.py validate_metadata)
    notes: Mapping[str, str]  # the manifest annotations, without a timestamp


def publish_forms(registry: Registry, bundle: Path, name: str, version: str, files: Sequence[Mapping[str, Any]],
                  metadata: Mapping[str, Any], notes: Mapping[str, str]) -> dict[str, str]:
    """Push the modelcar image and the ModelPack artifact of `version` unless its tag is there (version
    tags are immutable, so a re-run costs one GET per form); form -> reference."""
    target = FormTarget(registry)
    release = Release(bundle, name, version, files, metadata,
                      {k: v for k, v in notes.items() if k != CREATED} | {VERSION: version})
    refs = {}
    with tempfile.TemporaryDirectory(prefix=f".{bundle.name}.forms-", dir=bundle.parent) as tmp:
        for form, push in ((MODELCAR, push_modelcar), (MODELPACK, push_modelpack)):
            if target.manifest_bytes(f"{name}/{form}", version) is not None:
                log.info("%s %s: the %s form is already published", name, version, form)
                continue
            started = time.monotonic()
            refs[form], pushed = push(target, f"{name}/{form}", release, Path(tmp))
            log.info("published %s %s as a %s: %s (%d layers, %s bytes, %.1f s)", name, version,
                     "modelcar image" if form == MODELCAR else "ModelPack artifact", refs[form], len(pushed),
                     f"{sum(b.size for b in pushed):,}", time.monotonic() - started)
    return refs


def follow_stage(registry: Registry, name: str, version: str, stage: str) -> None:
    """Point each form's `stage` tag at its `version`, as the artifact's stage tag was."""
    target = FormTarget(registry)
    for form in (MODELCAR, MODELPACK):
        body = target.manifest_bytes(f"{name}/{form}", version)
        if body is not None:
            target.put_manifest(f"{name}/{form}", stage, body)


def push_modelcar(target: FormTarget, repository: str, release: Release, tmp: Path) -> tuple[str, list[Blob]]:
    """Each layer is written, pushed and deleted before the next: the extra disk is one layer."""
    layers = []
    for group in layer_groups(release.files):
        layer = write_layer(release.bundle, group, tmp / "layer.tar")
        target.push_blob(repository, layer)
        layers.append(layer)
    config = write_blob(tmp / "image-config.json", image_config(release.notes, [b.digest for b in layers]),
                        IMAGE_CONFIG)
    target.push_blob(repository, config)
    body = manifest(config, [b.descriptor() for b in layers], release.notes)
    return target.put_manifest(repository, release.version, body), layers


def push_modelpack(target: FormTarget, repository: str, release: Release, tmp: Path) -> tuple[str, list[Blob]]:
    """forge's raw-file blobs under ModelPack media types, mounted from the artifact's repository."""
    layers = [Blob(release.bundle / f["relpath"], f"sha256:{f['sha256']}", f["size"],
                   modelpack_media_type(f["relpath"])) for f in release.files]
    for layer in layers:
        target.push_blob(repository, layer, mount_from=release.name)
    config = write_blob(tmp / "model-config.json", modelpack_config(release, layers), MODEL_CONFIG)
    target.push_blob(repository, config)
    descriptors = [b.descriptor(modelpack_layer_notes(f)) for b, f in zip(layers, release.files)]
    body = manifest(config, descriptors, release.notes, MODEL_MANIFEST)
    return target.put_manifest(repository, release.version, body), layers


# --------------------------------------------------------------------------- building (no network)


def layer_groups(files: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The small files in one layer first, then a layer per large file; at most MAX_LAYERS (see above)."""
    small = [f for f in files if f["size"] < OWN_LAYER_BYTES]
    groups = ([small] if small else []) + [[f] for f in files if f["size"] >= OWN_LAYER_BYTES]
    per = max(1, math.ceil(len(groups) / MAX_LAYERS))
    return [[f for group in groups[i:i + per] for f in group] for i in range(0, len(groups), per)]


def write_layer(bundle: Path, entries: Sequence[Mapping[str, Any]], path: Path) -> Blob:
    """A tar of `entries` under models/, byte-identical for the same files (module docstring). Each file
    is hashed as it is read: the image holds exactly the bytes forge's manifest records."""
    paths = [f"{MODELS_DIR}/{e['relpath']}" for e in entries]
    directories = sorted({"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)})
    digest = hashlib.sha256()
    with open(path, "wb") as raw, tarfile.open(fileobj=_Hashing(raw, digest), mode="w",
                                               format=tarfile.PAX_FORMAT) as tar:
        for directory in directories:
            tar.addfile(_header(directory, tarfile.DIRTYPE, 0, DIR_MODE))
        for entry, member in sorted(zip(entries, paths), key=lambda pair: pair[1]):
            source = bundle / entry["relpath"]
            read = hashlib.sha256()
            with open(source, "rb") as handle:
                tar.addfile(_header(member, tarfile.REGTYPE, entry["size"], FILE_MODE), _Hashing(handle, read))
            if read.hexdigest() != entry["sha256"]:
                raise VerificationError(f"bundle {bundle}", f"file {entry['relpath']} changed while it was "
                                                            f"published: sha256 {read.hexdigest()}, forge's manifest "
                                                            f"says {entry['sha256']}.",
                                        "leave the bundle alone while publishing, then publish again.")
    return Blob(path, f"sha256:{digest.hexdigest()}", path.stat().st_size, IMAGE_LAYER)


def _header(name: str, kind: bytes, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _Hashing:
    """A file wrapper that hashes what passes through it (tarfile writes with write/tell, reads with read)."""

    def __init__(self, handle: BinaryIO, digest: Any):
        self.handle, self.digest = handle, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def tell(self) -> int:
        return self.handle.tell()


def write_blob(path: Path, body: bytes, media_type: str) -> Blob:
    path.write_bytes(body)
    return Blob(path, f"sha256:{hashlib.sha256(body).hexdigest()}", len(body), media_type)


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def image_config(labels: Mapping[str, str], diff_ids: Sequence[str]) -> bytes:
    """The image config (image-spec config.md; architecture and os are REQUIRED). The image runs nothing:
    linux/amd64 is the platform of the hosts of forge's GPU targets (pipeline/core/data/gpus.yaml). An
    uncompressed layer's diff ID is its digest. The labels are the artifact's annotations, which
    `skopeo inspect` and a container runtime show."""
    return _json({"architecture": "amd64", "os": "linux", "config": {"Labels": dict(labels)},
                  "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}})


def manifest(config: Blob, layers: Sequence[Mapping[str, Any]], notes: Mapping[str, str],
             artifact_type: str | None = None) -> bytes:
    return _json({"schemaVersion": 2, "mediaType": IMAGE_MANIFEST, **({"artifactType": artifact_type} if artifact_type else {}),
                  "config": config.descriptor(), "layers": list(layers), "annotations": dict(notes)})


def modelpack_media_type(relpath: str) -> str:
    """Weights by suffix, documentation by suffix, everything else (config.json, tokenizer, the engine's
    options) as configuration of the weights (model-spec docs/spec.md, the `.raw` layer types)."""
    lower = relpath.lower()
    if lower.endswith(WEIGHT_SUFFIXES):
        return MODEL_WEIGHT_RAW
    return MODEL_DOC_RAW if lower.endswith(DOC_SUFFIXES) else MODEL_WEIGHT_CONFIG_RAW


def modelpack_layer_notes(entry: Mapping[str, Any]) -> dict[str, str]:
    """The file's path (ModelPack's filepath; the title, so `oras pull` writes the tree) and its attributes
    as the FileMetadata annotation (model-spec specs-go/v1/annotations.go), with the same constant
    values as the modelcar's tar entries."""
    relpath = entry["relpath"]
    attributes = {"name": relpath.rsplit("/", 1)[-1], "mode": FILE_MODE, "uid": 0, "gid": 0, "size": entry["size"],
                  "mtime": "1970-01-01T00:00:00Z", "typeflag": ord(tarfile.REGTYPE)}
    return {MODEL_FILEPATH: relpath, TITLE: relpath, MODEL_FILE_METADATA: _json(attributes).decode()}


def modelpack_config(release: Release, layers: Sequence[Blob]) -> bytes:
    """ModelPack's model config (model-spec specs-go/v1/config.go `Model`): descriptor, config, modelfs
    (a raw layer's diff ID is its digest). No createdAt: same bundle, same digest."""
    weights = sorted({b.path.suffix.lstrip(".") for b in layers if b.media_type == MODEL_WEIGHT_RAW})
    config = {"precision": str(release.metadata["format"]), "quantization": "modelopt",
              **({"format": ",".join(weights)} if weights else {})}
    return _json({"descriptor": {"name": str(release.metadata["model"]), "title": release.name,
                                 "version": release.version},
                  "config": config, "modelfs": {"type": "layers", "diffIds": [b.digest for b in layers]}})
