"""Registry: publish/pull round trips, immutability under races, verification, names, GTO tags."""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.core.errors import RegistryError, VerificationError
from pipeline.core.local_gpu import LocalGpu
from pipeline.registry.artifacts import MANIFEST_FILENAME, artifact_name, validate_name
from pipeline.registry.backends import open_registry
from pipeline.registry.directory import Registry
from pipeline.registry.selection import compatibility_problems
from pipeline.registry.tags import tag_stage, tag_version

NAME = "smollm2-135m-instruct-fp8-h200"
H200 = LocalGpu(name="NVIDIA H200", compute_capability="9.0", memory_bytes=150_000_000_000, sku="h200")
B200 = LocalGpu(name="NVIDIA B200", compute_capability="10.0", memory_bytes=190_000_000_000, sku="b200")


def metadata(**overrides) -> dict:
    meta = {
        "model": "smollm2-135m-instruct",
        "format": "fp8",
        "gpu": "h200",
        "compute_capability": "9.0",
        "tp": 1,
        "bits_per_weight": 8.0,
        "runtime_versions": {"tensorrt_llm": "1.2.1", "modelopt": "0.47.0"},
        "memory_plan": {"weights_bytes": 270_000_000, "kv_cache_bytes": 1_000_000_000},
        "accuracy": {"wikitext": {"word_perplexity": 15.63, "recovery": 0.979}},
        "throughput": {"output_tok_s": 1234.5},
        "gate": {"verdict": "pass", "evaluated_at": "2026-11-01T10:00:00+00:00"},
        "created_at": "2026-11-01T10:00:00+00:00",
    }
    meta.update(overrides)
    return meta


def make_bundle(root: Path, seed: str = "a") -> Path:
    bundle = root / f"bundle-{seed}"
    (bundle / "checkpoint" / "shards").mkdir(parents=True)
    (bundle / "checkpoint" / "model.safetensors").write_bytes(hashlib.sha256(seed.encode()).digest() * 4096)
    (bundle / "checkpoint" / "shards" / "rank0.safetensors").write_bytes(seed.encode() * 1000)
    (bundle / "checkpoint" / "config.json").write_text(json.dumps({"quantization_config": {"quant_algo": "FP8"}}))
    (bundle / "llm_api_options.yaml").write_text("max_batch_size: 64\nkv_cache_config:\n  dtype: fp8\n")
    (bundle / "empty.txt").write_bytes(b"")
    return bundle


def last_line(text: str) -> str:
    """The CLI's error line (log lines may come before it on stderr)."""
    return text.rstrip("\n").splitlines()[-1]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- publish / pull


