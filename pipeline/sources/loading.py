"""Loading a checkpoint for calibration or evaluation, and a short perplexity measure.

Device policy, in one place: CUDA when present (BF16, ModelOpt's own kernels), else CPU in FP32.
On CPUs without BF16 hardware a BF16 evaluation ran >10x slower than FP32 (measured here, 2-core CPU), and the
exported checkpoint is cast to BF16 right before export anyway.

Placement: given a `Placement` (an accelerate device map + max_memory; pipeline/sizing/placement.py plans
it for GPU nodes), the model is loaded by `from_pretrained(device_map=..., max_memory=...)`, which
dispatches it with accelerate's hooks (transformers modeling_utils.py: `accelerate_dispatch` when
the map names more than one device or "disk"). The explicit map is what places the modules:
transformers 5.14 consults max_memory only to infer a map from a string such as "auto"
(integrations/accelerate.py `_get_device_map`); the plan's per-GPU totals are that max_memory. A dispatched model is never moved with `.to()`:
accelerate's hooks own where each weight lives (accelerate big_modeling.py `dispatch_model`).
Inputs go to the device its first module executes on (`input_device`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import StageInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str  # where inputs go: the device of the model's first module
    dtype: str
    device_map: dict[str, Any] | None = None  # None: the whole model on `device`


@dataclass(frozen=True)
class Placement:
    """accelerate's device map (module name -> GPU index, "cpu" or "disk") and max_memory."""

    device_map: dict[str, Any]
    max_memory: dict[Any, int]
    offload_folder: Path | None = None  # needed when the map names "disk"


def pick_device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def load_checkpoint(checkpoint_dir: Path, placement: Placement | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    for needed in ("config.json", "tokenizer_config.json"):
        if not (checkpoint_dir / needed).is_file():
            raise StageInputError(str(checkpoint_dir), f"{needed} is missing: not a complete HF checkpoint.",
                                  "re-run the download stage (dvc repro -s download@<model>).")
    device, dtype = pick_device()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    dtype_name = str(dtype).removeprefix("torch.")
    if placement is None:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype).to(device).eval()
        log.info("loaded %s on %s (%s)", checkpoint_dir, device, dtype_name)
        return LoadedModel(model, tokenizer, device, dtype_name)
    if "disk" in placement.device_map.values() and placement.offload_folder is None:
        raise StageInputError(str(checkpoint_dir), "the device map offloads to disk but names no offload folder.",
                              "pass Placement(offload_folder=...).")
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, dtype=dtype, device_map=dict(placement.device_map), max_memory=dict(placement.max_memory),
        offload_folder=str(placement.offload_folder) if placement.offload_folder else None,
    ).eval()
    device_map = dict(getattr(model, "hf_device_map", None) or placement.device_map)
    first = input_device(device_map)
    log.info("loaded %s dispatched over %s (%s), inputs on %s", checkpoint_dir,
             sorted({str(d) for d in device_map.values()}), dtype_name, first)
    return LoadedModel(model, tokenizer, first, dtype_name, device_map)


def input_device(device_map: dict[str, Any]) -> str:
    """Where a dispatched model's inputs go: the execution device of its first module.

    Offloaded modules ("cpu", "disk") execute on the main device, the first GPU in the map, or the
    CPU when there is none (accelerate big_modeling.py `dispatch_model`, `main_device`).
    """
    gpus = sorted(d for d in device_map.values() if isinstance(d, int))
    first = next(iter(device_map.values()))
    if isinstance(first, int):
        return f"cuda:{first}"
    if str(first).startswith("cuda"):
        return str(first)
    return f"cuda:{gpus[0]}" if gpus else "cpu"


def cpu_placement(checkpoint_dir: Path, cpu_bytes: int, offload_folder: Path) -> Placement:
    """A CPU-only dispatch within `cpu_bytes` of RAM, the rest offloaded to disk.

    The map is accelerate's own `infer_auto_device_map` over a meta-device copy of the model
    (init_empty_weights: no weights read), keeping decoder layers whole (`_no_split_modules`).
    Used to check, on a CPU machine, that a dispatched model calibrates and exports exactly what
    an undispatched one does.
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _, dtype = pick_device()
    config = AutoConfig.from_pretrained(checkpoint_dir)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # from_pretrained ties lm_head to embed_tokens (tie_word_embeddings); from_config on the meta
    # device does not (transformers 5.14), and an untied lm_head would be offloaded on its own with
    # no weight of its own in the checkpoint to read (accelerate offload.py: KeyError 'lm_head.weight').
    meta.tie_weights()
    max_memory = {"cpu": int(cpu_bytes)}
    device_map = infer_auto_device_map(meta, max_memory=max_memory, no_split_module_classes=meta._no_split_modules,
                                       dtype=dtype)
    return Placement(dict(device_map), max_memory, Path(offload_folder))


def perplexity(model: Any, input_ids: Any, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every position of every row (rows are independent windows)."""
    import torch

    device_map = getattr(model, "hf_device_map", None)
    device = input_device(device_map) if device_map else next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            logits = model(input_ids=batch).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
