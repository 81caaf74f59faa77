"""Does one engine load a checkpoint directory on one device? The check of an export against the engine
contracts (pipeline/engines/contracts.py), and publish's gate on its result.

Reads only config.json, hf_quant_config.json, safetensors headers and the scalar scales of fused
shards (pipeline/engines/export_rules.py), never weight data.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import CalibrationError, RegistryError
from pipeline.core.formats import FORMATS, ComputeCapability
from pipeline.core.hf_config import is_moe
from pipeline.engines.contracts import ASSERTS, ENGINES, MIXED, MOE_LOADS, MOE_REFUSES, Engine, FormatContract
from pipeline.engines.export_rules import (
    EXPORT_RULES,
    FUSED_SHARD_GROUPS,
    TensorInfo,
    check_linear,
    fused_shard_groups,
    mixed_layer_rules,
    read_export_json,
    read_headers,
    read_scalars,
    split_fused_groups,
)


@dataclass(frozen=True)
class Verdict:
    engine: str
    version: str
    device: str       # the GPU key checked against, or "cpu"
    loads: bool
    reason: str
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "version": self.version, "device": self.device,
                "loads": self.loads, "reason": self.reason, "flags": list(self.flags)}


def check_checkpoint(ckpt: Path, engine: Engine, device: str, cc: ComputeCapability | None) -> Verdict:
    """Does `engine` load the checkpoint directory on `device` (a GPU key with capability `cc`, or "cpu")?"""
    ckpt = Path(ckpt)

    def refuse(reason: str) -> Verdict:
        return Verdict(engine.name, engine.version, device, False, reason)

    if (engine.device == "cpu") != (cc is None):
        return refuse(f"a {engine.device} engine; this check is for {device}")
    quant = _quant_config(ckpt, engine.config_source)
    algo = quant.get("quant_algo") if quant else None
    contract = engine.contract(algo)
    known = dict(engine.refuses).get(str(algo).upper())
    if known:
        return refuse(f"quant_algo {algo!r}: {known}")
    if contract is None:
        if algo is None:
            return refuse("no contract for unquantized checkpoints")
        return refuse(f"quant_algo {algo!r} is not accepted (accepts {', '.join(engine.accepted()) or 'none'})")
    if contract.min_cc is not None and cc < contract.min_cc:
        return refuse(f"{contract.quant_algo or 'bf16'} needs compute capability >= {contract.min_cc}, {device} is {cc}")
    if contract.format == MIXED and (need := mixed_min_cc(engine, quant)) is not None and cc < need:
        return refuse(f"a layer format in quantized_layers needs compute capability >= {need}, {device} is {cc}")
    missing = [k for k in contract.required_keys if quant.get(k) is None]
    if missing:
        return refuse(f"{engine.config_source} quantization config lacks {', '.join(missing)}")
    notes = [contract.note] if contract.note else []
    if is_moe(_read_json(ckpt / "config.json")):
        experts = f"{contract.quant_algo or 'BF16'} mixture-of-experts"
        if contract.moe == MOE_REFUSES:
            return refuse(f"{experts}: {contract.moe_note}")
        if contract.moe != MOE_LOADS:
            return refuse(f"{experts}: forge has no verified contract for {engine.name} {engine.version}'s MoE path")
        notes.append(f"MoE: {contract.moe_note}")
    kv_algo = quant.get("kv_cache_quant_algo") if quant else None
    if kv_algo is not None:
        if str(kv_algo).upper() not in engine.kv:
            return refuse(f"kv_cache_quant_algo {kv_algo!r} is not accepted (accepts {', '.join(engine.kv)})")
        notes.append(f"KV {kv_algo}: {engine.kv[str(kv_algo).upper()]}")
    if algo is not None:
        problem = _tensor_problem(ckpt, engine, contract, quant)
        if problem:
            return refuse(problem)
    flags = contract.flags + (_kv_flags(engine) if kv_algo else ())
    return Verdict(engine.name, engine.version, device, True, "; ".join(notes), flags)


def compatibility_table(ckpt: Path, gpu_key: str, cc: ComputeCapability) -> list[Verdict]:
    """Every GPU engine on the target GPU, plus the CPU engine (what this machine can serve)."""
    return [check_checkpoint(ckpt, e, "cpu" if e.device == "cpu" else gpu_key, None if e.device == "cpu" else cc)
            for e in ENGINES.values()]


def require_loadable(table: list[dict[str, Any]], where: str) -> None:
    """Publish's gate: refuse a bundle whose compatibility table has no GPU engine that loads it."""
    gpu_rows = [r for r in table if r.get("device") != "cpu"]
    if not any(r.get("loads") for r in gpu_rows):
        reasons = "; ".join(f"{r['engine']}: {r['reason']}" for r in gpu_rows) or "no compatibility table"
        raise RegistryError(where, f"no engine loads this bundle on its GPU ({reasons}).",
                            "use a format an engine loads on that GPU (forge validate says which); "
                            "nothing unloadable is published.")