def test_round_trip_preserves_every_file_and_writes_manifest(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    bundle = make_bundle(tmp_path)
    result = reg.publish(bundle, NAME, metadata())
    assert (result.name, result.version, result.created) == (NAME, "v1.0.0", True)
    assert result.manifest_url == str(tmp_path / "reg" / "artifacts" / NAME / "versions" / "v1.0.0.json")

    pulled = reg.pull(NAME, tmp_path / "out" / "deep", local_gpu=H200, runtime_versions={"tensorrt_llm": "1.2.1"})
    assert pulled.version == "v1.0.0" and pulled.files == 5 and pulled.overridden == ()
    got = tree(tmp_path / "out" / "deep")
    manifest = json.loads(got.pop(MANIFEST_FILENAME))
    assert got.pop("SHA256SUMS").decode() == "".join(f"{f['sha256']}  {f['relpath']}\n" for f in manifest["files"])
    assert got == tree(bundle)
    assert pulled.total_bytes == sum(len(b) for b in got.values()) == manifest["total_bytes"]
    assert manifest["metadata"] == metadata()
    assert [f["relpath"] for f in manifest["files"]] == sorted(tree(bundle))
    blob = hashlib.sha256((bundle / "llm_api_options.yaml").read_bytes()).hexdigest()
    assert (tmp_path / "reg" / "blobs" / "sha256" / blob[:2] / blob).read_bytes() == (
        bundle / "llm_api_options.yaml"
    ).read_bytes()
    # nothing temporary left beside dest or in the registry
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["deep"]
    assert not [p for p in (tmp_path / "reg").rglob("*") if ".tmp-" in p.name]


def test_identical_republish_creates_nothing_and_changes_bump_patch(tmp_path):
    reg = Registry(tmp_path / "reg")
    bundle = make_bundle(tmp_path)
    assert reg.publish(bundle, NAME, metadata()).version == "v1.0.0"
    # timestamps differ, content does not: nothing published
    again = reg.publish(bundle, NAME, metadata(created_at="2027-01-01", gate={"verdict": "pass", "evaluated_at": "x"}))
    assert (again.version, again.created) == ("v1.0.0", False)
    assert reg.versions(NAME) == ["v1.0.0"]
    # a metadata change is a new version
    assert reg.publish(bundle, NAME, metadata(throughput={"output_tok_s": 999.0})).version == "v1.0.1"
    # a content change is a new version
    (bundle / "llm_api_options.yaml").write_text("max_batch_size: 128\n")
    assert reg.publish(bundle, NAME, metadata(throughput={"output_tok_s": 999.0})).version == "v1.0.2"
    # identical to an *older* version but not the newest: still a new version
    (bundle / "llm_api_options.yaml").write_text("max_batch_size: 64\nkv_cache_config:\n  dtype: fp8\n")
    assert reg.publish(bundle, NAME, metadata()).version == "v1.0.3"
    assert reg.get_manifest(NAME, version="v1.0.0")["files"] == reg.get_manifest(NAME)["files"]


def test_versions_sort_semantically_past_nine(tmp_path):
    reg = Registry(tmp_path / "reg")
    bundle = make_bundle(tmp_path)
    for i in range(12):
        reg.publish(bundle, NAME, metadata(throughput={"output_tok_s": float(i)}))
    assert reg.versions(NAME)[-3:] == ["v1.0.9", "v1.0.10", "v1.0.11"]
    assert reg.get_manifest(NAME)["metadata"]["throughput"] == {"output_tok_s": 11.0}


def test_lost_race_takes_next_version_and_never_overwrites(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg")
    first = reg.publish(make_bundle(tmp_path, "a"), NAME, metadata())
    before = Path(first.manifest_url).read_bytes()
    real = Registry.version_numbers
    calls = []

    def stale_once(self, name):
        calls.append(name)
        return [] if len(calls) == 1 else real(self, name)  # as if v1.0.0 appeared after we listed

    monkeypatch.setattr(Registry, "version_numbers", stale_once)
    second = reg.publish(make_bundle(tmp_path, "b"), NAME, metadata())
    assert (second.version, second.created) == ("v1.0.1", True)
    assert Path(first.manifest_url).read_bytes() == before
    assert len(calls) == 2


def _racing_publisher(args):
    registry_url, bundle, barrier = args
    barrier.wait()
    return Registry(registry_url).publish(bundle, NAME, metadata()).version


def test_eight_concurrent_publishers_get_distinct_versions(tmp_path):
    bundles = [make_bundle(tmp_path, f"p{i}") for i in range(8)]
    url = str(tmp_path / "reg")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Manager().Barrier(8)
    with ctx.Pool(8) as pool:
        versions = pool.map(_racing_publisher, [(url, b, barrier) for b in bundles])
    assert sorted(versions, key=lambda v: int(v.split(".")[-1])) == [f"v1.0.{i}" for i in range(8)]
    reg = Registry(url)
    assert reg.versions(NAME) == [f"v1.0.{i}" for i in range(8)]
    for bundle, version in zip(bundles, versions, strict=True):
        manifest = json.loads((tmp_path / "reg" / "artifacts" / NAME / "versions" / f"{version}.json").read_text())
        assert manifest["version"] == version
        digests = {f["relpath"]: f["sha256"] for f in manifest["files"]}
        assert (
            digests["checkpoint/shards/rank0.safetensors"]
            == hashlib.sha256((bundle / "checkpoint" / "shards" / "rank0.safetensors").read_bytes()).hexdigest()
        )
    assert not [p for p in (tmp_path / "reg").rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_blob_is_named_and_nothing_is_left(tmp_path, damage):
    reg = Registry(tmp_path / "reg")
    bundle = make_bundle(tmp_path)
    reg.publish(bundle, NAME, metadata())
    good = (bundle / "checkpoint" / "model.safetensors").read_bytes()
    sha = hashlib.sha256(good).hexdigest()
    blob = tmp_path / "reg" / "blobs" / "sha256" / sha[:2] / sha
    bad = good[:100] + b"X" + good[101:] if damage == "corrupt" else good[:1000]
    blob.write_bytes(bad)
    dest = tmp_path / "new" / "dest"
    with pytest.raises(VerificationError) as err:
        reg.pull(NAME, dest)
    assert str(err.value) == (
        f"{NAME} v1.0.0: file checkpoint/model.safetensors: expected sha256 {sha} ({len(good)} bytes), "
        f"got sha256 {hashlib.sha256(bad).hexdigest()} ({len(bad)} bytes). "
        "Fix: the registry copy is corrupt or truncated; re-publish the artifact from its bundle."
    )
    assert not dest.exists() and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle-a", "reg"]


def test_missing_blob_is_a_verification_error(tmp_path):
    reg = Registry(tmp_path / "reg")
    bundle = make_bundle(tmp_path)
    reg.publish(bundle, NAME, metadata())
    sha = hashlib.sha256((bundle / "empty.txt").read_bytes()).hexdigest()
    (tmp_path / "reg" / "blobs" / "sha256" / sha[:2] / sha).unlink()
    with pytest.raises(VerificationError, match=f"file empty.txt: blob sha256 {sha} is missing"):
        reg.pull(NAME, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_pull_refuses_non_empty_dest_but_fills_empty_one(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(make_bundle(tmp_path), NAME, metadata())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(RegistryError) as err:
        reg.pull(NAME, busy)
    assert str(err.value) == (
        f"destination {busy}: already exists and is not an empty directory. "
        "Fix: pull into a new directory, or remove this one first."
    )
    assert tree(busy) == {"keep.txt": b"mine"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert reg.pull(NAME, empty).files == 5
    assert (empty / MANIFEST_FILENAME).is_file()


def test_pull_from_copied_registry(tmp_path):
    reg = Registry(tmp_path / "reg")
    bundle = make_bundle(tmp_path)
    reg.publish(bundle, NAME, metadata())
    shutil.copytree(tmp_path / "reg", tmp_path / "elsewhere" / "copy")
    shutil.rmtree(tmp_path / "reg")
    copy_reg = Registry(str(tmp_path / "elsewhere" / "copy"))
    copy_reg.pull(NAME, tmp_path / "dest")
    got = tree(tmp_path / "dest")
    got.pop(MANIFEST_FILENAME), got.pop("SHA256SUMS")
    assert got == tree(bundle)


def test_republishing_a_pulled_bundle_is_idempotent(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(make_bundle(tmp_path), NAME, metadata())
    reg.pull(NAME, tmp_path / "dest")
    assert reg.publish(tmp_path / "dest", NAME, metadata()).created is False


def test_fsspec_remote_code_path_round_trip(tmp_path):
    # memory:// goes through the non-local branch (fs.open "xb", fs.mv), as s3:// or gs:// would.
    url = f"memory://forge-test-{os.getpid()}-{tmp_path.name}"
    reg = Registry(url)
    bundle = make_bundle(tmp_path)
    first = reg.publish(bundle, NAME, metadata())
    assert (
        first.manifest_url
        == f"memory:///forge-test-{os.getpid()}-{tmp_path.name}/artifacts/{NAME}/versions/v1.0.0.json"
    )
    assert reg.publish(bundle, NAME, metadata()).created is False
    assert reg.publish(bundle, NAME, metadata(tp=2)).version == "v1.0.1"
    reg.pull(NAME, tmp_path / "dest", version="v1.0.0")
    got = tree(tmp_path / "dest")
    assert json.loads(got.pop(MANIFEST_FILENAME))["metadata"]["tp"] == 1
    got.pop("SHA256SUMS")
    assert got == tree(bundle)
    with pytest.raises(FileExistsError):
        reg.storage.create_exclusive(reg.storage.path("artifacts", NAME, "versions", "v1.0.0.json"), b"{}")
    reg.storage.fs.rm(reg.storage.root, recursive=True)


# ----------------------------------------------------------------------------- compatibility


def test_format_below_its_compute_capability_floor_refused_then_forced(tmp_path):
    reg = Registry(tmp_path / "reg")
    name = "smollm2-135m-instruct-nvfp4-b200"
    reg.publish(make_bundle(tmp_path), name, metadata(format="nvfp4", gpu="b200", compute_capability="10.0"))
    with pytest.raises(RegistryError) as err:
        reg.pull(name, tmp_path / "dest", local_gpu=H200)
    assert str(err.value) == (
        f"{name} v1.0.0: does not match this machine: nvfp4 weights need compute capability 10.0 or newer; "
        "this GPU (NVIDIA H200) is 9.0. Fix: pull the artifact built for this GPU and runtime "
        "(`forge list`), or pass --force to pull anyway."
    )
    assert not (tmp_path / "dest").exists()
    forced = reg.pull(name, tmp_path / "dest", local_gpu=H200, force=True)
    assert forced.overridden == ("nvfp4 weights need compute capability 10.0 or newer; this GPU (NVIDIA H200) is 9.0",)
    assert (tmp_path / "dest" / "llm_api_options.yaml").is_file()


def test_runtime_version_mismatch():
    manifest = {"metadata": metadata()}
    assert compatibility_problems(manifest, H200, {"tensorrt_llm": "1.2.1", "modelopt": None, "vllm": "0.9"}) == []
    assert compatibility_problems(manifest, None, {"tensorrt_llm": "1.3.0rc1", "modelopt": "0.47.0"}) == [
        "built with tensorrt_llm 1.2.1, this machine has 1.3.0rc1"
    ]


# ----------------------------------------------------------------------------- names, versions, stages


@pytest.mark.parametrize(
    ("bad", "fix"),
    [
        ("smollm2/fp8", "use 'smollm2-fp8'."),
        ("..", "use a name like 'smollm2-135m-instruct-fp8-h200'."),
        ("llama-3.1-8b-fp8-h200", "use 'llama-3-1-8b-fp8-h200'."),
        ("SmolLM2-FP8", "use 'smollm2-fp8'."),
        ("", "use a name like 'smollm2-135m-instruct-fp8-h200'."),
    ],
)
def test_bad_names_refused_with_rule_and_fix(tmp_path, bad, fix):
    expected = (
        f"artifact name {bad!r}: must match ^[a-z0-9][a-z0-9_-]{{0,127}}$ "
        "(lower-case letters, digits, '_' and "
        f"'-' only, starting with a letter or digit, at most 128 characters). Fix: {fix}"
    )
    with pytest.raises(RegistryError) as err:
        validate_name(bad)
    assert str(err.value) == expected
    with pytest.raises(RegistryError) as err:
        Registry(tmp_path / "reg").publish(make_bundle(tmp_path), bad, metadata())
    assert str(err.value) == expected
    assert not (tmp_path / "reg").exists()


def test_name_length_limit_and_artifact_name():
    assert validate_name("a" * 128) == "a" * 128
    with pytest.raises(RegistryError, match="Fix: use 'a{128}'"):
        validate_name("a" * 129)
    assert artifact_name("smollm2-135m-instruct", "nvfp4", "b200") == "smollm2-135m-instruct-nvfp4-b200"


def test_metadata_problems_reported_together(tmp_path):
    bad = metadata(compute_capability=9.0, bits_per_weight="8", gate={"ok": True})
    del bad["model"]
    with pytest.raises(RegistryError) as err:
        Registry(tmp_path / "reg").publish(make_bundle(tmp_path), NAME, bad)
    assert str(err.value) == (
        "publish metadata: model must be a non-empty string; compute_capability must be a string like '9.0', "
        "got 9.0; bits_per_weight must be a positive number, got '8'; gate must be a mapping with a string "
        "'verdict', got {'ok': True}. Fix: have the publish stage fill these fields from the build and "
        "evaluate manifests."
    )


def test_unknown_name_version_stage_list_what_exists(tmp_path):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.pull(NAME, tmp_path / "d")
    bundle = make_bundle(tmp_path)
    reg.publish(bundle, NAME, metadata())
    reg.publish(bundle, NAME, metadata(tp=2))
    with pytest.raises(RegistryError) as err:
        reg.pull("other-fp8-h200", tmp_path / "d")
    assert str(err.value) == (
        f"registry {tmp_path / 'reg'}: has no artifact 'other-fp8-h200'; it has: {NAME}. "
        "Fix: run `forge list` and pick one of those names."
    )
    with pytest.raises(RegistryError) as err:
        reg.pull(NAME, tmp_path / "d", version="v2.0.0")
    assert str(err.value) == (
        f"artifact {NAME}: has no version 'v2.0.0'; it has: v1.0.0, v1.0.1. "
        "Fix: pick one of those versions, or omit the version for the newest."
    )
    reg.assign_stage(NAME, "v1.0.0", "prod")
    with pytest.raises(RegistryError) as err:
        reg.pull(NAME, tmp_path / "d", stage="staging")
    assert str(err.value) == (
        f"artifact {NAME}: has no stage 'staging'; its stages are: prod -> v1.0.0. "
        "Fix: assign it first, or pull a version (v1.0.0, v1.0.1)."
    )
    assert not (tmp_path / "d").exists()


def test_stages_newest_event_wins_and_list_artifacts(tmp_path):
    reg = Registry(tmp_path / "reg")
    bundle = make_bundle(tmp_path)
    reg.publish(bundle, NAME, metadata())
    reg.publish(bundle, NAME, metadata(throughput={"output_tok_s": 2000.0}))
    assert reg.assign_stage(NAME, "v1.0.1", "prod").seq == 1
    assert reg.assign_stage(NAME, "v1.0.0", "prod").seq == 2  # roll back
    reg.assign_stage(NAME, "v1.0.1", "staging")
    assert reg.stages(NAME) == {"prod": "v1.0.0", "staging": "v1.0.1"}
    assert reg.get_manifest(NAME, stage="prod")["version"] == "v1.0.0"
    events = sorted(p.name for p in (tmp_path / "reg" / "artifacts" / NAME / "stages" / "prod").iterdir())
    assert events == ["00000001.json", "00000002.json"]
    with pytest.raises(RegistryError, match="stage name 'Prod'"):
        reg.assign_stage(NAME, "v1.0.0", "Prod")

    other = "smollm2-135m-instruct-nvfp4-b200"
    reg.publish(
        bundle,
        other,
        metadata(
            format="nvfp4",
            gpu="b200",
            compute_capability="10.0",
            bits_per_weight=4.5,
            gate={"verdict": "fail"},
        ),
    )
    rows = reg.list_artifacts()
    assert [r.name for r in rows] == [NAME, other]
    row = rows[0]
    assert (row.versions, row.latest, row.stages) == (
        ("v1.0.0", "v1.0.1"),
        "v1.0.1",
        {"prod": "v1.0.0", "staging": "v1.0.1"},
    )
    assert (row.format, row.gpu, row.compute_capability, row.bits_per_weight, row.gate_verdict) == (
        "fp8",
        "h200",
        "9.0",
        8.0,
        "pass",
    )
    assert row.metrics == {
        "accuracy.wikitext.word_perplexity": 15.63,
        "accuracy.wikitext.recovery": 0.979,
        "throughput.output_tok_s": 2000.0,
    }
    assert [r.name for r in reg.list_artifacts(gpu="b200")] == [other]
    assert [(m["name"], m["version"]) for m in reg.manifests(model="smollm2-135m-instruct")] == [
        (NAME, "v1.0.0"),
        (NAME, "v1.0.1"),
        (other, "v1.0.0"),
    ]
    assert reg.manifests(model="llama-3-1-8b") == []
    with pytest.raises(RegistryError, match="nowhere: does not exist. Fix: check the registry URL"):
        Registry(tmp_path / "nowhere").list_artifacts()  # a typo in FORGE_REGISTRY is not "no artifacts"


def test_publish_does_not_keep_callers_metadata(tmp_path):
    reg = Registry(tmp_path / "reg")
    meta = metadata()
    snapshot = copy.deepcopy(meta)
    reg.publish(make_bundle(tmp_path), NAME, meta)
    meta["runtime_versions"]["tensorrt_llm"] = "9.9"
    assert meta != snapshot and reg.get_manifest(NAME)["metadata"] == snapshot


def test_tampered_manifest_path_is_refused(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(make_bundle(tmp_path), NAME, metadata())
    path = tmp_path / "reg" / "artifacts" / NAME / "versions" / "v1.0.0.json"
    manifest = json.loads(path.read_text())
    manifest["files"][0]["relpath"] = "../../escape.txt"
    path.write_text(json.dumps(manifest))
    with pytest.raises(VerificationError, match="unsafe file path '../../escape.txt'"):
        reg.pull(NAME, tmp_path / "a" / "dest")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- GTO tags


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def git_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.name", "forge test")
    _git(repo, "config", "user.email", "forge@example.invalid")
    (repo / "README").write_text("x")
    _git(repo, "add", "README")
    _git(repo, "commit", "-q", "-m", "one")
    return repo


def test_gto_tags(git_repo):
    first = _git(git_repo, "rev-parse", "HEAD")
    assert tag_version(git_repo, NAME, "v1.0.0", "published v1.0.0").tag == f"{NAME}@v1.0.0"
    (git_repo / "README").write_text("y")
    _git(git_repo, "commit", "-q", "-am", "two")
    second = _git(git_repo, "rev-parse", "HEAD")

    assigned = tag_stage(git_repo, NAME, "prod", "prod gets v1.0.0", version="v1.0.0")
    assert (assigned.tag, assigned.commit) == (f"{NAME}#prod#1", first)
    assert tag_stage(git_repo, NAME, "staging", "staging at HEAD").tag == f"{NAME}#staging#2"
    assert tag_stage(git_repo, "other-fp8-h200", "prod", "independent counter").tag == "other-fp8-h200#prod#1"
    assert _git(git_repo, "cat-file", "-t", f"{NAME}#prod#1") == "tag"  # annotated
    assert _git(git_repo, "rev-parse", f"{NAME}#staging#2^{{commit}}") == second
    assert _git(git_repo, "tag", "-l", "--format=%(contents)", f"{NAME}@v1.0.0") == "published v1.0.0"

    with pytest.raises(RegistryError) as err:
        tag_version(git_repo, NAME, "v1.0.0", "again")
    assert str(err.value) == (
        f"git tag {NAME}@v1.0.0: already exists in {git_repo}. "
        "Fix: tags are immutable records; publish a new version instead of re-tagging."
    )
    with pytest.raises(RegistryError, match=f"there is no tag {NAME}@v9.0.0"):
        tag_stage(git_repo, NAME, "prod", "m", version="v9.0.0")
    with pytest.raises(RegistryError, match="is not a version of the form"):
        tag_version(git_repo, NAME, "1.0", "m")


def test_gto_tag_outside_git_repo(tmp_path):
    with pytest.raises(RegistryError) as err:
        tag_version(tmp_path, NAME, "v1.0.0", "m")
    assert str(err.value) == (
        f"git tags in {tmp_path}: this directory is not a git repository. "
        "Fix: run `git init` there, or pass the repository that holds the recipes."
    )


def test_corrupt_manifest_named(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(make_bundle(tmp_path), NAME, metadata())
    path = tmp_path / "reg" / "artifacts" / NAME / "versions" / "v1.0.0.json"
    path.write_text('{"name": ')
    other = "other-fp8-h200"
    reg.publish(make_bundle(tmp_path / "o"), other, metadata())
    # Issue 12 item 26: the bad file is named, the healthy artifacts are still listed.
    assert [s.name for s in reg.list_artifacts()] == [other]
    assert reg.problems[0].startswith(f"{path}: is not valid JSON (Expecting value: line 1 column 10 (char 9)).")
    with pytest.raises(VerificationError) as err:
        reg.get_manifest(NAME)
    assert str(err.value).startswith(f"{path}: is not valid JSON (Expecting value: line 1 column 10 (char 9)).")


def test_h200_rows_say_the_artifacts_exist_but_were_refused_by_their_gate(tmp_path, capsys):
    reg = Registry(tmp_path / "reg")
    nvfp4 = "smollm2-135m-instruct-nvfp4-b200"
    reg.publish(make_bundle(tmp_path), nvfp4, metadata(format="nvfp4", gpu="b200", compute_capability="10.0"))
    refused = "smollm2-135m-instruct-fp8-h200"
    reason = "accuracy gate failed: word_perplexity recovery 0.654 < 0.95"
    reg.record_refusal(refused, metadata(gate={"verdict": "fail"}), reason)
    url = str(tmp_path / "reg")
    assert cli.main(["list", "--registry", url, "--gpu", "h200", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[refused]["version"] is None and not rows[refused]["compatible"]
    assert rows[refused]["reason"] == f"built, but refused by its accuracy gate ({reason}); nothing to pull"
    floor = "nvfp4 weights need compute capability 10.0 or newer; this GPU (NVIDIA H200 SXM 141GB) is 9.0"
    assert rows[nvfp4]["reason"] == floor
    code = cli.main(["pull", "smollm2-135m-instruct", "--gpu", "h200", "--registry", url, "--dest", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and f"{refused}: built, but refused by its accuracy gate ({reason})" in err
    assert f"{nvfp4} v1.0.0: {floor}" in err
    assert "`forge list --gpu h200` shows the same rows." in err


def test_progress_counts_every_byte_when_asked_and_draws_nothing_otherwise(tmp_path, monkeypatch):
    from pipeline.registry import transfer as pulling

    reg = Registry(tmp_path / "reg")
    reg.publish(make_bundle(tmp_path), NAME, metadata())
    advanced = []
    real = pulling.ByteProgress.advance
    monkeypatch.setattr(pulling.ByteProgress, "advance", lambda self, n: advanced.append(n) or real(self, n))
    quiet = reg.pull(NAME, tmp_path / "quiet")
    assert quiet.total_bytes > 0 and sum(advanced) == quiet.total_bytes  # counted...
    bar = pulling.ByteProgress(quiet.total_bytes, NAME, enabled=False)
    assert bar.__enter__()._progress is None  # ...but not drawn off a terminal
    loud = reg.pull(NAME, tmp_path / "loud", progress=True)
    assert sum(advanced) == 2 * loud.total_bytes


# ----------------------------------------------------------------------------- issue 26, item 5: a format's floor


BUILT_ON_H200 = {"gpu_name": "NVIDIA H200 SXM 141GB", "kv_cache_dtype": "fp8",
                 "memory_plan": {"weights_bytes": 270_000_000, "memory_bytes": 150_754_820_096}}


@pytest.mark.parametrize(("gpu", "gpu_name", "cc", "gib"), [("b200", "NVIDIA B200 (DGX/HGX B200)", "10.0", 179),
                                                            ("l40s", "NVIDIA L40S 48GB", "8.9", 45)])
def test_fp8_bundle_built_for_h200_runs_where_fp8_does_with_a_sizing_caveat(tmp_path, capsys, gpu, gpu_name, cc, gib):
    """A checkpoint + LLM-API options bundle is not a TensorRT engine: FP8 (floor 8.9) pulls onto a B200
    or an L40S, and pull says the options were sized for the H200's memory, naming both GPUs."""
    url = str(tmp_path / "reg")
    Registry(url).publish(make_bundle(tmp_path), NAME, metadata(**BUILT_ON_H200))
    dest = tmp_path / "dest"
    assert cli.main(["pull", NAME, "--gpu", gpu, "--registry", url, "--dest", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"pulled {NAME} v1.0.0 into {dest}: 5 files" in out
    assert (f"caveat: llm_api_options.yaml's runtime options were sized for the memory of NVIDIA H200 SXM 141GB "
            f"(h200, 140 GiB), not of this GPU, {gpu_name} ({gpu}, {gib} GiB): they run, but batch and KV cache are "
            f"not planned for it; `forge plan RECIPE --gpu {gpu}` plans them") in out
    assert cli.main(["list", "--registry", url, "--gpu", gpu, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["selected"] and row["reason"] == (f"selected: built for h200 (compute capability 9.0); fp8 runs on {cc}, "
                                                 "options sized for h200's memory, 8.0 bits/weight")
    assert cli.main(["pull", "smollm2-135m-instruct", "--gpu", gpu, "--registry", url,
                     "--dest", str(tmp_path / "chosen")]) == 0  # the model's choice for that GPU takes it too
    assert "caveat: llm_api_options.yaml's runtime options were sized" in capsys.readouterr().out


def test_a_tensorrt_engine_still_runs_only_on_its_compute_capability(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(make_bundle(tmp_path), NAME, metadata(engine="tensorrt"))
    with pytest.raises(RegistryError) as err:
        reg.pull(NAME, tmp_path / "d", local_gpu=B200)
    assert ("does not match this machine: a TensorRT engine built for compute capability 9.0 (h200) runs only "
            "there; this GPU (NVIDIA B200) is 10.0.") in str(err.value)
    h100 = LocalGpu(name="NVIDIA H100", compute_capability="9.0", memory_bytes=85_000_000_000, sku="h100")
    pulled = reg.pull(NAME, tmp_path / "d", local_gpu=h100)  # same compute capability: runs, sized for an H200
    assert pulled.overridden == () and pulled.caveats[0].startswith(
        "llm_api_options.yaml's runtime options were sized for the memory of h200 (h200), not of this GPU, "
        "NVIDIA H100 (h100, 79 GiB)")


# ----------------------------------------------------------------------------- issue 26, item 8: pull, day two


def test_pulling_again_into_the_complete_verified_destination_is_a_no_op(tmp_path, capsys):
    url = str(tmp_path / "reg")
    reg = Registry(url)
    reg.publish(make_bundle(tmp_path), NAME, metadata())
    dest = tmp_path / "serve"
    argv = ["pull", NAME, "--registry", url, "--dest", str(dest)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    before = tree(dest)
    assert cli.main(argv) == 0  # an init container restarted after its pull finished
    out = capsys.readouterr().out
    assert out.startswith(f"already present, verified: {NAME} v1.0.0 in {dest}: 5 files, ")
    assert "every file's sha256 verified against the registry manifest; nothing fetched" in out
    assert tree(dest) == before

    def refused(problem: str) -> None:
        assert cli.main(argv) == 2
        assert last_line(capsys.readouterr().err) == (f"error: destination {dest}: {problem} "
                                                      "Fix: pull into a new directory, or remove this one first.")

    (dest / "llm_api_options.yaml").write_text("max_batch_size: 1\n")
    refused(f"holds {NAME} v1.0.0, but llm_api_options.yaml no longer matches its sha256.")
    (dest / "llm_api_options.yaml").write_bytes(before["llm_api_options.yaml"])
    (dest / "extra.txt").write_text("mine")
    refused(f"holds {NAME} v1.0.0 with other files (extra.txt added).")
    (dest / "extra.txt").unlink()
    reg.publish(make_bundle(tmp_path, "b"), NAME, metadata())
    refused(f"already holds {NAME} v1.0.0, not {NAME} v1.0.1.")  # the newest is another version
    assert tree(dest) == before


def test_version_is_accepted_with_or_without_its_v(tmp_path, capsys):
    url = str(tmp_path / "reg")
    reg = Registry(url)
    reg.publish(make_bundle(tmp_path), NAME, metadata())
    reg.publish(make_bundle(tmp_path, "b"), NAME, metadata())
    assert cli.main(["pull", NAME, "--version", "1.0.0", "--registry", url, "--dest", str(tmp_path / "d")]) == 0
    assert f"pulled {NAME} v1.0.0 into" in capsys.readouterr().out
    assert reg.get_manifest(NAME, version="v1.0.1")["version"] == reg.get_manifest(NAME, version="1.0.1")["version"]
    assert cli.main(["pull", NAME, "--version", "1.0", "--registry", url, "--dest", str(tmp_path / "e")]) == 2
    assert last_line(capsys.readouterr().err) == ("error: version '1.0': is not a version of the form "
                                                  "vMAJOR.MINOR.PATCH. Fix: write e.g. 'v1.0.0' (or '1.0.0').")


@pytest.mark.parametrize("verb", ["pull", "list"])
@pytest.mark.parametrize("count", ["0", "-2"])
def test_count_below_one_is_refused(tmp_path, capsys, verb, count):
    url = str(tmp_path / "reg")
    Registry(url).publish(make_bundle(tmp_path), NAME, metadata())
    args = ["pull", "smollm2-135m-instruct", "--dest", str(tmp_path / "d")] if verb == "pull" else ["list"]
    assert cli.main([*args, "--gpu", "h200", "--count", count, "--registry", url]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: --count: must be at least 1 (how many GPUs of that kind there are), got {count}. "
        "Fix: pass the number of GPUs, e.g. --count 8, or leave it out (as detected, or 1).")
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- issue 26, item 9: promote


@pytest.mark.parametrize("kind", ["directory", "plain"])
def test_promote_moves_a_stage_from_anywhere_and_pull_by_stage_follows(tmp_path, capsys, monkeypatch, kind):
    url = str(tmp_path / "reg") if kind == "directory" else f"plain+{tmp_path / 'reg'}"
    reg = open_registry(url)
    reg.publish(make_bundle(tmp_path), NAME, metadata())
    reg.publish(make_bundle(tmp_path, "b"), NAME, metadata())
    reg.assign_stage(NAME, "v1.0.0", "staging")
    anywhere = tmp_path / "anywhere"  # no checkout, recipe or bundle: only the registry
    anywhere.mkdir()
    monkeypatch.chdir(anywhere)

    def run(*argv: str) -> str:
        assert cli.main([*argv, "--registry", url]) == 0
        return capsys.readouterr().out

    assert run("promote", NAME, "--from", "staging", "--to", "prod") == (
        f"promoted {NAME} v1.0.0 to prod (a new stage) in {url}; `forge pull {NAME} --stage prod` gets v1.0.0\n")
    assert f"pulled {NAME} v1.0.0 into" in run("pull", NAME, "--stage", "prod", "--dest", "a")
    assert run("promote", NAME, "--version", "1.0.1", "--to", "prod") == (
        f"promoted {NAME} v1.0.1 to prod (it pointed at v1.0.0) in {url}; "
        f"`forge pull {NAME} --stage prod` gets v1.0.1\n")
    assert f"pulled {NAME} v1.0.1 into" in run("pull", NAME, "--stage", "prod", "--dest", "b")
    assert run("promote", NAME, "--version", "v1.0.1", "--to", "prod") == (
        f"{NAME}: prod already points at v1.0.1; nothing changed\n")
    assert reg.stages(NAME) == {"prod": "v1.0.1", "staging": "v1.0.0"}
    if kind == "directory":  # the history of the label: two moves, and no event for the no-op
        assert sorted(p.name for p in (tmp_path / "reg" / "artifacts" / NAME / "stages" / "prod").iterdir()) == [
            "00000001.json", "00000002.json"]

    for argv, error in [
        ([NAME, "--to", "prod"], (f"forge promote {NAME}: needs the version to promote: --version vX.Y.Z, or --from "
                                  "STAGE for the version a stage points at (one of them). Fix: e.g. forge promote "
                                  f"{NAME} --version v1.0.0 --to prod.")),
        ([NAME, "--version", "v9.9.9", "--to", "prod"], (f"artifact {NAME}: has no version 'v9.9.9'; it has: "
                                                         "v1.0.0, v1.0.1. Fix: pick one of those versions, or omit "
                                                         "the version for the newest.")),
        ([NAME, "--from", "canary", "--to", "prod"], (f"artifact {NAME}: has no stage 'canary'; its stages are: "
                                                      "prod -> v1.0.1, staging -> v1.0.0. Fix: assign it first, or "
                                                      "pull a version (v1.0.0, v1.0.1).")),
        ([NAME, "--version", "v1.0.0", "--to", "Prod"], "stage name 'Prod': must match"),
    ]:
        assert cli.main(["promote", *argv, "--registry", url]) == 2
        assert last_line(capsys.readouterr().err).startswith(f"error: {error}")
    assert reg.stages(NAME) == {"prod": "v1.0.1", "staging": "v1.0.0"}


def test_promote_tag_writes_gtos_stage_tag_on_the_version_commit(git_repo, tmp_path, capsys, monkeypatch):
    url = str(tmp_path / "reg")
    Registry(url).publish(make_bundle(tmp_path), NAME, metadata())
    tag_version(git_repo, NAME, "v1.0.0", "forge publish")  # what `forge publish --tag` left
    (git_repo / "README").write_text("later")
    _git(git_repo, "commit", "-q", "-am", "later")
    monkeypatch.chdir(git_repo)
    assert cli.main(["promote", NAME, "--version", "v1.0.0", "--to", "prod", "--tag", "--registry", url]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"git tag {NAME}#prod#1 created (push it with "
                                                        f"`git push origin {NAME}#prod#1`)")
    assert _git(git_repo, "rev-parse", f"{NAME}#prod#1^{{commit}}") == _git(git_repo, "rev-parse",
                                                                           f"{NAME}@v1.0.0^{{commit}}")
