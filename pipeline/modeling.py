"""Loading a checkpoint for calibration or evaluation, and a short perplexity measure.

Device policy, in one place: CUDA when present (BF16, ModelOpt's own kernels), else CPU in FP32.
On CPUs without BF16 hardware a BF16 evaluation ran >10x slower than FP32 (FACTS.md), and the
exported checkpoint is cast to BF16 right before export anyway.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StageInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    dtype: str


def pick_device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def load_checkpoint(checkpoint_dir: Path) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    for needed in ("config.json", "tokenizer_config.json"):
        if not (checkpoint_dir / needed).is_file():
            raise StageInputError(str(checkpoint_dir), f"{needed} is missing: not a complete HF checkpoint.",
                                  "re-run the download stage (dvc repro -s download@<model>).")
    device, dtype = pick_device()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype).to(device).eval()
    log.info("loaded %s on %s (%s)", checkpoint_dir, device, str(dtype).removeprefix("torch."))
    return LoadedModel(model, tokenizer, device, str(dtype).removeprefix("torch."))


def perplexity(model: Any, input_ids: Any, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every position of every row (rows are independent windows)."""
    import torch

    device = next(model.parameters()).device
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
