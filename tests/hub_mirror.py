"""An in-house Hugging Face Hub mirror for the tests: olah (PyPI `olah`, a self-hosted Hub mirror), on
127.0.0.1 at a free port, offline, serving git repositories built here.

Why olah: it is a maintained, pip-installable server that answers the Hub HTTP API huggingface_hub
and datasets call (`/api/{models,datasets}/<repo>/revision/<rev>`, `.../tree/<rev>`,
`/<repo>/resolve/<rev>/<file>` with ETag and X-Repo-Commit), and it serves repositories from local
git clones (`mirrors-path`, laid out `<root>/<models|datasets>/<org>/<name>`) with `offline = true`,
so it never needs an upstream: the in-house mirror that teams under data-residency rules run.
Config keys as olah 0.5.4 reads them (olah/configs.py `read_toml`: `[basic] host, port, repos-path,
mirrors-path`, `[accessibility] offline`). `make hub-mirror` (run by `make test`) installs it in
.venv-hub; without it the fixture fails with that fix rather than skipping, because this test is the
acceptance of the Hub path. Every process here gets a proxy on a closed loopback port for anything
but 127.0.0.1, so nothing can leave the machine even by mistake.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLAH = ROOT / ".venv-hub" / "bin" / "olah-cli"
START_TIMEOUT_S = 30
_GIT_IDENTITY = {"GIT_AUTHOR_NAME": "forge-test", "GIT_AUTHOR_EMAIL": "forge-test@example.invalid",
                 "GIT_COMMITTER_NAME": "forge-test", "GIT_COMMITTER_EMAIL": "forge-test@example.invalid"}
# uvicorn's access line: 127.0.0.1:PORT - "GET /api/models/org/x/revision/SHA HTTP/1.1" 200
_ACCESS = re.compile(r'"(GET|HEAD) (\S+) HTTP/1\.1" (\d{3})')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_only_env(**extra: str) -> dict[str, str]:
    """os.environ with every proxy pointed at a closed loopback port, except for 127.0.0.1 itself:
    httpx (huggingface_hub, olah) and urllib (forge's probe) honour these variables."""
    closed = f"http://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update(HTTP_PROXY=closed, HTTPS_PROXY=closed, ALL_PROXY=closed, NO_PROXY="127.0.0.1,localhost",
               HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def git_repo(path: Path, commits: list[dict[str, bytes]]) -> list[str]:
    """A git repository at `path` with one commit per {relative path: bytes} (each replaces the
    tree); returns the commit ids, oldest first. Fixed identity and dates: the ids are reproducible."""
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    shas = []
    for n, files in enumerate(commits):
        for old in subprocess.run(["git", "-C", str(path), "ls-files"], check=True, capture_output=True,
                                  text=True).stdout.split():
            (path / old).unlink()
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
        date = f"2026-01-0{n + 1}T00:00:00Z"
        env = {**os.environ, **_GIT_IDENTITY, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
        subprocess.run(["git", "-C", str(path), "add", "-A"], check=True, env=env)
        subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", f"commit {n}"], check=True, env=env)
        shas.append(subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                                   text=True).stdout.strip())
    return shas


@dataclass(frozen=True)
class HubMirror:
    url: str  # http://127.0.0.1:PORT, what HF_ENDPOINT is set to
    mirrors: Path  # <mirrors>/models/<org>/<name>, <mirrors>/datasets/<org>/<name>: git repositories
    output: Path  # olah's stdout and stderr (uvicorn's access log among them)

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request the mirror has answered so far."""
        text = self.output.read_text(errors="replace")
        return [(m, p, int(s)) for m, p, s in _ACCESS.findall(text)]


@contextlib.contextmanager
def running_mirror(workdir: Path, mirrors: Path) -> Iterator[HubMirror]:
    if not OLAH.is_file():
        raise RuntimeError(f"{OLAH} not found. Fix: `make hub-mirror` (installs olah in .venv-hub).")
    port = _free_port()
    config = workdir / "olah.toml"
    config.write_text(f"""[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{workdir / 'cache'}"
mirrors-path = ["{mirrors}"]

[accessibility]
offline = true
""")
    output = workdir / "olah.out"
    with output.open("wb") as sink:
        process = subprocess.Popen([str(OLAH), "-c", str(config), "--log-path", str(workdir / "logs")],
                                   cwd=workdir, stdout=sink, stderr=subprocess.STDOUT, env=loopback_only_env())
    mirror = HubMirror(f"http://127.0.0.1:{port}", mirrors, output)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"olah did not start within {START_TIMEOUT_S} s:\n{output.read_text()[-3000:]}")
            time.sleep(0.2)
        yield mirror
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
