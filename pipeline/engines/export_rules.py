"""Verify a ModelOpt unified HF checkpoint before anything is built from it.

Reads JSON files, safetensors headers (names, dtypes, shapes) and the per-tensor scalar scales
of fused shards, never weight data, so checking a 70B export costs milliseconds. The rules below were read off what
nvidia-modelopt 0.47 `export_hf_checkpoint` actually writes for a Llama model (checked by
tests/unit/test_export_check.py on a tiny Llama, CPU):

- fp8:   weight F8_E4M3; weight_scale F32 scalar; input_scale F32 scalar.
- nvfp4: weight U8 [out, in/2] (two E2M1 per byte); weight_scale F8_E4M3 [out, in/16];
         weight_scale_2 F32 scalar (global); input_scale F32 scalar.
- mxfp4: weight U8 [out, in/2]; weight_scale U8 (E8M0 exponents) [out, in/32]; no input
         scale: MXFP4 activations are scaled dynamically. quant_algo is written lower case.
- w4a8_mxfp4_fp8: the mxfp4 weight layout plus an F32 scalar input_scale (FP8 activations);
         quant_algo "W4A8_MXFP4_FP8", group_size 32.
- fused shards (q/k/v, gate/up of one block): equal fp8 weight_scale and input_scale, equal
  nvfp4 weight_scale_2 and input_scale (values read from the scalar tensors only).
- MIXED_PRECISION (pipeline/core/formats.py): each layer in `quantized_layers` follows the rule of its
  own quant_algo; a layer absent from it is unquantized; a fused group has one format.
- KV cache (fp8 or nvfp4): `k_scale` on k_proj and `v_scale` on v_proj, F32 scalars, one pair
  per decoder layer; `kv_cache_quant_algo` "FP8" / "NVFP4".
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import CalibrationError
from pipeline.core.formats import MIXED_PRECISION_QUANT_ALGO

# How many offending tensors an error spells out before summarising the rest.
_MAX_PROBLEMS_IN_ERROR = 10

# Bytes per element for the safetensors dtype names that appear in exports.
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_UNQUANTIZED_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class ScaleRule:
    """One scale tensor every quantized Linear carries, named `<module>.<suffix>`."""

    suffix: str
    dtype: str
    per_block: bool  # False: one value per tensor; True: [out, in / block_size]


@dataclass(frozen=True)
class ExportRule:
    """What a quantized Linear looks like on disk for one weight format."""

    weight_dtype: str
    values_per_element: int  # FP4 packs two values per U8 byte
    block_size: int | None
    scales: tuple[ScaleRule, ...]
    # Per-tensor scales every shard of a fused group (FUSED_SHARD_GROUPS) must share.
    fused_equal: tuple[str, ...] = ()


@dataclass(frozen=True)
class KvExportRule:
    scale_suffixes: tuple[str, ...]
    dtype: str


# Keyed by the format registry's names (pipeline/core/formats.py FORMATS).
EXPORT_RULES: dict[str, ExportRule] = {
    "fp8": ExportRule(
        weight_dtype="F8_E4M3",
        values_per_element=1,
        block_size=None,
        scales=(ScaleRule("weight_scale", "F32", False), ScaleRule("input_scale", "F32", False)),
        fused_equal=("weight_scale", "input_scale"),
    ),
    "nvfp4": ExportRule(
        weight_dtype="U8",
        values_per_element=2,
        block_size=16,
        scales=(
            ScaleRule("weight_scale", "F8_E4M3", True),
            ScaleRule("weight_scale_2", "F32", False),
            ScaleRule("input_scale", "F32", False),
        ),
        # The per-16 weight_scale stays per shard (F8_E4M3, checked above); only the global ones
        # are shared.
        fused_equal=("weight_scale_2", "input_scale"),
    ),
    "mxfp4": ExportRule(
        weight_dtype="U8",
        values_per_element=2,
        block_size=32,
        scales=(ScaleRule("weight_scale", "U8", True),),
    ),
    # Weights as mxfp4; plus the FP8 activations' per-tensor input_scale (TensorRT-LLM's
    # W4A8MXFP4FP8LinearMethod quantizes activations dynamically and does not read it).
    "w4a8_mxfp4_fp8": ExportRule(
        weight_dtype="U8",
        values_per_element=2,
        block_size=32,
        scales=(ScaleRule("weight_scale", "U8", True), ScaleRule("input_scale", "F32", False)),
        fused_equal=("input_scale",),
    ),
}

# Sibling Linears that engines load into one fused GEMM, by the last component of their module
# name: vLLM's `packed_modules_mapping` ("qkv_proj": q/k/v, "gate_up_proj": gate/up;
# vllm/model_executor/models/llama.py) and TensorRT-LLM's WeightMode.FUSED_QKV_LINEAR /
# FUSED_GATE_UP_LINEAR (tensorrt_llm/_torch/modules/linear.py). A fused GEMM has one scale, so
# the shards' per-tensor scales must be equal (modelopt_glue.unify_fused_shard_scales).
FUSED_SHARD_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# Keyed by the format registry's KV-cache names (pipeline/core/formats.py KV_CACHE_DTYPES).
KV_EXPORT_RULES: dict[str, KvExportRule] = {
    "fp8": KvExportRule(("k_scale", "v_scale"), "F32"),
    "nvfp4": KvExportRule(("k_scale", "v_scale"), "F32"),
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES.get(self.dtype, 0)


@dataclass(frozen=True)
class ExportReport:
    path: Path
    quant_algo: str
    kv_cache_quant_algo: str | None
    quantized_layers: int
    excluded_layers: int  # 2-D weights matched by exclude_modules (embeddings, lm_head, ...)
    kv_scale_tensors: int
    quantized_weight_bytes: int
    other_tensor_bytes: int  # unquantized weights, norms and all scales
    files: dict[str, int]  # file name -> bytes on disk

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": self.kv_cache_quant_algo,
            "quantized_layers": self.quantized_layers,
            "excluded_layers": self.excluded_layers,
            "kv_scale_tensors": self.kv_scale_tensors,
            "quantized_weight_bytes": self.quantized_weight_bytes,
            "other_tensor_bytes": self.other_tensor_bytes,
            "total_bytes": self.total_bytes,
            "files": dict(self.files),
        }


def verify_unified_export(
    export_dir: Path | str,
    expected_quant_algo: str,
    expected_kv_algo: str | None,
    format_tensor_rules: ExportRule,
    kv_tensor_rules: KvExportRule | None = None,
) -> ExportReport:
    """Check an export's quant config and tensor layout against one format's rules.

    Every 2-D `<module>.weight` not matched by the export's own `exclude_modules` must be a
    quantized Linear with the rule's weight dtype and every scale; excluded ones must be
    unquantized. Raises CalibrationError listing what is wrong and what was expected.
    `kv_tensor_rules` defaults to the fp8/nvfp4 KV rule matching `expected_kv_algo`.
    """
    export_dir = Path(export_dir)
    where = str(export_dir)
    quant = read_quant_config(export_dir)
    hf_config = read_export_json(export_dir / "config.json")
    problems: list[str] = []

    algo = quant.get("quant_algo")
    # ModelOpt 0.47 writes "FP8"/"NVFP4" but "mxfp4" (seen in its exports here); TensorRT-LLM reads both.
    if str(algo).upper() != expected_quant_algo.upper():
        problems.append(f"hf_quant_config.json quant_algo is {algo!r}, expected {expected_quant_algo!r}")
    kv_algo = quant.get("kv_cache_quant_algo")
    if _upper(kv_algo) != _upper(expected_kv_algo):
        problems.append(f"hf_quant_config.json kv_cache_quant_algo is {kv_algo!r}, expected {expected_kv_algo!r}")
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, dict):
        problems.append("config.json has no quantization_config (TensorRT-LLM reads it from there)")
    else:
        if qc.get("quant_method") != "modelopt":
            problems.append(f"config.json quant_method is {qc.get('quant_method')!r}, expected 'modelopt'")
        if str(qc.get("quant_algo")).upper() != str(algo).upper():
            problems.append(
                f"config.json quant_algo {qc.get('quant_algo')!r} differs from hf_quant_config.json {algo!r}"
            )

    tensors, files = read_headers(export_dir)
    exclude = [str(p) for p in quant.get("exclude_modules") or []]
    layer_rules = mixed_layer_rules(quant, problems) if str(algo).upper() == MIXED_PRECISION_QUANT_ALGO else None
    quantized = excluded = 0
    q_bytes = 0
    quantized_modules: dict[str, set[str]] = {}  # rule key -> modules
    for name, info in sorted(tensors.items()):
        if not name.endswith(".weight") or len(info.shape) != 2:
            continue
        module = name[: -len(".weight")]
        if layer_rules is not None:
            key = layer_rules.get(module)  # a layer absent from quantized_layers is unquantized
        else:
            key = None if is_excluded(module, exclude) else ""
        if key is None:
            excluded += 1
            if info.dtype not in _UNQUANTIZED_DTYPES:
                problems.append(f"{name} is {info.dtype} but its module is excluded (expected BF16)")
            continue
        rule = EXPORT_RULES[key] if key else format_tensor_rules
        quantized += 1
        quantized_modules.setdefault(key, set()).add(module)
        q_bytes += info.nbytes
        problems.extend(check_linear(module, info, tensors, rule))

    for key, modules in quantized_modules.items():
        rule = EXPORT_RULES[key] if key else format_tensor_rules
        problems.extend(_check_fused_scales(export_dir, modules, tensors, rule.fused_equal))
    if layer_rules is not None:
        problems.extend(split_fused_groups(layer_rules))

    kv_rule = kv_tensor_rules
    if kv_rule is None and expected_kv_algo is not None:
        kv_rule = KV_EXPORT_RULES.get(expected_kv_algo.lower())
    kv_suffixes = kv_rule.scale_suffixes if kv_rule else ("k_scale", "v_scale")
    kv_names = [n for n in tensors if n.rsplit(".", 1)[-1] in kv_suffixes]
    kv_count = len(kv_names)
    if expected_kv_algo is None:
        if kv_names:
            problems.append(f"KV cache expected unquantized but found {kv_names[:3]}")
    elif kv_rule is not None:
        layers = hf_config.get("num_hidden_layers")
        for suffix in kv_rule.scale_suffixes:
            found = [n for n in kv_names if n.endswith(f".{suffix}")]
            if isinstance(layers, int) and len(found) != layers:
                problems.append(
                    f"{len(found)} *.{suffix} tensors for {layers} layers "
                    f"(KV cache {expected_kv_algo} needs one per layer)"
                )
            for n in found:
                problems.extend(_check_scale(n, tensors[n], kv_rule.dtype, ()))

    if quantized == 0:
        problems.append("no quantized Linear weights found")
    if problems:
        shown = "; ".join(problems[:_MAX_PROBLEMS_IN_ERROR])
        more = f" (and {len(problems) - _MAX_PROBLEMS_IN_ERROR} more)" if len(problems) > _MAX_PROBLEMS_IN_ERROR else ""
        raise CalibrationError(
            where,
            f"export does not match {expected_quant_algo} (KV {expected_kv_algo}): {shown}{more}.",
            "re-run the calibrate stage with the pinned ModelOpt; never edit an export by hand.",
        )
    total_tensor_bytes = sum(i.nbytes for i in tensors.values())
    return ExportReport(
        path=export_dir,
        quant_algo=str(algo),
        kv_cache_quant_algo=kv_algo,
        quantized_layers=quantized,
        excluded_layers=excluded,
        kv_scale_tensors=kv_count,
        quantized_weight_bytes=q_bytes,
        other_tensor_bytes=total_tensor_bytes - q_bytes,
        files=files,
    )


def mixed_layer_rules(quant: dict[str, Any], problems: list[str]) -> dict[str, str]:
    """Module -> registry format for a MIXED_PRECISION config's `quantized_layers` (appends problems)."""
    from pipeline.core.formats import format_of_quant_algo

    layers = quant.get("quantized_layers")
    if not isinstance(layers, dict) or not layers:
        problems.append(f"quant_algo {MIXED_PRECISION_QUANT_ALGO} without a quantized_layers map")
        return {}
    out = {}
    for module, entry in layers.items():
        algo = entry.get("quant_algo") if isinstance(entry, dict) else None
        fmt = format_of_quant_algo(algo) if algo else None
        if fmt is None or fmt not in EXPORT_RULES:
            problems.append(f"quantized_layers[{module!r}] has quant_algo {algo!r}, not a format forge knows")
            continue
        block = EXPORT_RULES[fmt].block_size
        if block is not None and entry.get("group_size") != block:
            problems.append(f"quantized_layers[{module!r}] group_size is {entry.get('group_size')!r}, expected {block}")
        out[module] = fmt
    return out


