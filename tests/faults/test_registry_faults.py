"""Fault injection on the registries (issue 12, the registry part): tampering, leftovers of killed
writers, hostile manifests, bad URLs, endpoints that never answer. Loopback only, each bounded."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_registry import H200, NAME, make_bundle, metadata

from pipeline import cli
from pipeline.core.errors import RegistryError, VerificationError
from pipeline.registry.backends import open_registry
from pipeline.registry.directory import Registry
from pipeline.registry.transfer import collect_partials


def published(tmp_path: Path, name: str = NAME, seed: str = "a") -> tuple[Registry, Path]:
    registry = Registry(str(tmp_path / "reg"))
    registry.publish(make_bundle(tmp_path / name, seed), name, metadata())
    return registry, tmp_path / "reg"


def manifest_path(root: Path, name: str = NAME, version: str = "v1.0.0") -> Path:
    return root / "artifacts" / name / "versions" / f"{version}.json"


def blob(root: Path, sha: str) -> Path:
    return root / "blobs" / "sha256" / sha[:2] / sha


def edit_manifest(root: Path, edit, name: str = NAME, version: str = "v1.0.0") -> None:
    path = manifest_path(root, name, version)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---- item 25: a same-size corrupt blob is repaired by re-publishing


def test_republish_repairs_a_same_size_corrupt_blob(tmp_path, caplog):
    registry, root = published(tmp_path)
    entry = next(f for f in registry.get_manifest(NAME)["files"] if f["relpath"] == "checkpoint/model.safetensors")
    damaged = blob(root, entry["sha256"])
    damaged.write_bytes(b"\0" + damaged.read_bytes()[1:])
    with pytest.raises(VerificationError, match="re-publish the artifact from its bundle"):
        registry.pull(NAME, tmp_path / "d1")
    result = registry.publish(tmp_path / NAME / "bundle-a", NAME, metadata())
    assert result.created is False  # same content: the version stays, the blob is replaced
    assert f"blob {entry['sha256']} in the registry is corrupt (digest or size differ); replacing it" in caplog.text
    assert registry.pull(NAME, tmp_path / "d2", local_gpu=H200).files == 5


# ---- item 26: one unreadable manifest does not take the registry down


def test_truncated_manifest_of_another_artifact_is_reported_and_skipped(tmp_path, capsys):
    registry, root = published(tmp_path)
    other = "smollm2-135m-instruct-fp8-h100"
    registry.publish(make_bundle(tmp_path / other, "b"), other, metadata(gpu="h100"))
    manifest_path(root, other).write_text('{"schema": "forge-artifact/1", "na')
    assert cli.main(["list", "--registry", str(root)]) == 0
    out, err = capsys.readouterr()
    assert NAME in out and other not in out
    assert f"warning: skipped unreadable {manifest_path(root, other)}: is not valid JSON" in err
    assert cli.main(["pull", "smollm2-135m-instruct", "--gpu", "h200", "--registry", str(root), "--dest",
                     str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "forge-artifact.json").read_text())["name"] == NAME


# ---- item 29 (second half): a manifest's sha256 is used as a path only when it is hex


def test_sha256_that_is_a_path_is_refused_before_any_file_is_read(tmp_path, monkeypatch):
    registry, root = published(tmp_path)
    evil = "../../../../../../etc/hostname"
    edit_manifest(root, lambda m: m["files"][0].update(sha256=evil))
    opened = []
    real_open = registry.storage.fs.open
    monkeypatch.setattr(registry.storage.fs, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    with pytest.raises(VerificationError) as err:
        registry.pull(NAME, tmp_path / "d")
    assert f"file checkpoint/config.json: sha256 '{evil}' is not 64 hex digits." in str(err.value)
    assert not any("hostname" in str(p) for p in opened) and not (tmp_path / "d").exists()


# ---- item 30: URLs and manifests that used to end in tracebacks


SCHEMES = ("forge reads registries from a directory or file://, s3://, gs://, az://, ssh:// (directory registry; "
           "with plain+ in front, the plain layout); oci://HOST/NAMESPACE or oci+http://HOST/NAMESPACE (OCI registry); "
           "http(s):// (plain layout, read only). Fix: pass --registry (or $FORGE_REGISTRY) in one of those forms.")


@pytest.mark.parametrize("url, message", [
    ("foo://bucket/x", f"registry foo://bucket/x: unknown URL scheme 'foo': {SCHEMES}"),
    ("s3://bucket/x", "Fix: pip install 'forge-quant[s3]'."),
    ("ftp://127.0.0.1:9/forge", f"registry ftp://127.0.0.1:9/forge: unknown URL scheme 'ftp': {SCHEMES}"),
    ("plain+ftp://127.0.0.1:9/forge", f"registry plain+ftp://127.0.0.1:9/forge: unknown URL scheme 'ftp': {SCHEMES}"),
])
def test_bad_registry_urls_are_one_line(url, message, tmp_path, capsys):
    assert cli.main(["list", "--registry", url]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_registry_path_that_is_a_file_and_missing_env_registry(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a registry")
    assert cli.main(["list", "--registry", str(tmp_path / "file")]) == 2
    assert f"registry {tmp_path / 'file'}: is a file, not a directory." in capsys.readouterr().err
    monkeypatch.setenv("FORGE_REGISTRY", str(tmp_path / "typo"))
    assert cli.main(["list"]) == 2
    assert f"registry {tmp_path / 'typo'}: does not exist." in capsys.readouterr().err


def test_read_only_registry_is_one_line(tmp_path, monkeypatch):
    registry, root = published(tmp_path)
    if os.geteuid() == 0:  # root ignores permission bits: refuse at the system call, as EACCES would
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(root / "blobs"))
        monkeypatch.setattr("pipeline.registry.blobs.BlobStore.open_tmp", denied)
    else:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    with pytest.raises(RegistryError) as err:
        registry.publish(make_bundle(tmp_path / "new", "new"), NAME, metadata())
    assert f"registry {root}: is not writable (Permission denied: {root / 'blobs'})." in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("files"), "manifest has no `files` list."),
    (lambda m: m["files"][0].pop("size"), "manifest files[0] has no size."),
    (lambda m: m["files"].append({"relpath": "checkpoint", "sha256": "0" * 64, "size": 1}),
     "file checkpoint is also a directory of checkpoint/"),
    (lambda m: m["files"].append({"relpath": "forge-artifact.json", "sha256": "0" * 64, "size": 1}),
     "file forge-artifact.json: that name is written by pull itself."),
    (lambda m: m.update(version="v7.7.7"), "its `version` field is 'v7.7.7', not 'v1.0.0' as its file name says."),
    (lambda m: m["files"][0].update(relpath="../escape"), "manifest lists an unsafe file path '../escape'."),
])
def test_hostile_manifests_are_refused_by_name(tmp_path, edit, message):
    registry, root = published(tmp_path)
    edit_manifest(root, edit)
    with pytest.raises(VerificationError) as err:
        registry.pull(NAME, tmp_path / "d")
    assert message in str(err.value) and not (tmp_path / "d").exists()


def test_stage_label_pointing_at_a_missing_version(tmp_path, capsys):
    registry, root = published(tmp_path)
    registry.assign_stage(NAME, "v1.0.0", "prod")
    event = root / "artifacts" / NAME / "stages" / "prod" / "00000001.json"
    event.write_text(json.dumps({**json.loads(event.read_text()), "version": "v9.9.9"}))
    assert cli.main(["pull", NAME, "--stage", "prod", "--registry", str(root), "--dest", str(tmp_path / "d")]) == 2
    assert "stage 'prod' points at v9.9.9, which is not in the registry (versions: v1.0.0)." in capsys.readouterr().err


# ---- item 32: leftovers of killed writers are collected, live writers' files never


def test_killed_publish_tmp_blobs_collected_live_ones_kept(tmp_path):
    registry, root = published(tmp_path)
    folder = root / "blobs" / "sha256" / "ab"
    folder.mkdir(parents=True, exist_ok=True)
    dead = folder / f"{'ab' * 32}.tmp-{'0' * 32}"
    live = folder / f"{'ab' * 32}.tmp-{'1' * 32}"
    dead.write_bytes(b"half a blob")
    live.write_bytes(b"being written")
    old = time.time() - 3600
    os.utime(dead, (old, old))
    os.utime(live, (old, old))
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a writer that is still running holds its lock
        removed = registry.blobs.collect_garbage()
    assert removed == [str(dead)] and not dead.exists() and live.exists()
    registry.publish(make_bundle(tmp_path / "next", "next"), NAME, metadata())  # publish collects too
    assert not live.exists()


def test_killed_pull_partial_collected_live_one_kept(tmp_path):
    registry, _ = published(tmp_path)
    dest = tmp_path / "serve"
    dead = tmp_path / ".serve.partial-dead"
    live = tmp_path / ".serve.partial-live"
    for d in (dead, live):
        (d / "checkpoint").mkdir(parents=True)
        (d / "checkpoint" / "model.safetensors").write_bytes(b"x" * 100)
        old = time.time() - 3600
        os.utime(d, (old, old))
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        registry.pull(NAME, dest)
        assert not dead.exists() and live.exists() and (dest / "checkpoint/model.safetensors").is_file()
    finally:
        os.close(fd)
    assert collect_partials(dest) == [live]


# ---- endpoints that accept and never answer, or stream more than promised


def _silent_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    conns = []

    def hold() -> None:  # accept and never answer, until the test closes the socket
        try:
            for _ in range(8):
                conns.append(server.accept())
        except OSError:
            pass

    threading.Thread(target=hold, daemon=True).start()
    return server, server.getsockname()[1]


def _dripping_server() -> tuple[socket.socket, int]:
    """Answers 200 with the start of a body, then never sends the rest (a stalled transfer)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    conns = []

    def serve() -> None:
        try:
            for _ in range(8):
                conn, _ = server.accept()
                conns.append(conn)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"artifacts\": [")
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


