"""Which registry a `--registry` URL names. Every kind offers the same calls (publish, assign_stage,
names, versions, stages, manifests, list_artifacts, refusals, pull), so stages and verbs never branch.

    DIR or fsspec URL (s3://, gs://...)   content-addressed directory registry (pipeline/registry/directory.py)
    oci://HOST/NAMESPACE, oci+http://...  OCI distribution registry (pipeline/registry/oci.py)
    plain+DIR, plain+s3://...             plain layout, read/write (pipeline/registry/plain.py)
    http://..., https://...               plain layout served over HTTP, read only

A URL of any other scheme is refused here, naming the ones that work: fsspec would otherwise open
e.g. ftp:// and fail later in its own words (a traceback from ftplib).
"""

from __future__ import annotations

import os
import re

from pipeline.core.errors import RegistryError
from pipeline.registry.waiting import DEFAULT_TIMEOUT_S

# fsspec protocols the directory and plain registries are documented for (pipeline/registry/fsstorage.py):
# local files, the object stores of the [s3] / [gcs] extras, Azure and SSH; then their aliases, and
# memory:// (in-process, for tests).
FSSPEC_SCHEMES = ("file", "s3", "gs", "az", "ssh")
FSSPEC_ALIASES = ("s3a", "gcs", "abfs", "sftp", "memory")
OCI_SCHEMES = ("oci", "oci+http")
HTTP_SCHEMES = ("http", "https")
PLAIN_PREFIX = "plain+"
SUPPORTED = (f"a directory or {', '.join(f'{s}://' for s in FSSPEC_SCHEMES)} (directory registry; with {PLAIN_PREFIX} "
             "in front, the plain layout); oci://HOST/NAMESPACE or oci+http://HOST/NAMESPACE (OCI registry); "
             "http(s):// (plain layout, read only)")


def check_scheme(url: str) -> None:
    """Refuse a registry URL whose scheme no registry kind reads, listing those that work."""
    inner = url.removeprefix(PLAIN_PREFIX)
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", inner)
    if match is None:
        return  # a directory path
    scheme = match[1].lower()
    fsspec = (*FSSPEC_SCHEMES, *FSSPEC_ALIASES)
    allowed = fsspec if url.startswith(PLAIN_PREFIX) else (*fsspec, *OCI_SCHEMES, *HTTP_SCHEMES)
    if scheme not in allowed:
        raise RegistryError(f"registry {url}", f"unknown URL scheme {scheme!r}: forge reads registries from "
                                               f"{SUPPORTED}.", "pass --registry (or $FORGE_REGISTRY) in one of those forms.")


def open_registry(url: str | os.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S):
    """The registry `url` names. `timeout_s` is the deadline of the kinds that wait on a server
    (pipeline/registry/waiting.py); a directory registry reads files, local or through its fsspec
    library, whose own timeouts apply (s3fs, gcsfs)."""
    url = os.fspath(url)
    check_scheme(url)
    if url.startswith(("oci://", "oci+http://")):
        from pipeline.registry.oci import OciRegistry

        return OciRegistry(url, timeout_s)
    if url.startswith((PLAIN_PREFIX, "http://", "https://")):
        from pipeline.registry.plain import PlainRegistry

        return PlainRegistry(url, timeout_s)
    from pipeline.registry.directory import Registry

    return Registry(url)
