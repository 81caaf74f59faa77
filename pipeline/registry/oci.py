"""Publish to and pull from a registry that speaks the OCI distribution API (`oci://HOST/NAMESPACE`).

Each version of an artifact is one OCI manifest in the repository `NAMESPACE/<name>`:
  * one layer per bundle file (media type LAYER_MEDIA_TYPE), titled by its relative path with the
    `org.opencontainers.image.title` annotation, as the ORAS CLI titles files (so `oras pull` writes
    the same tree; oras-py's own `push` titles by basename only, oras/provider.py, which is why the
    manifest is assembled here and the SDK does the blob and manifest transfers);
  * a config blob (CONFIG_MEDIA_TYPE) holding forge's manifest: name, metadata, files with sha256;
  * annotations `dev.forge.*` for model, format, GPU, compute capability, engine compatibility,
    gate verdict and tool versions, readable with `oras manifest fetch` or curl;
  * the tag `vX.Y.Z` for the version, and a tag per stage label (`staging`, `prod`) moved onto it.

Credentials are never in a recipe: oras-py reads the standard docker config ($DOCKER_CONFIG or
~/.docker/config.json, `auths` and credential helpers) and ORAS_USER / ORAS_PASS (oras/auth/basic.py).

Versions and races. The distribution API has no conditional create for tags (a PUT to
/manifests/<tag> always wins), so two publishers cannot rely on "create if absent" as the directory
registry does. Instead each publisher first pushes a claim tag `claim-vX.Y.Z-<random>` pointing at its
manifest, waits CLAIM_SETTLE_S, and lists the tags again: the claim that sorts first wins vX.Y.Z, a
version tag that already exists or a smaller claim sends the others on to the next version; a version
that has a claim is never chosen by a later publisher. **Limitation**: a winner whose tag PUT is
delayed by more than CLAIM_SETTLE_S past its check can still be overwritten by a late claimer with a
smaller claim. A claim is a manifest of its own (the version's, plus a nonce annotation), deleted by
digest once its race is decided, which removes its tag (distribution 2.8 has no tag-only delete); a
registry with deletes disabled keeps the claim tags, which forge never lists.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from pipeline.core.errors import RegistryError, VerificationError
from pipeline.core.local_gpu import LocalGpu
from pipeline.registry.artifacts import (
    MANIFEST_SCHEMA,
    MAX_PUBLISH_ATTEMPTS,
    NAME_PATTERN,
    PULL_WRITES,
    VERSION_PATTERN,
    ManifestListing,
    PublishResult,
    PullResult,
    StageAssignment,
    bundle_files,
    canonical,
    format_version,
    next_version,
    normalize_version,
    parse_version,
    place_verified,
    validate_metadata,
    validate_name,
)
from pipeline.registry.modelcar import CHUNKED_ABOVE, TITLE, follow_stage, publish_forms
from pipeline.registry.selection import check_compatible, sizing_caveats
from pipeline.registry.transfer import ByteProgress, check_entries, copy_verified
from pipeline.registry.waiting import DEFAULT_TIMEOUT_S, Deadline, is_timeout

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.forge.artifact.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.forge.artifact.file.v1"
CLAIM_SETTLE_S = 0.5
CLAIM_NOTE = "dev.forge.claim"  # the annotation that makes a claim manifest distinct from its version's
CREDENTIALS_FIX = ("log in with `docker login HOST` or `oras login HOST` (the docker config), or set ORAS_USER "
                   "and ORAS_PASS.")


def docker_configs() -> list[str]:
    """$DOCKER_CONFIG/config.json when set (docker's own rule); oras-py adds ~/.docker/config.json itself."""
    folder = os.environ.get("DOCKER_CONFIG")
    return [os.path.join(folder, "config.json")] if folder else []


def parse_oci_url(url: str) -> tuple[str, str, bool]:
    """`oci://HOST[:PORT]/NAMESPACE` (HTTPS) or `oci+http://...` (plain HTTP) -> (host, namespace, insecure)."""
    match = re.fullmatch(r"oci(\+http)?://([A-Za-z0-9.\-]+(?::[0-9]{1,5})?)/([a-z0-9]+(?:[._/-][a-z0-9]+)*)/?", url)
    if not match:
        raise RegistryError(f"registry {url}", "is not an OCI registry URL.",
                            "write oci://HOST[:PORT]/NAMESPACE (oci+http:// for a registry without TLS), "
                            "e.g. oci+http://127.0.0.1:5000/forge.")
    return match[2], match[3], bool(match[1])


class OciRegistry(ManifestListing):
    """The artifact store API of pipeline.registry.directory.Registry, on an OCI distribution registry."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        import oras.provider  # the OCI client is a core dependency, imported when an oci:// URL is used

        self.url = url
        self.host, self.namespace, insecure = parse_oci_url(url)
        self.deadline = Deadline(url, timeout_s)
        self.scheme = "http" if insecure else "https"
        self.client = oras.provider.Registry(hostname=self.host, insecure=insecure, auth_backend="basic")
        # oras-py passes requests no timeout (a silent registry hangs), and retries any failed request 5 times
        # after 3, 5, 11, 29, 83 s (oras/decorator.py `retry`), a deadline stretched to minutes: not used.
        self.client.session.request = functools.partial(self.client.session.request,
                                                        timeout=self.deadline.requests_timeout)
        self.client.do_request = functools.partial(type(self.client).do_request.__wrapped__, self.client)
        self.client.auth.load_configs(self._container("probe"), configs=docker_configs())
        if getattr(self.client.auth, "_basic_auth", None) is None:
            # No credentials found: make it an explicit anonymous client, so a 401 comes back as a
            # response (BasicAuth would raise AttributeError, which oras' retry decorator retries for minutes).
            self.client.logout(self.host)
        self.problems: list[str] = []
        self._checked = False

    # ---- transport

    def _container(self, name: str, tag: str | None = None):
        import oras.container

        ref = f"{self.host}/{self.namespace}/{name}" + (f":{tag}" if tag else "")
        return oras.container.Container(ref, registry=self.host)

    def _api(self, path: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{path}"

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        self._check_reachable()
        try:
            with self.deadline.waiting(f"{method} {url}"):
                return self.client.do_request(url, method, **kwargs)
        except (ValueError, AttributeError) as exc:  # oras-py cannot answer a 401 (no credentials: AttributeError)
            raise RegistryError(f"registry {self.url}", f"{method} {url} was refused ({exc}).", CREDENTIALS_FIX) from None
        except requests.RequestException as exc:
            raise self.deadline.failure(f"{method} {url}", exc) from None

    def _check_reachable(self) -> None:
        """One quick probe of /v2/ first: oras-py retries a refused connection for minutes (decorator.retry)."""
        if self._checked:
            return
        try:
            with self.deadline.waiting(f"GET {self._api('')}"):
                answer = requests.get(self._api(""), timeout=self.deadline.requests_timeout)
        except requests.RequestException as exc:
            if is_timeout(exc):
                raise self.deadline.exceeded(f"GET {self._api('')}") from None
            raise RegistryError(f"registry {self.url}", f"cannot be reached ({type(exc).__name__}).",
                                "check the host and port, and that the registry is running.") from None
        if answer.status_code not in (200, 401) or "registry/2.0" not in answer.headers.get(
                "Docker-Distribution-API-Version", "registry/2.0"):
            raise RegistryError(f"registry {self.url}", f"GET /v2/ answered {answer.status_code}: not an OCI "
                                                        "distribution registry.", "check the URL.")
        self._checked = True

    def _fail(self, response: requests.Response, what: str) -> RegistryError:
        if response.status_code in (401, 403):
            return RegistryError(f"registry {self.url}", f"{what}: {response.status_code} "
                                                         f"{'unauthorized' if response.status_code == 401 else 'denied'}"
                                                         f" (no valid credentials for {self.host}).", CREDENTIALS_FIX)
        return RegistryError(f"registry {self.url}", f"{what}: HTTP {response.status_code} "
                                                     f"{response.text[:200]!r}.", "check the registry's log.")

    # ---- reading

    def _tags(self, name: str) -> list[str]:
        response = self._request("GET", self._api(f"{self.namespace}/{name}/tags/list"))
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise self._fail(response, f"listing the tags of {name}")
        return sorted((response.json() or {}).get("tags") or [])

    def _manifest(self, name: str, reference: str) -> tuple[dict, str]:
        """The OCI manifest at a tag or digest, and its digest (checked against the body)."""
        response = self._request("GET", self._api(f"{self.namespace}/{name}/manifests/{reference}"),
                                 headers={"Accept": OCI_MANIFEST})
        if response.status_code == 404:
            raise RegistryError(f"registry {self.url}", f"has no {name}:{reference}.", "run `forge list`.")
        if response.status_code != 200:
            raise self._fail(response, f"reading {name}:{reference}")
        digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
        if digest != response.headers.get("Docker-Content-Digest", digest) or (
                reference.startswith("sha256:") and reference != digest):
            raise VerificationError(f"{name}:{reference}", f"the manifest's bytes hash to {digest}, not the "
                                                           "digest the registry names.", "re-publish the artifact.")
        try:
            return json.loads(response.content), digest
        except json.JSONDecodeError as exc:
            raise VerificationError(f"{name}:{reference}", f"the manifest is not JSON ({exc}).",
                                    "re-publish the artifact.") from None

    def _digest_of(self, name: str, tag: str) -> str | None:
        response = self._request("HEAD", self._api(f"{self.namespace}/{name}/manifests/{tag}"),
                                 headers={"Accept": OCI_MANIFEST})
        return response.headers.get("Docker-Content-Digest") if response.status_code == 200 else None

    def _blob(self, name: str, digest: str) -> requests.Response:
        response = self._request("GET", self._api(f"{self.namespace}/{name}/blobs/{digest}"), stream=True)
        if response.status_code != 200:
            response.close()
            if response.status_code in (404, 500):  # distribution answers 500 when a blob's data file is gone
                raise VerificationError(f"{name}", f"blob {digest} is missing from the registry "
                                                   f"(HTTP {response.status_code}).", "re-publish the artifact.")
            raise self._fail(response, f"reading blob {digest}")
        return response

    def names(self) -> list[str]:
        response = self._request("GET", self._api("_catalog?n=1000"))
        if response.status_code != 200:
            raise self._fail(response, "listing repositories")
        prefix = f"{self.namespace}/"
        repos = [r[len(prefix):] for r in (response.json() or {}).get("repositories") or [] if r.startswith(prefix)]
        return sorted(n for n in repos if re.fullmatch(NAME_PATTERN, n) and self.versions(n))

    def versions(self, name: str) -> list[str]:
        validate_name(name)
        found = [parse_version(t) for t in self._tags(name) if re.fullmatch(VERSION_PATTERN, t)]
        return [format_version(v) for v in sorted(found)]

    def stages(self, name: str) -> dict[str, str]:
        """stage -> version: the version tag whose manifest digest the stage tag shares."""
        tags = self._tags(name)
        by_digest = {self._digest_of(name, v): v for v in tags if re.fullmatch(VERSION_PATTERN, v)}
        labels = {}
        for tag in tags:
            if re.fullmatch(NAME_PATTERN, tag) and not tag.startswith("claim-") and tag != "latest":
                digest = self._digest_of(name, tag)
                if digest in by_digest:
                    labels[tag] = by_digest[digest]
        return labels

    def resolve(self, name: str, version: str | None = None, stage: str | None = None) -> str:
        validate_name(name)
        version = None if version is None else normalize_version(version)
        existing = self.versions(name)
        if not existing:
            raise RegistryError(f"registry {self.url}", f"has no artifact {name!r}; it has: "
                                                        f"{', '.join(self.names()) or 'none'}.", "run `forge list`.")
        if stage is not None:
            labels = self.stages(name)
            if stage not in labels:
                raise RegistryError(f"artifact {name}", f"has no stage {stage!r}; its stages are: "
                                                        f"{', '.join(f'{s} -> {v}' for s, v in sorted(labels.items())) or 'none'}.",
                                    f"assign it first, or pull a version ({', '.join(existing)}).")
            return labels[stage]
        if version is None:
            return existing[-1]
        if version not in existing:
            raise RegistryError(f"artifact {name}", f"has no version {version!r}; it has: {', '.join(existing)}.",
                                "pick one of those versions, or omit the version for the newest.")
        return version

    def get_manifest(self, name: str, version: str | None = None, stage: str | None = None) -> dict:
        """forge's manifest (the config blob, verified), with `version` and the OCI manifest under `oci`."""
        resolved = self.resolve(name, version=version, stage=stage)
        oci, digest = self._manifest(name, resolved)
        where = f"{name} {resolved}"
        config = oci.get("config") or {}
        if config.get("mediaType") != CONFIG_MEDIA_TYPE:
            raise VerificationError(where, f"config media type is {config.get('mediaType')!r}, not {CONFIG_MEDIA_TYPE}: "
                                           "not a forge artifact.", "pull it with oras instead.")
        with self._blob(name, config["digest"]) as response:
            raw = response.content
        if "sha256:" + hashlib.sha256(raw).hexdigest() != config["digest"]:
            raise VerificationError(where, f"config blob does not match its digest {config['digest']}.",
                                    "re-publish the artifact.")
        forge = json.loads(raw)
        check_entries(forge.get("files"), where, reserved=PULL_WRITES)
        layers = {(layer.get("annotations") or {}).get(TITLE): layer for layer in oci.get("layers") or []}
        for entry in forge["files"]:
            layer = layers.get(entry["relpath"])
            if layer is None or layer.get("digest") != f"sha256:{entry['sha256']}" or layer.get("size") != entry["size"]:
                raise VerificationError(where, f"file {entry['relpath']}: the OCI layer does not match forge's "
                                               "manifest (digest or size).", "re-publish the artifact.")
        if len(layers) != len(forge["files"]):
            raise VerificationError(where, "the OCI manifest has layers that forge's manifest does not list.",
                                    "re-publish the artifact.")
        return {**forge, "version": resolved, "oci": {"repository": f"{self.host}/{self.namespace}/{name}",
                                                      "digest": digest}}

    def refusals(self) -> list[dict]:
        return []  # an OCI registry holds only what passed its gate (record_refusal below)

    # ---- writing

    def record_refusal(self, name: str, metadata: Mapping[str, Any], reason: str) -> None:
        log.info("%s: refused by its gate; nothing pushed to %s (%s)", name, self.url, reason)

    def publish(self, bundle_dir: str | os.PathLike, name: str, metadata: Mapping[str, Any],
                now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> PublishResult:
        validate_name(name)
        validate_metadata(metadata)
        bundle = Path(bundle_dir)
        files = bundle_files(bundle)
        meta = json.loads(canonical(metadata))
        config = (canonical({"schema": MANIFEST_SCHEMA, "name": name, "metadata": meta, "files": files,
                              "total_bytes": sum(f["size"] for f in files)}) + "\n").encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        existing = self.versions(name)
        if existing:
            newest, _ = self._manifest(name, existing[-1])
            if (newest.get("config") or {}).get("digest") == config_digest:
                log.info("%s %s already has this content; nothing pushed", name, existing[-1])
                publish_forms(self, bundle, name, existing[-1], files, meta, annotations(name, meta, now()))
                return PublishResult(name, existing[-1], self._ref(name, existing[-1]), created=False)
        container = self._container(name)
        for entry in files:
            self._push_blob(container, bundle / entry["relpath"], f"sha256:{entry['sha256']}", entry["size"])
        config_path = bundle.parent / f".{bundle.name}.oci-config-{uuid.uuid4().hex}"
        try:
            config_path.write_bytes(config)
            self._push_blob(container, config_path, config_digest, len(config), CONFIG_MEDIA_TYPE)
        finally:
            config_path.unlink(missing_ok=True)
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": f"sha256:{f['sha256']}", "size": f["size"],
                        "annotations": {TITLE: f["relpath"]}} for f in files],
            "annotations": annotations(name, meta, now()),
        }
        body = json.dumps(manifest, sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self._put_manifest(name, digest, body)
        version, created = self._claim_version(name, body, config_digest)
        publish_forms(self, bundle, name, version, files, meta, manifest["annotations"])  # modelcar, ModelPack
        return PublishResult(name, version, self._ref(name, version), created=created)

    def _ref(self, name: str, tag: str) -> str:
        return f"oci://{self.host}/{self.namespace}/{name}:{tag}"

    def _push_blob(self, container, path: Path, digest: str, size: int, media_type: str = LAYER_MEDIA_TYPE) -> None:
        self._check_reachable()
        layer = {"mediaType": media_type, "digest": digest, "size": size}
        try:
            with self.deadline.waiting(f"pushing {path.name}"):
                response = self.client.upload_blob(str(path), container, layer, do_chunked=size > CHUNKED_ABOVE)
        except (ValueError, AttributeError):  # as in _request: oras-py had no credentials to answer the 401
            raise RegistryError(f"registry {self.url}", f"pushing {path.name} was refused: 401 unauthorized (no "
                                                        f"valid credentials for {self.host}).",
                                CREDENTIALS_FIX) from None
        except requests.RequestException as exc:
            raise self.deadline.failure(f"pushing {path.name}", exc) from None
        if response.status_code not in (200, 201, 202):
            raise self._fail(response, f"pushing {path.name} ({digest})")

    def _put_manifest(self, name: str, reference: str, body: bytes) -> None:
        response = self._request("PUT", self._api(f"{self.namespace}/{name}/manifests/{reference}"), data=body,
                                 headers={"Content-Type": OCI_MANIFEST})
        if response.status_code not in (200, 201):
            raise self._fail(response, f"pushing the manifest of {name}:{reference}")

    def _claim_version(self, name: str, body: bytes, config_digest: str) -> tuple[str, bool]:
        """Tag `body` with the next free version (module docstring: claims, then the smallest claim wins);
        (version, False) when a racing publisher of the same content won a version for it."""
        nonce = uuid.uuid4().hex
        # A claim is the version's manifest plus a nonce annotation: its own digest, so deleting it
        # (DELETE by digest untags it, distribution's manifest handler) leaves the version alone.
        oci = json.loads(body)
        claim = json.dumps({**oci, "annotations": {**oci.get("annotations", {}), CLAIM_NOTE: nonce}},
                           sort_keys=True).encode()
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            tags = set(self._tags(name))
            versions = sorted((t for t in tags if re.fullmatch(VERSION_PATTERN, t)), key=parse_version)
            if versions and (self._manifest(name, versions[-1])[0].get("config") or {}).get("digest") == config_digest:
                return versions[-1], False
            taken = [parse_version(t) for t in tags if re.fullmatch(VERSION_PATTERN, t)]
            claimed = [parse_version(m[1]) for t in tags if (m := re.fullmatch(r"claim-(v[0-9.]+)-[0-9a-f]{32}", t))
                       and re.fullmatch(VERSION_PATTERN, m[1])]
            version = format_version(next_version(taken + claimed))
            mine = f"claim-{version}-{nonce}"
            self._put_manifest(name, mine, claim)
            time.sleep(CLAIM_SETTLE_S)
            tags = set(self._tags(name))
            claims = sorted(t for t in tags if t.startswith(f"claim-{version}-"))
            won = version not in tags and claims and claims[0] == mine
            if won:
                self._put_manifest(name, version, body)
            self._drop_claim(name, mine, claim)  # decided: the version tag (or a smaller claim) now guards it
            if won:
                log.info("published %s %s to %s", name, version, self.url)
                return version, True
            log.info("%s %s was claimed by another publisher; trying the next version", name, version)
        raise RegistryError(f"artifact {name}", f"lost the race for a new version {MAX_PUBLISH_ATTEMPTS} times.",
                            "publish again.")

    def _drop_claim(self, name: str, tag: str, claim: bytes) -> None:
        """Delete a decided claim, so tag lists (oras repo tags, registry UIs) show versions and stages only."""
        digest = "sha256:" + hashlib.sha256(claim).hexdigest()
        response = self._request("DELETE", self._api(f"{self.namespace}/{name}/manifests/{digest}"))
        if response.status_code not in (200, 202, 404):  # 405: deletes disabled; forge never lists claims anyway
            log.info("claim tag %s of %s stays (DELETE answered %s)", tag, name, response.status_code)

    def assign_stage(self, name: str, version: str, stage: str) -> StageAssignment:
        validate_name(stage, kind="stage name")
        resolved = self.resolve(name, version=version)
        _, digest = self._manifest(name, resolved)
        oci = self._request("GET", self._api(f"{self.namespace}/{name}/manifests/{digest}"),
                            headers={"Accept": OCI_MANIFEST}).content
        self._put_manifest(name, stage, oci)
        follow_stage(self, name, resolved, stage)  # the modelcar and ModelPack forms' stage tags too
        return StageAssignment(name, stage, resolved, 0)

    # ---- pulling

    def pull(self, name: str, dest: str | os.PathLike, *, version: str | None = None, stage: str | None = None,
             force: bool = False, local_gpu: LocalGpu | None = None,
             runtime_versions: Mapping[str, str | None] | None = None, progress: bool = False) -> PullResult:
        manifest = self.get_manifest(name, version=version, stage=stage)
        resolved = manifest["version"]
        where = f"{name} {resolved}"
        problems = check_compatible(manifest, where, local_gpu, runtime_versions, force)

        def fetch(entry: Mapping[str, Any], staging: Path, where: str, bar: ByteProgress) -> None:
            with self._blob(name, f"sha256:{entry['sha256']}") as response:
                try:
                    copy_verified(response.iter_content(1 << 20), staging / entry["relpath"], entry, where, bar)
                except requests.RequestException as exc:  # the body stalled (a read timeout) or broke off
                    raise self.deadline.failure(f"reading {entry['relpath']} of {where}", exc) from None

        return place_verified(name, manifest, dest, problems, progress, fetch,
                              sizing_caveats(manifest, local_gpu))


def annotations(name: str, meta: Mapping[str, Any], created: datetime) -> dict[str, str]:
    """What a deployment system filters on without reading the config blob (all values are strings)."""
    runtimes = meta.get("runtime_versions") or {}
    engine = meta.get("engine") or "pytorch"  # recipe build.engine: TensorRT-LLM's pytorch (LLM API) or tensorrt backend
    return {
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.created": created.isoformat(timespec="seconds"),
        "dev.forge.model": str(meta["model"]),
        "dev.forge.format": str(meta["format"]),
        "dev.forge.gpu": str(meta["gpu"]),
        "dev.forge.compute-capability": str(meta["compute_capability"]),
        "dev.forge.tp": str(meta["tp"]),
        "dev.forge.engine-compatibility": f"tensorrt_llm=={runtimes.get('tensorrt_llm', 'unknown')} ({engine} backend), "
                                          f"compute capability {meta['compute_capability']}",
        "dev.forge.gate-verdict": str((meta.get("gate") or {}).get("verdict")),
        "dev.forge.tool-versions": canonical(runtimes),
    }
