"""Which registry a `--registry` URL names. Every kind offers the same calls (publish, assign_stage,
names, versions, stages, manifests, list_artifacts, refusals, pull), so stages and verbs never branch.

    DIR or fsspec URL (s3://, gs://...)   content-addressed directory registry (pipeline/registry/directory.py)
    oci://HOST/NAMESPACE, oci+http://...  OCI distribution registry (pipeline/registry/oci.py)
    plain+DIR, plain+s3://...             plain layout, read/write (pipeline/registry/plain.py)
    http://..., https://...               plain layout served over HTTP, read only
"""

from __future__ import annotations

import os


def open_registry(url: str | os.PathLike):
    url = os.fspath(url)
    if url.startswith(("oci://", "oci+http://")):
        from pipeline.registry.oci import OciRegistry

        return OciRegistry(url)
    if url.startswith(("plain+", "http://", "https://")):
        from pipeline.registry.plain import PlainRegistry

        return PlainRegistry(url)
    from pipeline.registry.directory import Registry

    return Registry(url)
