"""The one upstream reader (pipeline/handoff/reader.py): typed, closed handoffs, refused with the file,
the field and the fix when writer and reader disagree."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.errors import StageInputError
from pipeline.handoff import models
from pipeline.handoff.manifest import build_manifest, read_manifest, write_manifest
from pipeline.handoff.models import BuildDetails
from pipeline.handoff.reader import open_upstream
from pipeline.recipe.loading import load_recipe
from tests.handoff_fixtures import build_details, smallest_plan

ROOT = Path(__file__).resolve().parents[2]
FP8 = ROOT / "recipes" / "smollm2-135m-instruct" / "fp8.yaml"


def bundle(tmp_path: Path, **fields) -> Path:
    recipe = load_recipe(FP8)
    directory = tmp_path / "bundle"
    directory.mkdir()
    (directory / "llm_api_options.yaml").write_text("max_batch_size: 8\n")
    write_manifest(directory, build_manifest("build", recipe.artifact_name("h200"), directory, {},
                                             details=build_details(**fields), recipe=recipe.provenance("quant", "build")))
    return directory


def test_reader_returns_the_typed_handoff(tmp_path):
    opened = open_upstream(bundle(tmp_path), "build", load_recipe(FP8), ("quant", "build"))
    assert isinstance(opened.details, BuildDetails)
    assert opened.details.tp == 1 and opened.details.plan.kv_capacity_tokens == smallest_plan()["kv_capacity_tokens"]
    assert opened.input_entry()["stage"] == "build" and len(opened.digest) == 64


def test_a_field_of_another_type_fails_at_the_reader_naming_file_field_and_fix(tmp_path):
    directory = bundle(tmp_path)
    manifest = read_manifest(directory, "build")
    manifest["details"]["tp"] = "1"  # a writer that changed tp's type
    write_manifest(directory, manifest)
    with pytest.raises(StageInputError) as info:
        open_upstream(directory, "build")
    text = str(info.value)
    assert text.startswith(f"{directory / 'manifest.json'}: details.tp input should be a valid integer (found str '1')")
    assert "does not match the build handoff model BuildDetails" in text
    assert "Fix: re-run the build stage with this forge" in text and "pipeline/handoff/models.py" in text


def test_a_model_whose_field_type_changed_fails_on_old_outputs(tmp_path, monkeypatch):
    directory = bundle(tmp_path)

    class Changed(BuildDetails):
        tp: str  # the handoff model changed; outputs written before do not pass silently

    monkeypatch.setitem(models.DETAILS, "build", (Changed,))
    with pytest.raises(StageInputError, match=r"details\.tp input should be a valid string \(found int 1\)"):
        open_upstream(directory, "build")


def test_a_writer_with_a_field_no_model_knows_is_refused(tmp_path):
    with pytest.raises(StageInputError, match=r"details\.tensor_parallel is not a field of this stage's handoff model"):
        build_manifest("build", "x", tmp_path, {}, details=build_details(tensor_parallel=2))


def test_missing_recipe_id_and_missing_section_do_not_pass(tmp_path):
    directory = bundle(tmp_path)
    recipe = load_recipe(FP8)
    with pytest.raises(StageInputError, match=r"records no digest of recipe section\(s\) calibration"):
        open_upstream(directory, "build", recipe, ("quant", "calibration"))
    manifest = read_manifest(directory, "build")
    write_manifest(directory, {**manifest, "recipe": None})
    with pytest.raises(StageInputError, match="records no recipe id, so it cannot be tied to 'smollm2-135m-instruct-fp8'"):
        open_upstream(directory, "build", recipe, ("quant",))


def test_wrong_kind_and_modified_files_are_refused(tmp_path):
    directory = bundle(tmp_path)
    with pytest.raises(StageInputError, match="expected a calibrate manifest, found 'build'"):
        open_upstream(directory, "calibrate")
    (directory / "llm_api_options.yaml").write_text("max_batch_size: 4096\n")
    with pytest.raises(StageInputError, match="does not match the manifest"):
        open_upstream(directory, "build")
    open_upstream(directory, "build", verify=False)  # a reader that only describes (the report) may skip hashing