DEADLINE_FIX = ("Fix: check that the registry is up and reachable from here, or wait longer with --timeout-s SECONDS "
                "(or $FORGE_REGISTRY_TIMEOUT_S).")


@pytest.mark.parametrize("scheme", ["http", "oci+http"])
def test_a_silent_registry_fails_at_its_deadline_and_says_what_it_waits_for(scheme, capsys, monkeypatch):
    """Issue 26 item 8: a registry that accepts and never answers failed after 61 s (HTTP) or 31 s (OCI),
    silently. One deadline for every backend, from the environment here, and a line while it waits."""
    server, port = _silent_server()
    monkeypatch.setenv("FORGE_REGISTRY_TIMEOUT_S", "6")
    url = f"{scheme}://127.0.0.1:{port}/forge"
    what = f"GET http://127.0.0.1:{port}/forge/index.json" if scheme == "http" else f"GET http://127.0.0.1:{port}/v2/"
    try:
        start = time.monotonic()
        assert cli.main(["list", "--registry", url]) == 2
        took = time.monotonic() - start
    finally:
        server.close()
    err = capsys.readouterr().err
    assert 5.5 < took < 15
    assert f"still waiting for registry {url} ({what}): 5 s so far; a wait of 6 s fails (--timeout-s)" in err
    assert err.splitlines()[-1] == f"error: registry {url}: {what}: no answer within the 6 s deadline. {DEADLINE_FIX}"