def split_fused_groups(layer_formats: dict[str, str | None]) -> list[str]:
    """Fused groups (FUSED_SHARD_GROUPS) whose shards have different formats (None: unquantized)."""
    out = []
    parents = sorted({m.rsplit(".", 1)[0] for m in layer_formats if "." in m})
    for parent in parents:
        for names in FUSED_SHARD_GROUPS:
            found = {n: layer_formats.get(f"{parent}.{n}") for n in names}
            if len(set(found.values())) > 1:
                shown = ", ".join(f"{n} {f or 'bf16'}" for n, f in found.items())
                out.append(f"{parent}: fused shards in different formats ({shown})")
    return out


def check_linear(module: str, weight: TensorInfo, tensors: dict[str, TensorInfo], rule: ExportRule) -> list[str]:
    problems: list[str] = []
    if weight.dtype != rule.weight_dtype:
        problems.append(f"{module}.weight is {weight.dtype}, expected {rule.weight_dtype}")
        return problems
    rows, cols = weight.shape
    in_features = cols * rule.values_per_element
    for scale in rule.scales:
        name = f"{module}.{scale.suffix}"
        info = tensors.get(name)
        if info is None:
            problems.append(f"{name} is missing (expected {scale.dtype})")
            continue
        expected_shape: tuple[int, ...] = ()
        if scale.per_block and rule.block_size:
            expected_shape = (rows, math.ceil(in_features / rule.block_size))
        problems.extend(_check_scale(name, info, scale.dtype, expected_shape))
    return problems


