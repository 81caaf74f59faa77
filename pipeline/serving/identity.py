"""Before a served evaluation scores anything: is the server serving the checkpoint we claim to score?

Two checks, because the name alone proves nothing (every local-source bundle is served as
"checkpoint", the baseline too):
1. `GET /v1/models` lists the expected model name;
2. that model card's `root` (vLLM reports the path it loaded: vllm/entrypoints/openai/models/serving.py,
   `ModelCard(id=..., root=base_model.model_path)`) holds files whose digest equals the checkpoint's.
`GET /version` gives the engine's version; the card's `owned_by` names the engine.

trtllm-serve reports no root: its card is `ModelCard(id=self.model)` with only `id`, `object`,
`created` and `owned_by="tensorrt_llm"` (TensorRT-LLM tensorrt_llm/serve/openai_protocol.py
`ModelCard`; openai_server.py `get_model`), and `id` is the served directory's *name*
(`OpenAIServer.__init__`: `self.model = model_dir.name` for a directory). Nothing it exposes is tied
to the weights' digest. Such a server is accepted in two cases, and the result says which:
- forge launched it on the checkpoint itself (`launched_checkpoint`): the weights are known;
- it answers to the name the bundle's SERVE.md command gives (`trtllm-serve checkpoint ...` from the
  bundle directory reports `checkpoint`): accepted *unverified*, `weights_checked: false` with the
  reason in `weights_note`, and a WARNING. Any other name ties it to nothing and is refused.

The digest of a checkpoint is the sha256 of its sorted (relative path, file sha256) list: the same
for a bundle's hard-linked checkpoint and the calibrate output it links to, different for any
other weights or config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import ServeError
from pipeline.core.files import file_digests
from pipeline.core.layout import CHECKPOINT_DIR

log = logging.getLogger(__name__)

# /v1/models `owned_by` -> engine name forge records.
OWNERS = {"vllm": "vllm", "tensorrt_llm": "trtllm-serve", "sglang": "sglang"}

# The /v1/models id trtllm-serve reports for the bundle's SERVE.md command `trtllm-serve checkpoint ...`
# (the served directory's name, openai_server.py OpenAIServer.__init__); also --served-model-name's default.
SERVE_MD_NAME = CHECKPOINT_DIR
SERVE_MD_FIX = ("from the bundle directory, serve it with its SERVE.md command (`trtllm-serve checkpoint ...`) and "
                "run `forge evaluate RECIPE ... --serve-url URL`; or `forge evaluate RECIPE ... --bundle BUNDLE`, "
                "which starts the engine on the bundle itself.")


@dataclass(frozen=True)
class ServedIdentity:
    """What answered, as recorded in the served metrics."""

    model: str
    engine: str
    engine_version: str | None
    root: str | None
    checkpoint_sha256: str  # the checkpoint scored; the server's files match it only where weights_checked
    root_source: str  # "server" (the card's root), "launched" (forge started it there) or "none"
    device: str | None
    weights_checked: bool = True
    weights_note: str | None = None  # why the weights could not be checked, where they were not

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_digest(directory: Path) -> str:
    files = file_digests(Path(directory), exclude=())
    listing = [[path, entry["sha256"]] for path, entry in sorted(files.items())]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def get_json(url: str, timeout_s: float = 10.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise ServeError(url, f"the server did not answer ({exc}).", f"start the server first or fix --serve-url: "
                         f"{SERVE_MD_FIX}") from None
    except json.JSONDecodeError as exc:
        raise ServeError(url, f"answered something that is not JSON ({exc}).",
                         "point --serve-url at an OpenAI-compatible server.") from None


def server_root(base_url: str) -> str:
    """http://host:port from any of host:port, .../v1 or .../v1/completions."""
    url = base_url.rstrip("/")
    for suffix in ("/v1/completions", "/v1"):
        url = url.removesuffix(suffix)
    return url


def check_served_identity(base_url: str, model_name: str, checkpoint: Path, *, device: str | None = None,
                          launched_checkpoint: Path | None = None) -> ServedIdentity:
    """Refuse (ServeError) unless the server serves `model_name` from the files of `checkpoint`."""
    root_url = server_root(base_url)
    listing = get_json(f"{root_url}/v1/models")
    cards = [c for c in (listing.get("data") or []) if isinstance(c, dict)] if isinstance(listing, dict) else []
    ids = [str(c.get("id")) for c in cards]
    card = next((c for c in cards if c.get("id") == model_name), None)
    if card is None:
        raise ServeError(f"{root_url}/v1/models", f"serves {', '.join(ids) or 'no model'}, not {model_name!r}.",
                         f"serve {checkpoint} under the name {model_name!r}, or pass --served-model-name.")
    expected = checkpoint_digest(checkpoint)
    owner = str(card.get("owned_by") or "unknown")
    engine, version = OWNERS.get(owner, owner), engine_version(root_url)
    root, source = card.get("root"), "server"
    if not root:
        if launched_checkpoint is None:
            note = unverified_weights(f"{root_url}/v1/models", model_name, engine, checkpoint)
            return ServedIdentity(model_name, engine, version, None, expected, "none", device, False, note)
        root, source = str(launched_checkpoint), "launched"
    if not Path(root).is_dir():
        raise ServeError(f"{root_url}/v1/models", f"model {model_name!r} is served from {root}, which is not a "
                         "directory on this machine, so its weights cannot be compared.",
                         f"run the server on this machine on the bundle's checkpoint: {SERVE_MD_FIX}")
    served = checkpoint_digest(Path(root))
    if served != expected:
        raise ServeError(f"{root_url}/v1/models", f"model {model_name!r} is served from {root} (checkpoint digest "
                         f"{served[:12]}…), not from {checkpoint} ({expected[:12]}…): its scores would not be this "
                         f"checkpoint's.", f"serve {checkpoint}: {SERVE_MD_FIX}")
    return ServedIdentity(model_name, engine, version, str(root), expected, source, device)


def unverified_weights(where: str, model_name: str, engine: str, checkpoint: Path) -> str:
    """A server whose card has no root: accepted only under the name the bundle's SERVE.md command
    gives it, and then said to be unverified (the WARNING here, `weights_note` in the metrics)."""
    if model_name != SERVE_MD_NAME:
        raise ServeError(where, f"model {model_name!r} reports no root path and is not served under "
                         f"{SERVE_MD_NAME!r}, the name the bundle's SERVE.md command gives it, so nothing ties it to "
                         f"{checkpoint}.", SERVE_MD_FIX)
    note = (f"{engine}'s /v1/models reports only the model id {model_name!r}, no root path or digest, so which "
            f"weights answered cannot be checked against {checkpoint}: scored as served under the bundle's "
            "SERVE.md name, unverified.")
    log.warning("%s: %s", where, note)
    return note


def engine_version(root_url: str) -> str | None:
    """`GET /version` ({"version": ...} in vLLM and trtllm-serve); None when the engine has no such route."""
    try:
        with urllib.request.urlopen(f"{root_url}/version", timeout=10) as response:
            version = json.loads(response.read()).get("version")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise ServeError(f"{root_url}/version", f"answered HTTP {exc.code}.", "check the server's log.") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, AttributeError) as exc:
        raise ServeError(f"{root_url}/version", f"no usable answer ({exc}).", "check the server's log.") from None
    return None if version is None else str(version)