def _kv_flags(engine: Engine) -> tuple[str, ...]:
    spelled = engine.kv_cache_dtype_flag("fp8")
    return ("--kv-cache-dtype", spelled) if spelled else ()


def _quant_config(ckpt: Path, source: str) -> dict[str, Any] | None:
    """The quantization config the engine reads, flattened to one dict (quant_algo, exclude list, ...)."""
    hf = _read_json(ckpt / "hf_quant_config.json")
    nested = hf.get("quantization") if isinstance(hf.get("quantization"), dict) else None
    flat = _read_json(ckpt / "config.json").get("quantization_config")
    flat = flat if isinstance(flat, dict) else None
    if source == "hf_quant_config.json":
        return dict(nested, exclude=list(nested.get("exclude_modules") or [])) if nested else None
    if flat is not None:
        out = dict(flat, exclude=list(flat.get("ignore") or flat.get("exclude_modules") or []))
        if out.get("group_size") is None:
            # ModelOpt writes the flat group size inside config_groups.*.weights (SGLang and vLLM read it there).
            for group in (flat.get("config_groups") or {}).values():
                size = (group.get("weights") or {}).get("group_size") if isinstance(group, dict) else None
                out["group_size"] = out.get("group_size") or size
        if out.get("kv_cache_quant_algo") is None and isinstance(flat.get("kv_cache_scheme"), dict):
            scheme = flat["kv_cache_scheme"]
            out["kv_cache_quant_algo"] = "FP8" if scheme.get("type") == "float" and scheme.get("num_bits") == 8 else None
        return out
    return dict(nested, exclude=list(nested.get("exclude_modules") or [])) if nested else None


def _tensor_problem(ckpt: Path, engine: Engine, contract: FormatContract, quant: dict[str, Any]) -> str | None:
    try:
        tensors, _ = read_headers(ckpt)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is a refusal with its reason
        return f"cannot read the safetensors headers ({exc})"
    if contract.format == MIXED:
        return _mixed_problem(ckpt, engine, quant, tensors)
    rule = EXPORT_RULES[contract.format]
    patterns = [str(p) for p in quant.get("exclude") or []]
    weights = {n[: -len(".weight")]: i for n, i in tensors.items() if n.endswith(".weight") and len(i.shape) == 2}
    problems: list[str] = []
    quantized: set[str] = set()
    for module, info in sorted(weights.items()):
        excluded = _excluded(engine.exclude_match, module, patterns)
        if excluded is None:
            return f"{module}: exclude patterns cover some but not all shards of its fused layer"
        if excluded:
            if info.dtype not in ("BF16", "F16", "F32"):
                problems.append(f"{module} is {info.dtype} but {engine.name} matches it as excluded (loads it unquantized)")
        else:
            quantized.add(module)
            problems.extend(check_linear(module, info, tensors, rule))
    if contract.fused == ASSERTS:
        problems.extend(_unequal_shards(ckpt, quantized, tensors, rule.fused_equal))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return "; ".join(problems[:3]) + more
    return None