def fused_shard_groups(modules: set[str]) -> list[tuple[str, ...]]:
    """Groups of quantized modules (full names) that engines fuse, complete groups only."""
    groups = []
    for parent in sorted({m.rsplit(".", 1)[0] for m in modules if "." in m}):
        for names in FUSED_SHARD_GROUPS:
            members = tuple(f"{parent}.{n}" for n in names)
            if all(m in modules for m in members):
                groups.append(members)
    return groups


def _check_fused_scales(
    export_dir: Path, modules: set[str], tensors: dict[str, TensorInfo], suffixes: tuple[str, ...]
) -> list[str]:
    problems: list[str] = []
    if not suffixes:
        return problems
    groups = fused_shard_groups(modules)
    wanted = [f"{m}.{s}" for g in groups for m in g for s in suffixes if f"{m}.{s}" in tensors]
    values = read_scalars(export_dir, wanted)
    for group in groups:
        for suffix in suffixes:
            found = {m: values.get(f"{m}.{suffix}") for m in group}
            if None in found.values() or len(set(found.values())) == 1:
                continue  # a missing scale is reported by check_linear
            shown = ", ".join(f"{m.rsplit('.', 1)[-1]} {v:.6g}" for m, v in found.items())
            problems.append(
                f"{group[0].rsplit('.', 1)[0]}: fused shards have different {suffix} ({shown}); "
                "engines fuse them into one GEMM with one scale"
            )
    return problems


