"""Served decode rate on this machine: a short, fixed generation load against a running engine.

Measured, not predicted: `requests` concurrent completions of `max_tokens` tokens each from one
fixed prompt (greedy, `ignore_eos` so every request generates exactly max_tokens; vLLM's sampling
params accept it), tokens counted from the server's own `usage.completion_tokens`, divided by wall
time. On a 2-core CPU this is a property of the machine, not of the target GPU.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.core.errors import ServeError

PROMPT = "The history of the printing press begins"


@dataclass(frozen=True)
class DecodeRate:
    requests: int
    max_tokens: int
    completion_tokens: int
    seconds: float
    tok_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _complete(base_url: str, model: str, max_tokens: int, timeout_s: float) -> int:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{base_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        usage = json.loads(response.read()).get("usage") or {}
    tokens = usage.get("completion_tokens")
    if not isinstance(tokens, int):
        raise ServeError(f"{base_url}/v1/completions", "the answer carries no usage.completion_tokens.",
                         "use an OpenAI-compatible engine that reports usage.")
    return tokens


def measure_decode(base_url: str, model: str, requests: int = 4, max_tokens: int = 64,
                   timeout_s: float = 300.0) -> DecodeRate:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=requests) as pool:
        tokens = sum(pool.map(lambda _: _complete(base_url, model, max_tokens, timeout_s), range(requests)))
    seconds = time.perf_counter() - start
    return DecodeRate(requests, max_tokens, tokens, round(seconds, 3), round(tokens / seconds, 2))
