"""A real OCI registry for the tests: Debian's `docker-registry` (the CNCF distribution registry 2.8),
on 127.0.0.1 at a free port, with htpasswd basic auth, filesystem storage in a temporary directory.

`make oci-registry` (run by `make test`) installs the package; without it the fixture fails with
that fix rather than skipping, because the OCI tests are the acceptance of the deploy work.
Config keys as documented for distribution 2.8 (docs/configuration.md: `storage.filesystem`,
`http.addr`, `auth.htpasswd` with bcrypt entries, `storage.delete`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

BINARY = "docker-registry"
START_TIMEOUT_S = 20


@dataclass(frozen=True)
class OciServer:
    host: str  # "127.0.0.1:PORT"
    user: str
    password: str
    storage: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _htpasswd(user: str, password: str) -> str:
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise RuntimeError("htpasswd not found. Fix: `make oci-registry` (apt-get install apache2-utils).")
    # -B: bcrypt, the only hash distribution's htpasswd backend accepts.
    return subprocess.run([htpasswd, "-Bbn", user, password], check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def running_registry(workdir: Path) -> Iterator[OciServer]:
    binary = shutil.which(BINARY) or (f"/usr/bin/{BINARY}" if os.path.exists(f"/usr/bin/{BINARY}") else None)
    if binary is None:
        raise RuntimeError(f"{BINARY} not found. Fix: `make oci-registry` (apt-get install docker-registry).")
    workdir.mkdir(parents=True, exist_ok=True)
    user, password = "forge-ci", secrets.token_hex(12)
    (workdir / "htpasswd").write_text(_htpasswd(user, password))
    port = _free_port()
    storage = workdir / "storage"
    config = workdir / "config.yml"
    config.write_text(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
auth:
  htpasswd:
    realm: forge-test
    path: {workdir / "htpasswd"}
""")
    log = workdir / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                # 401 from /v2/ is the distribution API answering (auth on): the server is up.
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code in (200, 401):
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{BINARY} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield OciServer(f"127.0.0.1:{port}", user, password, storage, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