def read_scalars(export_dir: Path, names: list[str]) -> dict[str, float]:
    """Values of one-element tensors, read from the shards that hold them (bytes, not the model)."""
    from safetensors import safe_open

    left, out = set(names), {}
    for shard in sorted(export_dir.glob("*.safetensors")):
        if not left:
            break
        with safe_open(str(shard), framework="pt") as f:
            for key in left & set(f.keys()):
                t = f.get_tensor(key)
                if t.numel() == 1:
                    out[key] = float(t.float().item())
        left -= set(out)
    return out


def _check_scale(name: str, info: TensorInfo, dtype: str, expected_shape: tuple[int, ...]) -> list[str]:
    problems = []
    if info.dtype != dtype:
        problems.append(f"{name} is {info.dtype}, expected {dtype}")
    if expected_shape:
        if info.shape != expected_shape:
            problems.append(f"{name} has shape {list(info.shape)}, expected {list(expected_shape)}")
    elif math.prod(info.shape) != 1:
        problems.append(f"{name} has shape {list(info.shape)}, expected one value per tensor")
    return problems


def _upper(value: Any) -> str | None:
    return None if value is None else str(value).upper()


def is_excluded(module: str, patterns: list[str]) -> bool:
    """Whether the export's `exclude_modules` patterns leave `module` unquantized."""
    # ModelOpt writes plain module names ("lm_head") and wildcards ("model.layers.0*").
    return any(module == p or fnmatch.fnmatchcase(module, p) for p in patterns)


def read_quant_config(export_dir: Path) -> dict[str, Any]:
    """The `quantization` section of an export's hf_quant_config.json."""
    data = read_export_json(export_dir / "hf_quant_config.json")
    quant = data.get("quantization")
    if not isinstance(quant, dict):
        raise CalibrationError(
            str(export_dir / "hf_quant_config.json"),
            "has no 'quantization' section.",
            "re-run the calibrate stage; the export is incomplete.",
        )
    return quant


def read_export_json(path: Path) -> dict[str, Any]:
    """A JSON object written by the export (config.json, hf_quant_config.json); CalibrationError otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(str(path), "is missing from the export.", "re-run the calibrate stage.") from None
    except json.JSONDecodeError as e:
        raise CalibrationError(str(path), f"is not valid JSON ({e}).", "re-run the calibrate stage.") from None
    if not isinstance(data, dict):
        raise CalibrationError(str(path), "is not a JSON object.", "re-run the calibrate stage.")
    return data


def read_headers(export_dir: Path) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """Names, dtypes and shapes of every tensor, read from the safetensors headers only."""
    from safetensors import safe_open

    shards = sorted(export_dir.glob("*.safetensors"))
    if not shards:
        raise CalibrationError(str(export_dir), "contains no .safetensors files.", "re-run the calibrate stage.")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        # safe_open memory-maps the file and parses only its JSON header; get_slice reads no data.
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                sl = f.get_slice(key)
                tensors[key] = TensorInfo(sl.get_dtype(), tuple(sl.get_shape()))
    files = {p.name: p.stat().st_size for p in sorted(export_dir.iterdir()) if p.is_file()}
    return tensors, files
