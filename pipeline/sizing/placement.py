"""Calibration placement: which GPUs of a node hold the BF16 model while ModelOpt calibrates and
exports it, planned from config.json alone (no weights, no GPU).

Why: the calibrate stage holds the *unquantized* BF16 model (Llama-3.3-70B: 141.1 GB; 405B:
812 GB), which fits on no single GPU for 405B and only barely for 70B on an H200. ModelOpt's own
example (examples/llm_ptq/example_utils.py `get_model`, used by hf_ptq.py) loads with
`device_map="auto"` across the node and lowers `max_memory` when layers spill to the CPU; this
module makes the same decision up front, deterministically, and hands the loader an explicit
accelerate device map.

Per GPU, the plan charges (all BF16, the dtype `pipeline.sources.loading` calibrates in on CUDA):
    CUDA context                 RUNTIME_OVERHEAD_BYTES (pipeline/sizing/memory.py: 1 GiB, a stated estimate)
  + weights of its modules       the same per-module sizes accelerate's `compute_module_sizes` gives
  + quantizer state              one fp32 amax per quantizer (per-tensor FP8 / NVFP4 global amax)
  + max(calibration transient, export transient): the two never overlap in time.
      calibration: the activations of the largest decoder layer at calibration batch x seq_len
      (one layer runs at a time under accelerate's hooks, so each GPU needs room for one), plus
      the logits where lm_head lives. ModelOpt's max calibrator reduces amax in place
      (modelopt/torch/quantization/utils/core_utils.py `reduce_amax`: "avoids copying").
      export: ModelOpt quantizes one weight at a time before writing it
      (export/quant_utils.py `to_quantized_weight`): FP8 is `(weight / scale).to(float8)`, a BF16
      quotient + the FP8 result = 3 bytes per element of the largest weight; NVFP4/MXFP4
      (qtensor/nvfp4_tensor.py `quantize`, `_cast_fp4`) make an fp32 scaled copy, an int32
      ordinal, a uint8 sign and a 3-wide bool comparison: about 12 bytes per element.
Modules are placed in execution order, contiguously, on the fewest GPUs that hold them, balanced
across those GPUs (as accelerate's `get_balanced_memory` balances "auto"). When the node's GPUs
cannot hold the model and `cpu_offload_gb` allows it, the rest goes to CPU RAM; GPU 0 then keeps
room for the largest offloaded module, which accelerate's hooks bring to the main device for its
forward (accelerate/utils/modeling.py `infer_auto_device_map` docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.core.errors import RecipeError
from pipeline.core.formats import FORMATS
from pipeline.core.gpus import GpuSpec
from pipeline.sizing.memory import RUNTIME_OVERHEAD_BYTES
from pipeline.sizing.shapes import ModelShape, count_params

BF16_BYTES = 2
AMAX_BYTES = 4  # one fp32 amax buffer per TensorQuantizer
# Bytes of temporaries per element of the weight being packed at export (see module docstring).
# Keyed by the format's element type (pipeline/core/formats.py), so a new format of a known element type
# needs no entry here; an unquantized format packs nothing.
EXPORT_TEMP_BYTES_PER_ELEMENT_TYPE = {"e4m3": 3, "e2m1": 12}


def export_temp_bytes_per_element(fmt: str) -> int:
    spec = FORMATS[fmt]
    return EXPORT_TEMP_BYTES_PER_ELEMENT_TYPE[spec.element_type] if spec.quantized else 0
# Transformers' decoder-only layout (LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM,
# Qwen2/Qwen3ForCausalLM, Qwen2Moe/Qwen3MoeForCausalLM, GptOssForCausalLM): model.embed_tokens,
# model.rotary_emb, model.layers.N (every layer the same size), model.norm, lm_head. DeepSeek (dense
# first layers) and Llama-4 (language_model.* beside a vision tower) are laid out otherwise.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gpt_oss")
MAX_GPUS_TO_SUGGEST = 64


@dataclass(frozen=True)
class Node:
    gpu: str
    count: int
    cpu_offload_bytes: int = 0


@dataclass(frozen=True)
class Module:
    name: str
    weight_bytes: int
    largest_tensor_elements: int  # the biggest single weight: what export packs at once
    quantizers: int
    activation_bytes: int  # transient peak while this module runs its forward


def _need_model_type(config: dict[str, Any], where: str) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RecipeError(where, f"calibration placement knows the {', '.join(SUPPORTED_MODEL_TYPES)} "
                          f"layouts, not model_type {model_type!r}.",
                          "add its module layout to pipeline/sizing/placement.py (module_list).")
    return model_type


def module_list(config: dict[str, Any], batch: int, seq_len: int, where: str = "config.json") -> list[Module]:
    """The model's top-level placement units in execution order, with BF16 sizes from config.json.

    Param counts come from `pipeline.sizing.shapes.count_params` (one source for the arithmetic); a
    decoder layer is the unit accelerate never splits (`_no_split_modules` = the decoder layer).
    """
    _need_model_type(config, where)
    shape = ModelShape.from_hf_config(config, where)
    counts = count_params(shape)
    h, L = shape.hidden, shape.layers
    # Attention biases are in count_params (ModelShape.qkv_bias / o_bias); a Llama-style mlp_bias is not.
    bias = 2 * shape.intermediate + h if config.get("mlp_bias") else 0
    layer_params = (counts.attention + counts.mlp + counts.router) // L + 2 * h + bias
    ffn = shape.expert_intermediate or shape.intermediate
    if shape.experts:
        # transformers 5 fuses each layer's experts into one gate_up_proj [E, 2I, h] parameter;
        # ModelOpt's export packs it one expert at a time (export/moe_utils.py `_export_fused_experts`).
        largest_layer_tensor = 2 * ffn * h
        layer_quantizers = 2 * (4 + 3 * shape.experts) + 2  # input+weight per Linear, + K and V
    else:
        largest_layer_tensor = max(ffn * h, shape.heads * shape.head_dim * h)
        layer_quantizers = 2 * (4 + 3) + 2
    tokens = batch * seq_len
    # Live BF16 activations per token inside one layer's MLP, its peak: residual + normed input
    # (2h), gate, up and act(gate)*up (3I). MoE: each token's top-k routed copies go through an
    # expert (k x 3I) and the layer accumulates their output (h). Attention runs through SDPA
    # (transformers' default), which keeps no seq x seq matrix.
    per_token = 2 * h + (h + shape.experts_per_token * 3 * ffn if shape.experts else 3 * ffn)
    layer_activation = tokens * per_token * BF16_BYTES
    # lm_head: BF16 logits of the calibration batch, and the fp32 copy + log-softmax (8 bytes)
    # the stage's perplexity (pipeline/sources/loading.py, batch 1) makes of one row.
    logits = tokens * shape.vocab * BF16_BYTES + seq_len * shape.vocab * 8
    embed_tokens = shape.vocab * h
    # Embeddings and lm_head stay BF16 (ModelOpt's presets disable nn.Embedding and '*lm_head*':
    # modelopt_recipes/configs/ptq/units/default_disabled_quantizers.yaml), so export packs nothing there.
    modules = [
        Module("model.embed_tokens", embed_tokens * BF16_BYTES, 0, 0, tokens * h * BF16_BYTES),
        # inv_freq + original_inv_freq, head_dim/2 each; BF16-sized as compute_module_sizes(dtype=bf16) counts them.
        Module("model.rotary_emb", shape.head_dim * BF16_BYTES, 0, 0, 0),
    ]
    modules += [Module(f"model.layers.{i}", layer_params * BF16_BYTES, largest_layer_tensor, layer_quantizers,
                       layer_activation) for i in range(L)]
    modules.append(Module("model.norm", h * BF16_BYTES, 0, 0, tokens * h * BF16_BYTES))
    # Tied embeddings: lm_head owns no tensor of its own; accelerate keeps it with embed_tokens'
    # weight, and it still produces the logits.
    head = 0 if shape.tie_embeddings else embed_tokens
    modules.append(Module("lm_head", head * BF16_BYTES, 0, 0, logits))
    return modules


@dataclass(frozen=True)
class GpuLoad:
    gpu: int
    modules: list[str]
    weight_bytes: int
    quantizer_state_bytes: int
    calibration_transient_bytes: int
    export_transient_bytes: int
    context_bytes: int
    offload_reserve_bytes: int  # GPU 0 only, when layers are offloaded: room to run the largest one
    total_bytes: int
    memory_bytes: int

    @property
    def headroom_bytes(self) -> int:
        return self.memory_bytes - self.total_bytes


def _load(index: int, group: list[Module], fmt: str, memory: int, reserve_for: int = 0) -> GpuLoad:
    weights = sum(m.weight_bytes for m in group)
    quantizers = sum(m.quantizers for m in group) * AMAX_BYTES
    calib = max((m.activation_bytes for m in group), default=0)
    export = max((m.largest_tensor_elements for m in group), default=0) * export_temp_bytes_per_element(fmt)
    total = RUNTIME_OVERHEAD_BYTES + weights + reserve_for + quantizers + max(calib, export)
    return GpuLoad(index, [m.name for m in group], weights, quantizers, calib, export, RUNTIME_OVERHEAD_BYTES,
                   reserve_for, total, memory)


def _pack(modules: list[Module], fmt: str, memory: int, cap: int, reserve_first: int = 0) -> list[list[Module]] | None:
    """Greedy contiguous packing: each GPU takes modules while its total stays within `cap`."""
    groups: list[list[Module]] = [[]]
    for module in modules:
        trial = groups[-1] + [module]
        reserve = reserve_first if len(groups) == 1 else 0
        if _load(0, trial, fmt, memory, reserve).total_bytes <= cap:
            groups[-1] = trial
        elif groups[-1] and _load(0, [module], fmt, memory).total_bytes <= cap:
            groups.append([module])
        else:
            return None
    return groups


def _balanced(modules: list[Module], fmt: str, memory: int, gpus: int) -> list[list[Module]]:
    """The packing on `gpus` GPUs whose fullest GPU is least full (binary search on the cap)."""
    lo, hi = 0, memory
    while hi - lo > 1 << 20:  # 1 MiB resolution
        mid = (lo + hi) // 2
        groups = _pack(modules, fmt, memory, mid)
        if groups is not None and len(groups) <= gpus:
            hi = mid
        else:
            lo = mid
    groups = _pack(modules, fmt, memory, hi)
    assert groups is not None
    return groups


@dataclass(frozen=True)
class CalibrationPlan:
    node: dict[str, Any]
    format: str
    batch_size: int
    seq_len: int
    gpus: int
    per_gpu_bytes: list[int]
    headroom_bytes: list[int]
    offload_bytes: int
    weights_bytes: int
    device_map: dict[str, int | str]
    loads: list[dict[str, Any]]

    def max_memory(self) -> dict[int | str, int]:
        """accelerate's `max_memory` for this plan: each used GPU's planned total, and the CPU's offload."""
        budget: dict[int | str, int] = {i: b for i, b in enumerate(self.per_gpu_bytes)}
        if self.offload_bytes:
            budget["cpu"] = self.offload_bytes
        return budget

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_calibration(config: dict[str, Any], fmt: str, gpu: GpuSpec, node: Node, batch: int, seq_len: int,
                     catalog: dict[str, GpuSpec] | None = None, where: str = "calibration.node",
                     flags: bool = False) -> CalibrationPlan:
    """The smallest, balanced placement of the BF16 model on `node`; RecipeError with a fix when none fits,
    in a recipe's calibration.node terms, or with `flags` in `forge plan`'s ad-hoc ones
    (--calibration-gpus, --cpu-offload-gb: a node of --gpu's kind)."""
    modules = module_list(config, batch, seq_len, where)
    memory = gpu.memory_bytes
    fewest = _pack(modules, fmt, memory, memory)
    offload = 0
    if fewest is not None and len(fewest) <= node.count:
        groups = _balanced(modules, fmt, memory, len(fewest))
        loads = [_load(i, g, fmt, memory) for i, g in enumerate(groups)]
        device_map: dict[str, int | str] = {m.name: i for i, g in enumerate(groups) for m in g}
    else:
        groups, offload = _offloaded(modules, fmt, memory, node)
        if groups is None or offload > node.cpu_offload_bytes:
            raise RecipeError(where, _too_small(modules, gpu, node, offload, flags),
                              _what_fits(fmt, node, batch, catalog, modules, gpu, flags))
        on_gpu = groups[:node.count]
        largest_offloaded = max(m.weight_bytes for g in groups[node.count:] for m in g)
        loads = [_load(i, g, fmt, memory, largest_offloaded if i == 0 else 0) for i, g in enumerate(on_gpu)]
        device_map = {m.name: i for i, g in enumerate(on_gpu) for m in g}
        device_map.update({m.name: "cpu" for g in groups[node.count:] for m in g})
    return CalibrationPlan(
        node=asdict(node), format=fmt, batch_size=batch, seq_len=seq_len, gpus=len(loads),
        per_gpu_bytes=[load.total_bytes for load in loads], headroom_bytes=[load.headroom_bytes for load in loads],
        offload_bytes=offload, weights_bytes=sum(m.weight_bytes for m in modules), device_map=device_map,
        loads=[{**asdict(load), "headroom_bytes": load.headroom_bytes} for load in loads],
    )