def _mixed_problem(ckpt: Path, engine: Engine, quant: dict[str, Any], tensors: dict[str, TensorInfo]) -> str | None:
    """A MIXED_PRECISION checkpoint: every layer's quant_algo is one the engine runs, its tensors
    follow that format, fused groups have one format and (where the engine asserts) equal scales."""
    problems: list[str] = []
    layers = mixed_layer_rules(quant, problems)
    weights = {n[: -len(".weight")]: i for n, i in tensors.items() if n.endswith(".weight") and len(i.shape) == 2}
    by_format: dict[str, set[str]] = {}
    for module, info in sorted(weights.items()):
        fmt = layers.get(module)
        if fmt is None:
            if info.dtype not in ("BF16", "F16", "F32"):
                problems.append(f"{module} is {info.dtype} but absent from quantized_layers (loaded unquantized)")
            continue
        layer_contract = engine.contract(FORMATS[fmt].quant_algo)
        if layer_contract is None or layer_contract.format == MIXED:
            problems.append(f"{module}: per-layer quant_algo {FORMATS[fmt].quant_algo} is not one {engine.name} runs")
            continue
        by_format.setdefault(fmt, set()).add(module)
        problems.extend(check_linear(module, info, tensors, EXPORT_RULES[fmt]))
    problems.extend(split_fused_groups(layers))
    for fmt, modules in by_format.items():
        if engine.contract(FORMATS[fmt].quant_algo).fused == ASSERTS:
            problems.extend(_unequal_shards(ckpt, modules, tensors, EXPORT_RULES[fmt].fused_equal))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return "; ".join(problems[:3]) + more
    return None


def mixed_min_cc(engine: Engine, quant: dict[str, Any]) -> ComputeCapability | None:
    """The highest minimum compute capability over a MIXED_PRECISION config's layer formats."""
    ccs = [c.min_cc for fmt in set(mixed_layer_rules(quant, []).values())
           if (c := engine.contract(FORMATS[fmt].quant_algo)) is not None and c.min_cc is not None]
    return max(ccs, key=lambda c: (c.major, c.minor)) if ccs else None


def _unequal_shards(ckpt: Path, modules: set[str], tensors: dict[str, TensorInfo], suffixes: tuple[str, ...]) -> list[str]:
    groups = fused_shard_groups(modules)
    values = read_scalars(ckpt, [f"{m}.{s}" for g in groups for m in g for s in suffixes if f"{m}.{s}" in tensors])
    out = []
    for g in groups:
        for s in suffixes:
            if len({values.get(f"{m}.{s}") for m in g}) > 1:
                out.append(f"{g[0].rsplit('.', 1)[0]}: fused shards have different {s}")
    return out


def _excluded(how: str, module: str, patterns: list[str]) -> bool | None:
    """Whether the engine loads `module` unquantized; None when only part of its fused layer is."""
    parent, _, leaf = module.rpartition(".")
    group = next((g for g in FUSED_SHARD_GROUPS if leaf in g), None)
    if group is None:
        return _match(how, module, patterns, fused_name=None)
    fused = f"{parent}.{'qkv_proj' if 'q_proj' in group else 'gate_up_proj'}"
    shards = [_match(how, f"{parent}.{s}", patterns, fused_name=fused) for s in group]
    if any(shards) and not all(shards):
        return None  # vLLM/SGLang raise "some but not all shards"; TensorRT-LLM loads one method per fused Linear
    return shards[0]


def _match(how: str, name: str, patterns: list[str], fused_name: str | None) -> bool:
    if how == "trtllm":
        # fnmatchcase on TensorRT-LLM's own (fused) module names, shard names expanded
        # (QuantConfig.is_module_excluded_from_quantization, tensorrt_llm/models/modeling_utils.py).
        names = [name] + ([fused_name] if fused_name else [])
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)
    if how == "vllm":
        # ModelOptQuantConfigBase.is_layer_excluded: exact (fused-aware), then substring, then
        # fnmatch, after apply_vllm_mapper split "x*" into "x" and "x.*".
        split = [q for p in patterns for q in ((p[:-1], p[:-1] + ".*") if len(p) > 1 and p[-1] == "*" and p[-2] != "." else (p,))]
        return any(name == p or p in name or fnmatch.fnmatch(name, p) for p in split)
    if how == "sglang":
        # is_layer_excluded: re.fullmatch of the pattern ("*" -> ".*") on the whole prefix.
        return any(re.fullmatch(re.escape(p).replace(r"\*", ".*"), name) for p in patterns)
    raise ValueError(how)


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when it is missing, not JSON or not an object: an engine that
    finds no quantization config treats the checkpoint as unquantized, and the refusal says so."""
    try:
        return read_export_json(path)
    except CalibrationError:
        return {}
