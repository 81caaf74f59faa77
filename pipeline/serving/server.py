"""Start an engine on a checkpoint, on loopback, wait until it answers, and always stop it.

`running_engine(...)` is a context manager: the DVC serve stages (`forge baseline --serve`, `forge
evaluate --bundle`) and the tests use it the same way. The engine runs in its own process group
(start_new_session) so the stop reaches every worker it spawned (vLLM's engine core is a separate
process): SIGTERM to the group, then SIGKILL after a grace period. Readiness is `GET /v1/models`
answering 200, polled until a timeout; if the process exits first, the error carries the tail of its
log.

Memory is bounded: vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB; vllm/envs.py),
not from a fraction of RAM, so a small value keeps a 135M model's server near 2 GB here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ServeError
from pipeline.serving.engines_here import TRTLLM_SERVE, VLLM, EngineChoice

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LAUNCHER = Path(__file__).with_name("launch_vllm.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SERVE_PYTHON = REPO_ROOT / ".venv-serve" / "bin" / "python"
READY_TIMEOUT_S = 900.0  # measured here: 130-140 s for the first vLLM CPU start (it compiles)
STOP_GRACE_S = 30.0
KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE
RESERVED_CPUS = 0  # VLLM_CPU_NUM_OF_RESERVED_CPU, see engine_env
MAX_MODEL_LEN = 4096  # the smoke suite's longest request is well under this


@dataclass(frozen=True)
class EngineConfig:
    """How to start one engine on one checkpoint."""

    choice: EngineChoice
    checkpoint: Path
    served_model_name: str
    serve_python: Path = DEFAULT_SERVE_PYTHON
    kv_cache_gib: int = KV_CACHE_GIB
    max_model_len: int = MAX_MODEL_LEN
    extra_llm_api_options: Path | None = None  # trtllm-serve: the bundle's llm_api_options.yaml


@dataclass(frozen=True)
class RunningEngine:
    engine: str
    base_url: str  # http://127.0.0.1:PORT
    pid: int
    start_seconds: float
    log_path: Path


def free_port() -> int:
    """A port the kernel says is free on loopback now (the engine binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def engine_argv(config: EngineConfig, port: int) -> list[str]:
    checkpoint = str(Path(config.checkpoint).resolve())
    if config.choice.engine == VLLM:
        # --enforce-eager: no torch.compile warm-up (CompilationMode.NONE, vllm/config/vllm.py; the CPU
        # platform otherwise compiles with inductor, vllm/platforms/cpu.py). Measured here on the BF16
        # baseline (smoke suite, 2 loaded cores): eager ready in 129 s, acc 0.7483 / acc_norm 0.7219 /
        # word ppl 133.40; compiled ready in 242 s, 0.7417 / 0.7219 / 133.2; in-process 0.7483 /
        # 0.7285 / 133.31. Both within one question of 151, so the faster start wins.
        # `serve` flags: vllm/engine/arg_utils.py (EngineArgs) and vllm/entrypoints/openai/cli_args.py.
        # The format's own flags (--dtype, --quantization, and for FP8 --enable-lora) come from the
        # vllm-cpu engine contract (pipeline/engines/contracts.py), each with its reason there.
        return [str(config.serve_python), str(LAUNCHER), "--model", checkpoint, "--host", LOOPBACK, "--port", str(port),
                "--served-model-name", config.served_model_name, *config.choice.flags,
                "--max-model-len", str(config.max_model_len), "--kv-cache-dtype", config.choice.kv_cache_dtype,
                "--max-num-seqs", "8", "--disable-uvicorn-access-log", "--enforce-eager"]
    if config.choice.engine == TRTLLM_SERVE:
        argv = [TRTLLM_SERVE, checkpoint, "--host", LOOPBACK, "--port", str(port), "--backend", "pytorch"]
        if config.extra_llm_api_options is not None:
            argv += ["--extra_llm_api_options", str(Path(config.extra_llm_api_options).resolve())]
        return argv
    raise ServeError(str(config.checkpoint), f"no engine to start: {config.choice.reason}.",
                     "record it as not served (the serve stages do) instead of starting an engine.")


def engine_env(config: EngineConfig) -> dict[str, str]:
    env = dict(os.environ)
    if config.choice.engine == VLLM:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_gib)
        # vLLM's CPU build keeps one core per rank for its scheduler on x86 (utils/ompmultiprocessing.py,
        # `reserve_cpu_num`), which on a 2-core machine halves the cores that compute. Measured here on
        # the fp8 bundle (151-question subset + prose): served scoring 243 s -> 183 s, samples
        # byte-identical. A value already in the environment wins.
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(RESERVED_CPUS))
        # Offline like every forge compute stage: the checkpoint is local, no Hub lookups.
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return env


@contextmanager
def running_engine(config: EngineConfig, log_path: Path, ready_timeout_s: float = READY_TIMEOUT_S) -> Iterator[RunningEngine]:
    """Start the engine, yield once `/v1/models` answers, stop its whole process group on exit."""
    if config.choice.engine == VLLM and not Path(config.serve_python).is_file():
        raise ServeError(str(config.serve_python), "the serving venv is missing (vLLM runs from its own venv).",
                         "run `make serve-env`.")
    port = free_port()
    argv = engine_argv(config, port)
    base_url = f"http://{LOOPBACK}:{port}"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting %s on %s at %s (log %s)", config.choice.engine, config.checkpoint, base_url, log_path)
    start = time.monotonic()
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=engine_env(config), start_new_session=True)
    try:
        wait_ready(base_url, proc, log_path, ready_timeout_s)
        seconds = round(time.monotonic() - start, 1)
        log.info("%s ready in %.1f s", config.choice.engine, seconds)
        yield RunningEngine(str(config.choice.engine), base_url, proc.pid, seconds, log_path)
    finally:
        stop(proc)


def wait_ready(base_url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise ServeError(str(log_path), f"the engine exited with code {code} before it was ready: "
                             f"{log_tail(log_path)}", "read the engine log; the format may need another engine.")
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as response:
                if response.status == 200:
                    json.loads(response.read())
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(2.0)
    raise ServeError(str(log_path), f"the engine did not answer {base_url}/v1/models within {timeout_s:.0f} s: "
                     f"{log_tail(log_path)}", "give it a longer readiness timeout, or read the engine log.")


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the engine's process group, SIGKILL what is left after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("engine pid %d ignored SIGTERM for %.0f s: killing its process group", proc.pid, grace_s)
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived the parent, if any
    except ProcessLookupError:
        pass
    proc.wait(timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive(proc.pid):
        log.warning("engine process group %d still has live processes after SIGKILL", proc.pid)


def group_alive(pgid: int) -> bool:
    """Any process of group `pgid` that is not a zombie (a killed worker is a zombie until its new
    parent reaps it; it holds no memory or port, so it does not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"