def _offloaded(modules: list[Module], fmt: str, memory: int, node: Node) -> tuple[list[list[Module]] | None, int]:
    """Fill the node's GPUs in order, GPU 0 keeping room for the largest module; the rest to CPU."""
    reserve = max(m.weight_bytes for m in modules)
    groups = _pack(modules, fmt, memory, memory, reserve_first=reserve)
    if groups is None:
        return None, sum(m.weight_bytes for m in modules)
    rest = groups[node.count:]
    return groups[:node.count] + ([[m for g in rest for m in g]] if rest else []), sum(
        m.weight_bytes for g in rest for m in g)


def _too_small(modules: list[Module], gpu: GpuSpec, node: Node, offload: int, flags: bool) -> str:
    weights = sum(m.weight_bytes for m in modules)
    text = (f"calibrating needs {weights / 1e9:,.1f} GB of BF16 weights plus activations and export buffers; "
            f"{node.count} x {node.gpu} hold {node.count * gpu.memory_bytes / 1e9:,.0f} GB")
    if offload:
        text += (f", leaving {offload / 1e9:,.1f} GB for CPU offload where "
                 f"{'--cpu-offload-gb' if flags else 'cpu_offload_gb'} allows "
                 f"{node.cpu_offload_bytes / 1e9:,.0f}")
    return text + "."


