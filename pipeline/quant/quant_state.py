"""Save and restore a calibrated model's ModelOpt quant state (quantizer layout + calibrated buffers).

Written against nvidia-modelopt 0.47 (pinned); the order of use is in pipeline/quant/modelopt_glue.py.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import CalibrationError, StageInputError
from pipeline.quant.modelopt_glue import modelopt_version
from pipeline.quant.simulate import FORGE_BACKEND_PREFIX

log = logging.getLogger(__name__)

_STATE_FILE_VERSION = 1


@dataclass(frozen=True)
class QuantStateFile:
    path: Path
    size_bytes: int
    quantizers_with_buffers: int


def canonical_order(value: Any) -> Any:
    """`value` with every string-keyed dict's keys sorted, recursively. ModelOpt builds each
    quantizer's saved attributes by iterating a set, whose order follows the interpreter's string
    hash seed, so two processes pickled the same state in different orders (the fleet check's
    quant_state.pt mismatch; torch's serialization_id hashes the pickle, so it differed too).
    Restoring reads the dicts by key, so the order carries no meaning."""
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: canonical_order(value[k]) for k in sorted(value)}
    if isinstance(value, dict):
        return {k: canonical_order(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(canonical_order(v) for v in value)
    return value


def without_forge_backends(value: Any) -> Any:
    """`value` with every quantizer `backend` that names one of forge's own quant backends (the
    FP4 reference simulation's, registered per process under a fresh uuid: pipeline/quant/simulate.py)
    set back to None. ModelOpt snapshots quantizer attributes into its mode metadata when calibration
    ends, which for FP4 runs inside the simulation, so the saved state named a backend that exists
    only in the process that wrote it (and made each run's bytes differ)."""
    if isinstance(value, dict):
        return {k: (None if k == "backend" and isinstance(v, str) and v.startswith(FORGE_BACKEND_PREFIX)
                    else without_forge_backends(v)) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(without_forge_backends(v) for v in value)
    return value


def save_quant_state(model: nn.Module, path: Path | str) -> QuantStateFile:
    """Write the ModelOpt state plus every quantizer's buffers (amax, ...) to one file.

    `mto.modelopt_state()` alone records the quantizer layout but not the calibrated amax
    values (a restored SmolLM2-135M scored ppl 461,576 here, on CPU), so the quantizer state
    dicts go in too, as ModelOpt's own HF-trainer plugin does
    (modelopt/torch/quantization/plugins/transformers_trainer.py, 0.47). The model weights are
    not saved: they are the unchanged base checkpoint.
    """
    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.utils import get_quantizer_state_dict

    path = Path(path)
    quantizer_states = get_quantizer_state_dict(model)
    if not quantizer_states:
        raise CalibrationError("save_quant_state", "the model has no ModelOpt quantizers.", "calibrate it first.")
    payload = canonical_order({
        "forge_quant_state_version": _STATE_FILE_VERSION,
        "modelopt_state": without_forge_backends(mto.modelopt_state(model)),
        "quantizer_state_dict": {k: {n: t.detach().cpu() for n, t in v.items()} for k, v in quantizer_states.items()},
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialized in memory: torch.save names the zip archive's root folder after the file it writes
    # (torch/serialization.py, `_open_zipfile_writer_file`), so saving to the random temporary name
    # made every run's bytes differ (the fleet check's quant_state.pt mismatch). A buffer's archive
    # root is always "archive"; the bytes then depend on the payload only.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(buffer.getbuffer())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with_buffers = sum(1 for v in payload["quantizer_state_dict"].values() if v)
    return QuantStateFile(path, path.stat().st_size, with_buffers)


def restore_quant_state(base_model: nn.Module, path: Path | str) -> nn.Module:
    """Turn a fresh, unquantized copy of the base model back into the calibrated model.

    Returns the model ModelOpt hands back (the same object, converted in place).
    """
    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.utils import set_quantizer_state_dict

    path = Path(path)
    if not path.is_file():
        raise StageInputError(str(path), "quant state file not found.", "re-run the calibrate stage.")
    if any(isinstance(m, TensorQuantizer) for m in base_model.modules()):
        raise StageInputError(
            str(path),
            "the model to restore into is already quantized.",
            "load a fresh copy of the unquantized base model.",
        )
    # weights_only=True: the file is plain dicts, lists, strings and tensors.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("forge_quant_state_version") != _STATE_FILE_VERSION:
        raise StageInputError(
            str(path),
            "not a forge quant state file (or one from another forge version).",
            "re-run the calibrate stage to write it again.",
        )
    saved_version = payload["modelopt_state"].get("modelopt_version")
    if saved_version != modelopt_version():
        log.warning(
            "%s was written by ModelOpt %s, restoring with %s",
            path,
            saved_version,
            modelopt_version(),
        )
    model = mto.restore_from_modelopt_state(base_model, payload["modelopt_state"])
    present = {n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    missing = sorted(set(payload["quantizer_state_dict"]) - present)
    if missing:
        raise StageInputError(
            str(path),
            f"{len(missing)} saved quantizers do not exist in the restored model (e.g. {', '.join(missing[:3])}).",
            "restore into the same base model the state was calibrated on.",
        )
    set_quantizer_state_dict(model, payload["quantizer_state_dict"])
    return model
