"""The memory plan per GPU (TensorRT-LLM PyTorch backend, docs reference/memory):
    weights/TP + reserve + KV pool <= GPU memory
    reserve = RUNTIME_OVERHEAD_BYTES + activations for one step of max_num_tokens
    KV pool = kv_cache_free_gpu_memory_fraction x (memory - weights/TP - reserve)
The KV pool is paged in blocks of KV_BLOCK_TOKENS tokens (TensorRT-LLM tokens_per_block default 32),
so a sequence of L tokens holds ceil(L/32) blocks. From it: whether a serving shape fits at a TP,
the smallest TP that does, and which (format, GPU, TP) would."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from pipeline.core.formats import Format, KvCacheDtype
from pipeline.core.gpus import GpuSpec
from pipeline.sizing.parallel import (
    Parallelism,
    kv_bytes_per_token,
    parallelism_problem,
    weight_bytes_per_gpu,
)
from pipeline.sizing.shapes import TP_CHOICES, ModelShape, ParamCounts, count_params, weight_bytes

KV_BLOCK_TOKENS = 32
# CUDA context, cuBLAS/NCCL workspaces and the runtime's own buffers: ~0.5-1 GiB seen on H100
# (nvidia-smi with an idle PyTorch context). A stated estimate, not a measurement.
RUNTIME_OVERHEAD_BYTES = 1 << 30
# Largest live activations in one decoder layer for a step of T tokens, BF16: the residual stream
# and the normed input (2 x hidden) plus the MLP's gate and up projections (2 x intermediate / TP).
ACTIVATION_BYTES_PER_ELEMENT = 2


@dataclass(frozen=True)
class ServingShape:
    max_input_len: int
    max_output_len: int
    seq_len: int
    max_num_tokens: int = 8192
    kv_cache_free_gpu_memory_fraction: float = 0.9
    concurrency: int | None = None
    price_per_gpu_hour_usd: float | None = None

    @property
    def mean_decode_context(self) -> float:
        """Average tokens of context per decode step: the prompt plus half the output."""
        return self.max_input_len + self.max_output_len / 2


def reserve_bytes(shape: ModelShape, serving: ServingShape, par: Parallelism) -> int:
    per_token = 2 * shape.hidden + 2 * (shape.expert_intermediate or shape.intermediate) // par.tp
    return RUNTIME_OVERHEAD_BYTES + serving.max_num_tokens * per_token * ACTIVATION_BYTES_PER_ELEMENT


class MemorySplit(NamedTuple):
    """One GPU's memory under a parallelism: what the weights and the reserve take, the KV pool and
    what it holds. Under attention DP each rank's pool holds its own sequences, so the instance
    serves `dp_ranks` times one rank's batch."""

    weights: int  # all GPUs
    weights_per_gpu: int
    reserve: int
    left: int  # for the KV pool, before the fraction; 0 when nothing is left
    pool: int
    capacity: int  # tokens one GPU's pool holds
    max_batch: int  # sequences of serving.seq_len the instance serves at once (all DP ranks)
    why_not: str | None  # None when it fits
    max_batch_per_rank: int = 0


def memory_at_tp(shape: ModelShape, counts: ParamCounts, fmt: Format, kv: KvCacheDtype, gpu: GpuSpec,
                 serving: ServingShape, par: Parallelism, expert_fmt: Format | None = None) -> MemorySplit:
    weights = weight_bytes(counts, fmt, expert_fmt)
    weights_per_gpu = weight_bytes_per_gpu(counts, fmt, par, expert_fmt)
    reserve = reserve_bytes(shape, serving, par)
    left = gpu.memory_bytes - weights_per_gpu - reserve
    # Every layer at full length, sliding-window ones too: that is what TensorRT-LLM 1.2 allocates.
    # Without kv_cache_config.max_attention_window the KV manager sizes every layer to max_seq_len
    # (tensorrt_llm/_torch/pyexecutor/resource_manager.py KVCacheManager.__init__: "Use max_seq_len as
    # default max_attention_window"); with a per-layer window list it splits the pool *equally* per
    # window size (calculate_max_num_blocks_for_vswa, unless TRTLLM_WINDOW_SIZE_SHARES says otherwise),
    # which for gpt-oss's half-sliding layers leaves the full layers the same tokens. So forge writes
    # no window list and plans what the runtime holds.
    kv_per_token_gpu = kv_bytes_per_token(shape, kv, par)
    pool = max(0, int(left * serving.kv_cache_free_gpu_memory_fraction))
    blocks = int(pool // (kv_per_token_gpu * KV_BLOCK_TOKENS))
    capacity = blocks * KV_BLOCK_TOKENS
    per_rank = blocks // math.ceil(serving.seq_len / KV_BLOCK_TOKENS)
    if left <= 0:
        why = (
            f"weights {weights_per_gpu / 1e9:.1f} GB/GPU + reserve {reserve / 1e9:.1f} GB exceed "
            f"{gpu.memory_bytes / 1e9:.0f} GB at {par}"
        )
    elif per_rank < 1:
        why = (
            f"KV pool {pool / 1e9:.2f} GB holds {capacity} tokens, less than one sequence of {serving.seq_len}"
        )
    else:
        why = None
    return MemorySplit(weights, weights_per_gpu, reserve, max(0, left), pool, capacity, per_rank * par.dp_ranks,
                       why, per_rank)


def smallest_fitting_tp(shape: ModelShape, counts: ParamCounts, fmt: Format, kv: KvCacheDtype, gpu: GpuSpec,
                        serving: ServingShape) -> int | None:
    for tp in TP_CHOICES:
        par = Parallelism(tp)
        if parallelism_problem(shape, par) is None and memory_at_tp(shape, counts, fmt, kv, gpu, serving, par).why_not is None:
            return tp
    return None


@dataclass(frozen=True)
class Alternative:
    """One (format, GPU, TP) under which the same model and serving shape fits: computed by the
    planner, never guessed."""

    format: str
    gpu: str
    tp: int
    max_batch: int

    def __str__(self) -> str:
        return f"{self.format} on {self.gpu} x{self.tp} (max batch {self.max_batch})"


def fitting_alternatives(
    config: dict[str, Any],
    formats: list[Format],
    kv: KvCacheDtype,
    catalog: dict[str, GpuSpec],
    serving: ServingShape,
) -> list[Alternative]:
    """For each (format, GPU) the format and KV cache can run on, the smallest TP that fits,
    ordered by GPUs used, then by the most sequences served."""
    shape = ModelShape.from_hf_config(config)
    counts = count_params(shape)
    found = []
    for fmt in formats:
        for key, gpu in catalog.items():
            if not (fmt.min_compute_capability <= gpu.cc and kv.min_compute_capability <= gpu.cc):
                continue
            tp = smallest_fitting_tp(shape, counts, fmt, kv, gpu, serving)
            if tp is not None:
                max_batch = memory_at_tp(shape, counts, fmt, kv, gpu, serving, Parallelism(tp)).max_batch
                found.append(Alternative(fmt.name, key, tp, max_batch))
    return sorted(found, key=lambda a: (a.tp, -a.max_batch))
