"""The Hub source path against a Hub-compatible server on loopback: olah, an in-house mirror serving
git repositories built here, offline (tests/hub_mirror.py says why olah and how). A tiny Llama (the
`tiny_llama` fixture's files) and a JSONL calibration dataset, each with two commits: the recipes
pin the first, and `main` has moved on to the second, as it does upstream.

`forge download` and `forge calibration-set` run through the CLI in child processes with
HF_ENDPOINT pointing at the mirror, as a person runs them: huggingface_hub and datasets read
HF_ENDPOINT and HF_HUB_OFFLINE once, at import. Asserted: the bytes forge wrote are the pinned
commit's (sha256 against `git show`), every request names the pinned commit, a revision the mirror
lacks and an endpoint datasets would not use are refused with what to do, and after any other verb
neither huggingface_hub nor datasets reaches the mirror (pipeline/cli.py ONLINE_VERBS).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hub_mirror
from hub_mirror import HubMirror, git_repo, loopback_only_env, running_mirror

from pipeline.core.errors import CalibrationError, SourceError
from pipeline.sources.models import DEFAULT_HF_PATTERNS

ROOT = Path(__file__).resolve().parents[2]
MODEL, DATA = "org/tiny-llama", "org/calib"
UNSYNCED = "c0ffee" + "0" * 34  # a commit the mirror does not hold (e.g. pushed upstream after the last sync)


def _jsonl(prefix: str, n: int = 24) -> bytes:
    return b"".join(json.dumps({"text": f"{prefix} document {i}: the old road runs by the river."}).encode() + b"\n"
                    for i in range(n))


@dataclass(frozen=True)
class Hub:
    mirror: HubMirror
    work: Path  # a repo-shaped directory: recipes/, calibration/, data/
    model_commits: list[str]  # [pinned, main]
    data_commits: list[str]
    model_files: dict[str, bytes]  # the pinned commit's files

    def env(self, hf_home: str = "hf-home") -> dict[str, str]:
        env = loopback_only_env(HF_ENDPOINT=self.mirror.url, HF_HOME=str(self.work / hf_home), PYTHONPATH=str(ROOT))
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
            env.pop(name, None)
        return env

    def forge(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], check=False, cwd=self.work, env=self.env(),
                              capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def hub(tiny_llama, tmp_path_factory):
    work = tmp_path_factory.mktemp("hub")
    mirrors = work / "mirrors"
    model_files = {p.name: p.read_bytes() for p in sorted(tiny_llama.model_dir.iterdir()) if p.is_file()}
    model_commits = git_repo(mirrors / "models" / MODEL, [
        model_files, {**model_files, "model.safetensors": b"the weights of a later commit"}])
    data_commits = git_repo(mirrors / "datasets" / DATA, [
        {"data/train.jsonl": _jsonl("Pinned")}, {"data/train.jsonl": _jsonl("Later")}])

    model_dir = work / "recipes/tiny-llama"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_bytes(model_files["config.json"])
    (model_dir / "model.yaml").write_text(yaml.safe_dump({
        "source": {"kind": "hf", "repo_id": MODEL, "revision": model_commits[0]}, "eval": {"suite": "smoke"}}))
    (model_dir / "fp8.yaml").write_text(yaml.safe_dump({
        "quant": {"format": "fp8", "kv_cache_dtype": "fp8"},
        "calibration": {"set": "hub-calib", "num_samples": 4, "seq_len": 32},
        "targets": {"h200": {"max_input_len": 256, "max_output_len": 256, "concurrency": 8}},
        "eval": {"suite": "smoke"}}))
    unsynced = work / "recipes/tiny-llama-unsynced"
    unsynced.mkdir()
    (unsynced / "config.json").write_bytes(model_files["config.json"])
    (unsynced / "model.yaml").write_text(yaml.safe_dump({
        "source": {"kind": "hf", "repo_id": MODEL, "revision": UNSYNCED}, "eval": {"suite": "smoke"}}))
    (work / "calibration").mkdir()
    (work / "calibration/hub-calib.yaml").write_text(yaml.safe_dump({
        "kind": "hf", "description": "a tiny set on the in-house mirror", "dataset": DATA,
        "revision": data_commits[0], "split": "train", "text_field": "text"}))
    (work / "eval").symlink_to(ROOT / "eval")
    with running_mirror(work, mirrors) as mirror:
        yield Hub(mirror, work, model_commits, data_commits, model_files)


def _run_logged(hub: Hub, *argv: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, str, int]]]:
    """Run a forge verb; return its result and the requests the mirror answered meanwhile."""
    before = len(hub.mirror.requests())
    result = hub.forge(*argv)
    return result, hub.mirror.requests()[before:]


def _repo_requests(requests: list[tuple[str, str, int]], repo: str) -> list[tuple[str, str, int]]:
    return [r for r in requests if f"/{repo}/" in r[1]]


@pytest.fixture(scope="module")
def downloaded(hub):
    result, requests = _run_logged(hub, "download", "recipes/tiny-llama/model.yaml", "--out", "data/models/tiny-llama")
    assert result.returncode == 0, result.stderr[-3000:]
    return requests


@pytest.fixture(scope="module")
def calibrated(hub, downloaded):
    result, requests = _run_logged(hub, "calibration-set", "recipes/tiny-llama/fp8.yaml", "--model",
                                   "data/models/tiny-llama", "--out", "data/calibration/tiny-llama-fp8")
    assert result.returncode == 0, result.stderr[-3000:]
    return requests


def test_download_writes_the_pinned_commits_files(hub, downloaded):
    pinned, main = hub.model_commits
    out = hub.work / "data/models/tiny-llama"
    manifest = json.loads((out / "manifest.json").read_text())
    wanted = sorted(n for n in hub.model_files if any(fnmatch(n, p) for p in DEFAULT_HF_PATTERNS))
    assert "model.safetensors" in wanted and "tokenizer.json" in wanted
    assert manifest["details"]["source"] == {"kind": "hf", "repo_id": MODEL, "revision": pinned, "files": wanted}
    for name in wanted:
        assert manifest["files"][f"checkpoint/{name}"]["sha256"] == hashlib.sha256(hub.model_files[name]).hexdigest()
    assert (out / "checkpoint/model.safetensors").read_bytes() != b"the weights of a later commit"
    model_requests = _repo_requests(downloaded, MODEL)
    assert any("/resolve/" in path for _, path, _ in model_requests)
    assert all(pinned in path and main not in path and "/main" not in path for _, path, _ in model_requests)
    assert all(status < 400 for _, _, status in model_requests)


def test_download_of_a_revision_the_mirror_lacks_names_it_and_the_fix(hub, downloaded):
    result, requests = _run_logged(hub, "download", "recipes/tiny-llama-unsynced/model.yaml", "--out",
                                   "data/models/tiny-llama-unsynced")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: hf:{MODEL}@{UNSYNCED}: {hub.mirror.url} has model {MODEL} (its main branch is at "
        f"{hub.model_commits[1]}) but not the pinned revision {UNSYNCED} (HTTP 500 Internal Server Error for it). "
        f"Fix: An in-house mirror must hold the pinned commit: sync {MODEL} at {UNSYNCED} into it. "
        "Or review and pin a commit the endpoint holds.")
    assert not (hub.work / "data/models/tiny-llama-unsynced").exists()
    assert not any("/resolve/" in path for _, path, _ in requests)


def test_calibration_set_reads_the_pinned_dataset_commit(hub, calibrated, tmp_path):
    """The hub set's tokens equal those of a local set holding the pinned commit's file."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.calibration.sets import load_calibration_set
    from pipeline.calibration.tensors import load_materialized, materialize
    from pipeline.core.files import sha256_file
    from pipeline.core.layout import CALIBRATION_TENSORS_FILE

    pinned, main = hub.data_commits
    out = hub.work / "data/calibration/tiny-llama-fp8"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["details"]["set_spec"]["revision"] == pinned
    assert manifest["details"]["tensors_sha256"] == sha256_file(out / CALIBRATION_TENSORS_FILE)
    (tmp_path / "train.jsonl").write_bytes(_jsonl("Pinned"))  # = git show <pinned>:data/train.jsonl
    (tmp_path / "local-copy.yaml").write_text(yaml.safe_dump({
        "kind": "local", "description": "the pinned commit's file", "files": ["train.jsonl"], "text_field": "text"}))
    tokenizer = AutoTokenizer.from_pretrained(out.parent.parent / "models/tiny-llama/checkpoint")
    local = materialize(load_calibration_set("local-copy", tmp_path), tokenizer, 4 + 8, 32, 0, False,
                        tmp_path / "local.safetensors")
    from_hub = load_materialized(out / CALIBRATION_TENSORS_FILE).input_ids
    assert torch.equal(from_hub, load_materialized(local.path).input_ids)
    text = tokenizer.decode(from_hub.flatten().tolist())
    assert "Pinned document" in text and "Later" not in text
    data_requests = _repo_requests(calibrated, DATA)
    assert any(path.endswith("/data/train.jsonl") for method, path, _ in data_requests if method == "GET")
    assert all(pinned in path and main not in path for _, path, _ in data_requests)
    assert not _repo_requests(calibrated, MODEL)


