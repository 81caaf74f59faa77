"""After `make repro`: push every artifact the pipeline published to a real OCI registry on loopback
(Debian's docker-registry, started here with htpasswd auth), pull it back with forge and with curl,
check both are byte-identical to the pipeline's registry copy, and print the push / pull times.

    .venv/bin/python scripts/oci_roundtrip.py [--registry registry]    (`make oci-roundtrip`; CI runs it)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from oci_server import running_registry

from pipeline.registry.artifacts import PULL_WRITES
from pipeline.registry.directory import Registry
from pipeline.registry.oci import OCI_MANIFEST, OciRegistry


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in PULL_WRITES}


def curl_fetch(server, name: str, version: str, out: Path) -> None:
    auth = ["-u", f"{server.user}:{server.password}"]
    repo = f"http://{server.host}/v2/forge/{name}"
    manifest = json.loads(subprocess.run(["curl", "-fsS", *auth, "-H", f"Accept: {OCI_MANIFEST}",
                                          f"{repo}/manifests/{version}"], check=True, capture_output=True).stdout)
    for layer in manifest["layers"]:
        title = layer["annotations"]["org.opencontainers.image.title"]
        subprocess.run(["curl", "-fsS", *auth, "--create-dirs", "-o", str(out / title),
                        f"{repo}/blobs/{layer['digest']}"], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="registry", help="the pipeline's directory registry")
    args = parser.parse_args()
    source = Registry(args.registry)
    names = source.names()
    if not names:
        print(f"oci-roundtrip: {args.registry} has no artifacts (run `make repro` first)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="forge-oci-") as tmp, running_registry(Path(tmp) / "srv") as server:
        config = Path(tmp) / "docker"
        config.mkdir()
        token = base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
        (config / "config.json").write_text(json.dumps({"auths": {server.host: {"auth": token}}}))
        os.environ["DOCKER_CONFIG"] = str(config)
        oci = OciRegistry(f"oci+http://{server.host}/forge")
        for name in names:
            manifest = source.get_manifest(name)
            bundle = Path(tmp) / "from-dir" / name
            source.pull(name, bundle)
            start = time.monotonic()
            pushed = oci.publish(bundle, name, manifest["metadata"])
            push_s = time.monotonic() - start
            start = time.monotonic()
            oci.pull(name, Path(tmp) / "from-oci" / name, version=pushed.version)
            pull_s = time.monotonic() - start
            curl_fetch(server, name, pushed.version, Path(tmp) / "curl" / name)
            want = digests(bundle)
            same = want == digests(Path(tmp) / "from-oci" / name) == digests(Path(tmp) / "curl" / name)
            size = manifest["total_bytes"] / 1e6
            print(f"oci-roundtrip: {name} {pushed.version}: {len(want)} files, {size:.1f} MB; push {push_s:.2f} s, "
                  f"forge pull {pull_s:.2f} s; forge and curl copies byte-identical: {same}")
            if not same:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
