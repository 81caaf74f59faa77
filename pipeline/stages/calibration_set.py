"""Stage `calibration-set`: tokenize a recipe's named calibration set with the model's tokenizer
into fixed [N, L] tensors (a DVC output with its digest), plus a few held-out rows from the same
source that the calibrate stage uses for its quick perplexity check (never seen by calibration)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cliargs import add_verb, arg, runner
from pipeline.core.files import Timer, staged_output
from pipeline.core.layout import CALIBRATION_TENSORS_FILE
from pipeline.handoff.kpis import TIMINGS_HELP, write_timings
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.handoff.reader import open_upstream
from pipeline.recipe.loading import load_recipe

log = logging.getLogger(__name__)

CALIBRATION_DIR = Path("calibration")
# Rows after the calibration rows, cut from later documents of the same seeded order: 8 x seq_len
# tokens is enough for a perplexity delta to separate FP8 from FP4 (measured here on SmolLM2-135M: +2% vs +53%).
HELDOUT_ROWS = 8


@dataclass(frozen=True)
class CalibrationSetArgs:
    """`forge calibration-set`'s arguments, declared once (pipeline/core/cliargs.py)."""

    recipe_path: Path = arg(positional="recipe")
    model_dir: Path = arg(required=True, flag="model", help="download stage output")
    out_dir: Path = arg(required=True, flag="out")
    calibration_dir: Path = arg(CALIBRATION_DIR)
    timings_path: Path | None = arg(flag="timings", help=TIMINGS_HELP)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "calibration-set", runner(CalibrationSetArgs, main),
             help="tokenize a recipe's calibration set into fixed tensors",
             epilog="example: forge calibration-set recipes/smollm2-135m-instruct/fp8.yaml "
                    "--model data/models/smollm2-135m-instruct --out data/calibration/smollm2-135m-instruct-fp8")


def main(recipe_path: Path, model_dir: Path, out_dir: Path, calibration_dir: Path = CALIBRATION_DIR,
         timings_path: Path | None = None) -> int:
    from transformers import AutoTokenizer

    from pipeline.calibration.sets import load_calibration_set
    from pipeline.calibration.tensors import materialize

    recipe = load_recipe(recipe_path)
    section = recipe.spec.calibration
    spec = load_calibration_set(section.set, calibration_dir)
    model = open_upstream(Path(model_dir), "download")
    tokenizer = AutoTokenizer.from_pretrained(Path(model_dir) / "checkpoint")
    timer = Timer()
    with staged_output(out_dir) as tmp:
        with timer("materialize"):
            written = materialize(spec, tokenizer, section.num_samples + HELDOUT_ROWS, section.seq_len, section.seed,
                                  section.chat_template, tmp / CALIBRATION_TENSORS_FILE)
        details = {"set": section.set, "calibration_rows": section.num_samples, "heldout_rows": HELDOUT_ROWS,
                   "seq_len": section.seq_len, "seed": section.seed, "chat_template": section.chat_template,
                   "tensors_sha256": written.sha256, "documents_used": written.documents_used,
                   "set_spec": spec.model_dump(mode="json")}
        write_manifest(tmp, build_manifest("calibration-set", recipe.id, tmp, {"model": model.input_entry()},
                                           details=details, recipe=recipe.provenance("calibration")))
    write_timings(timings_path, timer.seconds)
    log.info("%s: %d + %d rows x %d tokens from %s", recipe.id, section.num_samples, HELDOUT_ROWS, section.seq_len, section.set)
    return 0