def test_a_transfer_that_stalls_fails_at_the_deadline_given_on_the_command_line(capsys):
    server, port = _dripping_server()
    url = f"http://127.0.0.1:{port}/forge"
    try:
        start = time.monotonic()
        assert cli.main(["pull", NAME, "--registry", url, "--timeout-s", "2", "--dest", "/nonexistent/d"]) == 2
        assert time.monotonic() - start < 10
    finally:
        server.close()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: registry {url}: GET {url}/index.json: no answer within the 2 s deadline. {DEADLINE_FIX}")


@pytest.mark.parametrize("argv, env, message", [
    (["--timeout-s", "0"], None, ("--timeout-s: must be a positive number of seconds, got 0. Fix: pass e.g. "
                                  "--timeout-s 60 (the default).")),
    ([], "soon", ("$FORGE_REGISTRY_TIMEOUT_S: 'soon' is not a number of seconds. Fix: set it to e.g. 60, or unset "
                  "it for the default.")),
])
def test_a_deadline_that_is_not_a_positive_number_is_refused(tmp_path, capsys, monkeypatch, argv, env, message):
    if env is not None:
        monkeypatch.setenv("FORGE_REGISTRY_TIMEOUT_S", env)
    assert cli.main(["list", "--registry", str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_plain_file_longer_than_its_manifest_says_is_refused(tmp_path):
    url = f"plain+{tmp_path / 'plain'}"
    registry = open_registry(url)
    registry.publish(make_bundle(tmp_path), NAME, metadata())
    target = tmp_path / "plain" / NAME / "v1.0.0" / "checkpoint" / "config.json"
    target.write_bytes(target.read_bytes() + b"\n" * (1 << 20))  # a server that streams more than promised
    with pytest.raises(VerificationError, match=r"file checkpoint/config.json: expected sha256 [0-9a-f]{64} \(\d+ "
                                                r"bytes\), got more than \d+ bytes."):
        registry.pull(NAME, tmp_path / "d")
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.partial-*"))