def _what_fits(fmt, node, batch, catalog, modules, gpu, flags: bool) -> str:
    """The nodes that would hold it and the offload that would, as a recipe or the ad-hoc flags spell them."""
    fewest = {}
    for key, spec in ({node.gpu: gpu} | dict(catalog or {})).items():
        groups = _pack(modules, fmt, spec.memory_bytes, spec.memory_bytes)
        if groups is not None and len(groups) <= MAX_GPUS_TO_SUGGEST:
            fewest[key] = len(groups)
    groups, offload = _offloaded(modules, fmt, gpu.memory_bytes, node)
    offload_gb = math.ceil(offload / 1e9) if groups is not None and offload else None
    if flags:  # the ad-hoc node is --gpu's kind: other kinds are a recipe's calibration.node
        parts = [f"--calibration-gpus {fewest[node.gpu]}"] if node.gpu in fewest else []
        if offload_gb:
            parts.append(f"--cpu-offload-gb {offload_gb} (slower: layers stream from host memory)")
        others = [f"{count} x {key}" for key, count in fewest.items() if key != node.gpu]
        text = ", or ".join(parts) or "lower --calibration-batch or --calibration-seq-len"
        if others:
            text += ("; or calibrate on another node that holds it (a recipe's calibration.node): "
                     + ", ".join(others))
        return text + "."
    parts = []
    if fewest:
        parts.append("use " + " or ".join(f"calibration.node {{gpu: {key}, count: {count}}}"
                                          for key, count in fewest.items()))
    if offload_gb:
        parts.append(f"set calibration.node.cpu_offload_gb: {offload_gb} (slower: layers stream "
                     "from host memory)")
    if batch > 1:
        parts.append("or lower calibration.batch_size")
    return ", ".join(parts) + "." if parts else "lower calibration.batch_size or seq_len."