def test_calibration_dataset_revision_the_mirror_lacks_is_refused(hub, tmp_path):
    from pipeline.calibration.sets import HFCalibrationSet
    from pipeline.calibration.tensors import materialize

    spec = HFCalibrationSet(kind="hf", name="unsynced", source_file=tmp_path / "unsynced.yaml", description="t",
                            dataset=DATA, revision=UNSYNCED, split="train", text_field="text")
    with pytest.raises(SourceError) as err:
        materialize(spec, None, 4, 16, 0, False, tmp_path / "x.safetensors", hub_endpoint=hub.mirror.url,
                    hub_offline=False, hub_timeout_s=5.0)
    assert str(err.value).startswith(
        f"hf:{DATA}@{UNSYNCED}: {hub.mirror.url} has dataset {DATA} (its main branch is at {hub.data_commits[1]}) "
        f"but not the pinned revision {UNSYNCED}")


def test_calibration_endpoint_that_datasets_would_not_use_is_refused(hub, tmp_path, monkeypatch):
    """datasets fixed its endpoint at import (here: a closed loopback port standing for another host);
    the mirror passed as an argument answers the probe, so only the check stands between the two."""
    import datasets

    from pipeline.calibration.sets import HFCalibrationSet
    from pipeline.calibration.tensors import materialize

    elsewhere = loopback_only_env()["HTTP_PROXY"]  # a closed port on 127.0.0.1
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", elsewhere)
    spec = HFCalibrationSet(kind="hf", name="pinned", source_file=tmp_path / "pinned.yaml", description="t",
                            dataset=DATA, revision=hub.data_commits[0], split="train", text_field="text")
    with pytest.raises(CalibrationError) as err:
        materialize(spec, None, 4, 16, 0, False, tmp_path / "x.safetensors", hub_endpoint=hub.mirror.url,
                    hub_offline=False, hub_timeout_s=5.0)
    assert str(err.value) == (
        f"hf:{DATA}@{hub.data_commits[0]}: the hub endpoint is {hub.mirror.url}, but datasets {datasets.__version__} "
        f"loads from {elsewhere} (HF_ENDPOINT as it was when datasets was imported). "
        f"Fix: Set HF_ENDPOINT={hub.mirror.url} in the environment before forge starts (README: In-house mirrors).")