def recipe_node(recipe: Any, catalog: dict[str, GpuSpec]) -> Node:
    """The recipe's calibration node, defaulted to 8 GPUs of its first target's kind."""
    spec = recipe.spec.calibration.node
    gpu = spec.gpu if spec else next(iter(recipe.spec.targets))
    if gpu not in catalog:
        raise RecipeError(f"{recipe.path}: calibration.node.gpu", f"unknown GPU '{gpu}'.",
                          f"use one of {', '.join(catalog)} (pipeline/core/data/gpus.yaml).")
    return Node(gpu=gpu, count=spec.count if spec else 8,
                cpu_offload_bytes=int((spec.cpu_offload_gb if spec else 0) * 1e9))


def placement_answer(node: Callable[[], Node], place: Callable[[Node], CalibrationPlan]) -> dict[str, Any]:
    """Placement as its own answer beside a serving plan, never stopping it: the calibration plan's JSON,
    or `refused`: the node, why it cannot hold the model and the fix."""
    chosen: Node | None = None
    try:
        chosen = node()
        return place(chosen).to_json()
    except RecipeError as exc:
        return {"refused": {"node": asdict(chosen) if chosen else None, "where": exc.where, "problem": exc.problem,
                            "fix": exc.fix}}


def plan_recipe_calibration(recipe: Any, catalog: dict[str, GpuSpec], node: Node | None = None) -> CalibrationPlan:
    """`plan_calibration` for a recipe: its model's config.json, format, calibration shape and node."""
    node = node or recipe_node(recipe, catalog)
    calibration = recipe.spec.calibration
    return plan_calibration(recipe.model.architecture(), recipe.spec.quant.format, catalog[node.gpu], node,
                            calibration.batch_size, calibration.seq_len, catalog,
                            where=f"{recipe.path}: calibration.node")