OFFLINE_PROBE = """
import json, sys
from pipeline.cli import main
rc = main(["validate", "recipes/tiny-llama/fp8.yaml"])  # any verb but download and calibration-set
tried = {"validate": rc}
def attempt(name, call):
    try:
        call()
        tried[name] = "reached the hub"
    except Exception as exc:
        tried[name] = type(exc).__name__ + ": " + str(exc)[:300]
from huggingface_hub import hf_hub_download
attempt("hf_hub_download", lambda: hf_hub_download(sys.argv[1], "config.json", revision=sys.argv[2]))
import datasets
attempt("load_dataset", lambda: datasets.load_dataset(sys.argv[3], split="train", revision=sys.argv[4]))
from pathlib import Path
from pipeline.sources.models import snapshot_hf
attempt("snapshot_hf", lambda: snapshot_hf(sys.argv[1], sys.argv[2], Path("data/offline-probe")))
print(json.dumps(tried))
"""


def test_only_download_and_calibration_set_reach_the_mirror(hub, calibrated):
    """After another verb has run, the process cannot reach the hub through forge, huggingface_hub or
    datasets (a fresh HF_HOME: nothing cached to fall back on)."""
    before = len(hub.mirror.requests())
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROBE, MODEL, hub.model_commits[0], DATA, hub.data_commits[0]],
        check=False, cwd=hub.work, env=hub.env("hf-home-offline"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    tried = json.loads(result.stdout.strip().splitlines()[-1])
    assert tried["validate"] == 0
    assert "reached the hub" not in tried.values()
    assert tried["snapshot_hf"].startswith(
        f"SourceError: hf:{MODEL}@{hub.model_commits[0]}: the hub is disabled (HF_HUB_OFFLINE=1).")
    assert hub.mirror.requests()[before:] == []
