"""Issue 24: forge reads every 2026 MoE config family (Mixtral, Qwen2/3-MoE, gpt-oss, Llama-4,
DeepSeek-V2/V3/R1) and counts their parameters as their publishers do; what it cannot read is refused.

The configs in tests/data/configs/ are the models' Hugging Face config.json files, taken from public
copies (Hub access is not available here): ai-dynamo/aiconfigurator
`aic-core/src/aiconfigurator_core/model_configs/` (Qwen3, gpt-oss, DeepSeek-R1) and
inference-sim/inference-sim `model_configs/` at 59649ee4 (Mixtral, Llama-4-Scout, DeepSeek-V2-Lite);
Mixtral-8x7B-Instruct's matches the Hub's blob page at eba92302 key for key. Llama-4-Maverick's is
*reconstructed* from TensorRT-LLM's tests/unittest/_torch/modeling/test_modeling_llama_min_latency.py
(its two-layer copy of the Maverick config, with the three edits that test documents undone), hence the
file name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.errors import RecipeError
from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.sizing.memory import ServingShape, memory_at_tp
from pipeline.sizing.parallel import Parallelism, kv_bytes_per_token, parallel_choices, parallelism_problem
from pipeline.sizing.plan import plan
from pipeline.sizing.shapes import ModelShape, count_params

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"
CATALOG = load_catalog(DEFAULT_CATALOG)
FP8, KV8 = FORMATS["fp8"], KV_CACHE_DTYPES["fp8"]


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


# (config, published total, published active, whether the publisher's active count includes the input
# embedding table, where the figures are published). Each publisher's convention is read off its own
# figures: OpenAI's table splits gpt-oss-120b into MLP 114.71 B, attention 0.96 B and embed+unembed
# 1.16 B, and its 5.13 B active holds the unembedding only; Mistral's 12.9 B, Qwen's 3.3 B / 22 B and
# Meta's 17 B are only reached with the embedding table; DeepSeek's 37 B only without it (with it: 37.6).
PUBLISHED = [
    ("mixtral-8x7b-instruct-v0.1", 46.7e9, 12.9e9, True, "mistral.ai/news/mixtral-of-experts"),
    ("mixtral-8x22b-instruct-v0.1", 141e9, 39e9, True, "mistral.ai/news/mixtral-8x22b"),
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, True, "huggingface.co/Qwen/Qwen3-30B-A3B model card"),
    ("qwen3-235b-a22b", 235e9, 22e9, True, "huggingface.co/Qwen/Qwen3-235B-A22B model card"),
    ("gpt-oss-20b", 20.91e9, 3.61e9, False, "gpt-oss model card, arXiv 2508.10925, table 1"),
    ("gpt-oss-120b", 116.83e9, 5.13e9, False, "gpt-oss model card, arXiv 2508.10925, table 1"),
    ("llama-4-scout-17b-16e-instruct", 109e9, 17e9, True, "Meta Llama-4 model card"),
    ("llama-4-maverick-17b-128e-instruct.reconstructed", 400e9, 17e9, True, "Meta Llama-4 model card"),
    ("deepseek-r1", 671e9, 37e9, False, "DeepSeek-V3 technical report, arXiv 2412.19437"),
    ("deepseek-v2-lite", 15.7e9, 2.4e9, False, "DeepSeek-V2 paper, arXiv 2405.04434, appendix B"),
]


def tolerance(published: float) -> tuple[float, float]:
    """The interval a published figure stands for at its own precision: rounded or truncated at its
    last digit (Meta's "17B" is 16.5 up to 18 B; Qwen's "3.3B" 3.25 up to 3.4 B), and never tighter
    than 1%."""
    text = f"{published / 1e9:g}"
    unit = 10 ** -len(text.partition(".")[2]) * 1e9
    return min(published - unit / 2, 0.99 * published), max(published + unit, 1.01 * published)


@pytest.mark.parametrize(("name", "total", "active", "with_embeddings", "source"), PUBLISHED,
                         ids=[row[0] for row in PUBLISHED])
def test_counts_match_the_published_figures(name, total, active, with_embeddings, source):
    counts = count_params(ModelShape.from_hf_config(config(name)))
    ours = counts.active_with_embeddings if with_embeddings else counts.active
    assert abs(counts.total - total) <= 0.01 * total, f"{name}: {counts.total / 1e9:.2f} B vs {source}"
    low, high = tolerance(active)
    assert low <= ours < high, f"{name}: active {ours / 1e9:.3f} B vs {source}"


def test_totals_within_one_percent_for_every_model():
    within = [name for name, total, *_ in PUBLISHED
              if abs(count_params(ModelShape.from_hf_config(config(name))).total - total) <= 0.01 * total]
    assert len(within) == len(PUBLISHED) >= 8


def test_gpt_oss_exact_breakdown():
    """OpenAI's own split of gpt-oss-120b (model card table 1): MLP incl. routers 114.71 B,
    attention 0.96 B, embedding + unembedding 1.16 B."""
    counts = count_params(ModelShape.from_hf_config(config("gpt-oss-120b")))
    assert round((counts.mlp + counts.router) / 1e9, 2) == 114.71
    assert round(counts.attention / 1e9, 2) == 0.96
    assert round((counts.embeddings + counts.lm_head) / 1e9, 2) == 1.16


def test_deepseek_r1_is_read_as_mla_moe_not_a_dense_model():
    shape = ModelShape.from_hf_config(config("deepseek-r1"))
    assert shape.mla is not None and shape.mla.cached_elements == 512 + 64
    assert (shape.experts, shape.experts_per_token, shape.moe_layers, shape.dense_layers) == (256, 8, 58, 3)
    assert shape.shared_expert_intermediate == 2048  # one shared expert of moe_intermediate_size
    # MLA caches one 576-element latent per token per layer, for all 128 heads: 61 x 576 bytes at FP8,
    # 70x less than 128 full K/V heads of 192/128 would be.
    assert kv_bytes_per_token(shape, KV8) == 61 * 576
    # and every TP rank holds the whole latent (TP does not split it); attention DP gives each rank its own sequences
    assert kv_bytes_per_token(shape, KV8, Parallelism(8)) == 61 * 576


def test_llama4_reads_shared_experts_interleaving_and_vision():
    scout = ModelShape.from_hf_config(config("llama-4-scout-17b-16e-instruct"))
    maverick = ModelShape.from_hf_config(config("llama-4-maverick-17b-128e-instruct.reconstructed"))
    assert (scout.moe_layers, scout.dense_layers, scout.shared_expert_intermediate) == (48, 0, 8192)
    assert (maverick.moe_layers, maverick.dense_layers, maverick.intermediate) == (24, 24, 16384)
    assert 0.8e9 < scout.vision_params == maverick.vision_params < 0.9e9


def test_gpt_oss_sliding_window_layers_read_only_their_window():
    """What a decode step reads (the throughput model's context): the sliding layers' window. What
    the memory plan holds is every layer at full length, as TensorRT-LLM 1.2 allocates it
    (pipeline/sizing/memory.py memory_at_tp)."""
    shape = ModelShape.from_hf_config(config("gpt-oss-120b"))
    assert (shape.sliding_layers, shape.full_attention_layers, shape.sliding_window) == (18, 18, 128)
    per_layer = 2 * 8 * 64 * 1  # K and V, 8 KV heads of 64, FP8
    assert kv_bytes_per_token(shape, KV8, context=128) == 36 * per_layer
    # at 8192 tokens the 18 sliding layers add 128/8192 of a layer per token
    assert kv_bytes_per_token(shape, KV8, context=8192) == pytest.approx((18 + 18 * 128 / 8192) * per_layer)
    p = plan(config("gpt-oss-120b"), FP8, KV8, CATALOG["h200"], "h200", SEED_SERVING)
    assert p.kv_bytes_per_token == 36 * per_layer


@pytest.mark.parametrize("bad", [
    # an MoE family forge has no reader for (DBRX-style keys under another model_type)
    {"model_type": "dbrx_like", "hidden_size": 6144, "intermediate_size": 10752, "num_hidden_layers": 40,
     "num_attention_heads": 48, "vocab_size": 100352, "num_local_experts": 16, "num_experts_per_tok": 4},
    # MLA keys on a model type that is not DeepSeek's
    {"model_type": "llama", "hidden_size": 7168, "intermediate_size": 18432, "num_hidden_layers": 61,
     "num_attention_heads": 128, "vocab_size": 129280, "kv_lora_rank": 512},
    # hybrid linear attention (Qwen3-Next's layer kind)
    {"model_type": "qwen3_next", "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 2,
     "num_attention_heads": 16, "vocab_size": 151936, "layer_types": ["linear_attention", "full_attention"]},
])
def test_configs_forge_cannot_read_are_refused_not_planned(bad):
    with pytest.raises(RecipeError, match="forge|layer"):
        ModelShape.from_hf_config(bad)


def test_deepseek_r1_with_its_model_type_removed_is_refused():
    """The issue-24 defect: R1's config read without its MoE/MLA reader became a 38.6 B dense model."""
    stripped = {k: v for k, v in config("deepseek-r1").items() if k != "model_type"}
    with pytest.raises(RecipeError, match="n_routed_experts"):
        ModelShape.from_hf_config(stripped)


def test_parallel_choices_for_an_moe_and_a_dense_model():
    mixtral = ModelShape.from_hf_config(config("mixtral-8x22b-instruct-v0.1"))
    choices = {str(p) for p in parallel_choices(mixtral, 4)}
    assert choices == {"TP 4", "TP 4, attention DP", "TP 4, EP 2", "TP 4, EP 2, attention DP", "TP 4, EP 4",
                       "TP 4, EP 4, attention DP"}
    assert parallelism_problem(mixtral, Parallelism(8, 8)) is None
    six = ModelShape.from_hf_config({**config("mixtral-8x22b-instruct-v0.1"), "num_local_experts": 6})
    assert parallelism_problem(six, Parallelism(4, 4)) == "6 experts cannot be split 4 ways"
    assert parallelism_problem(mixtral, Parallelism(4, 8)) == "EP 8 must divide TP 4 (moe_tp_size x moe_ep_size = tp_size)"
    llama = ModelShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128,
                       vocab=128256, tie_embeddings=False)
    assert [str(p) for p in parallel_choices(llama, 2)] == ["TP 2"]
    assert "mixture-of-experts" in parallelism_problem(llama, Parallelism(2, 2))


SEED_SERVING = ServingShape(max_input_len=1024, max_output_len=1024, seq_len=2048)


def test_published_precision_intervals():
    assert tolerance(17e9) == (16.5e9, 18e9)
    assert tolerance(3.3e9) == pytest.approx((3.25e9, 3.4e9))
    assert tolerance(116.83e9) == pytest.approx((0.99 * 116.83e9, 1.01 * 116.83e9))


def test_seed_claim_mixtral_8x22b_fp8_fits_one_b200_and_needs_two_h200s():
    """The seed: "Mixtral 8x22B ... reside entirely on a single GPU at FP8" on B200, while "H200 often
    requires tensor parallelism across two GPUs". The 141 GB of FP8 weights do load on one H200
    (143,771 MiB), but leave a 7.6 GB KV pool: 32 sequences of 2048 tokens. One B200 holds 191; at
    128 concurrent sequences the H200 needs TP 2."""
    cfg = config("mixtral-8x22b-instruct-v0.1")
    serving = ServingShape(max_input_len=1024, max_output_len=1024, seq_len=2048, concurrency=128)
    b200 = plan(cfg, FP8, KV8, CATALOG["b200"], "b200", serving)
    h200 = plan(cfg, FP8, KV8, CATALOG["h200"], "h200", serving)
    h200x2 = plan(cfg, FP8, KV8, CATALOG["h200"], "h200", serving, Parallelism(2))
    assert 141.0e9 < b200.weights_bytes < 141.1e9  # 140.2 B linear params at 1 byte + 0.4 B BF16 embeddings
    assert h200.max_batch_at_seq_len == 32
    assert b200.max_batch_at_seq_len >= 128
    assert h200x2.max_batch_at_seq_len >= 128


def test_attention_dp_trades_weight_memory_for_kv_capacity():
    """DeepSeek-R1 FP8 on 8 x B200: under TP every rank holds all of MLA's latent for every sequence;
    attention DP replicates the attention weights (more per GPU) but gives each rank its own
    sequences, so the instance holds far more of them."""
    cfg = config("deepseek-r1")
    shape, counts = ModelShape.from_hf_config(cfg), count_params(ModelShape.from_hf_config(cfg))
    tp = memory_at_tp(shape, counts, FP8, KV8, CATALOG["b200"], SEED_SERVING, Parallelism(8, 8))
    adp = memory_at_tp(shape, counts, FP8, KV8, CATALOG["b200"], SEED_SERVING, Parallelism(8, 8, True))
    assert tp.why_not is None and adp.why_not is None
    # everything but the routed experts is whole on each rank: FP8 linear layers at 1 byte, the
    # embedding, lm_head, routers and norms at 2 (TensorRT-LLM replicates the embedding and lm_head under ADP)
    replicated = (counts.attention + counts.mlp - counts.routed_experts
                  + 2 * (counts.embeddings + counts.lm_head + counts.router + counts.norms)) * (1 - 1 / 8)
    assert adp.weights_per_gpu - tp.weights_per_gpu == pytest.approx(replicated, abs=8)
    assert adp.max_batch == 8 * adp.max_batch_per_rank > 5 * tp.max_batch


def test_plan_lists_the_parallel_choices_and_marks_the_chosen_one():
    cfg = config("qwen3-235b-a22b")
    p = plan(cfg, FP8, KV8, CATALOG["h200"], "h200", SEED_SERVING, Parallelism(4, 4))
    chosen = [c for c in p.parallel_choices if c["chosen"]]
    assert [c["parallelism"] for c in chosen] == ["TP 4, EP 4"]
    assert p.inputs["ep"] == 4 and p.inputs["attention_dp"] is False
    assert {c["parallelism"] for c in p.parallel_choices} >= {"TP 4", "TP 4, EP 4, attention DP"}
    assert p.throughput
    adp = plan(cfg, FP8, KV8, CATALOG["h200"], "h200", SEED_SERVING, Parallelism(4, 4, True))
    # Attention DP is predicted per rank: the options' max_batch_size is one rank's, the plan's batch the instance's.
    assert adp.roofline["decode_batch"] == 4 * adp.throughput["max_batch_size"]
    assert adp.throughput["predicted_output_tok_s"] > 0 and adp.throughput["bound_decode"] != "-"


def test_a_parallelism_the_model_cannot_take_is_a_clear_error():
    with pytest.raises(RecipeError, match="128 experts cannot be split|EP 3 must divide"):
        plan(config("gpt-oss-120b"), FP8, KV8, CATALOG["h200"], "h200", SEED_SERVING, Parallelism(4, 3))


# ---------------------------------------------------------------------------- the MoE recipes


ROOT = Path(__file__).resolve().parents[2]
MOE_RECIPES = ["mixtral-8x7b-instruct/fp8.yaml", "mixtral-8x22b-instruct/fp8.yaml", "qwen3-30b-a3b/fp8.yaml",
               "qwen3-30b-a3b/nvfp4.yaml", "gpt-oss-120b/fp8.yaml"]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes load by relative path, as under DVC
    # forge's main() turns the Hub off in-process for offline verbs; set through monkeypatch, the
    # variables are restored after the test instead of leaking into later ones.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _options(rel: str, gpu: str):
    from pipeline.planning.validate import check_target
    from pipeline.recipe.loading import load_recipe
    from pipeline.serving.trtllm_options import llm_api_options

    recipe = load_recipe(Path("recipes") / rel)
    plan_ = check_target(recipe, gpu, CATALOG)
    return plan_, llm_api_options(plan_, recipe.spec.targets[gpu], recipe.spec.quant.format,
                                  recipe.spec.quant.kv_cache_dtype)


def test_moe_recipes_are_planned_on_h200_and_b200(in_repo):
    from pipeline.recipe.loading import load_recipe

    gpus = {}
    for rel in MOE_RECIPES:
        recipe = load_recipe(Path("recipes") / rel)
        for gpu in recipe.spec.targets:
            plan_, _ = _options(rel, gpu)
            assert plan_.fits, f"{rel} {gpu}: {plan_.why_not}"
            gpus.setdefault(recipe.model.name, set()).add(gpu)
    assert all({"h200", "b200"} <= found for found in gpus.values()), gpus


def test_options_carry_expert_parallelism_and_the_moe_backend(in_repo):
    from pipeline.serving.trtllm_options import unknown_option_names

    _, mixtral = _options("mixtral-8x22b-instruct/fp8.yaml", "h200")
    assert (mixtral["tensor_parallel_size"], mixtral["moe_expert_parallel_size"]) == (2, 2)
    assert mixtral["enable_attention_dp"] is False and mixtral["moe_config"] == {"backend": "CUTLASS"}
    plan_, oss_b200 = _options("gpt-oss-120b/fp8.yaml", "b200")
    assert (oss_b200["moe_expert_parallel_size"], oss_b200["enable_attention_dp"]) == (8, True)
    assert oss_b200["moe_config"] == {"backend": "CUTLASS"}  # NVIDIA's throughput config with attention DP
    # per attention-DP rank: the recipe's 256 concurrent sequences over 8 ranks, and one rank's KV pool
    assert oss_b200["max_batch_size"] == 32 and oss_b200["kv_cache_config"]["max_tokens"] == plan_.kv_capacity_tokens
    _, oss_h200 = _options("gpt-oss-120b/fp8.yaml", "h200")
    assert oss_h200["moe_config"] == {"backend": "TRITON"}  # AUTO's choice for gpt-oss on Hopper
    _, dense = _options("llama-3-3-70b-instruct/fp8.yaml", "h200")
    assert not {"moe_expert_parallel_size", "enable_attention_dp", "moe_config"} & set(dense)
    for options in (mixtral, oss_b200, oss_h200):
        assert unknown_option_names(options) == []


def test_an_ep_the_target_cannot_take_names_the_field(in_repo, tmp_path, capsys):
    import shutil

    import yaml

    from pipeline.cli import main

    model = tmp_path / "recipes" / "mixtral-8x22b-instruct"
    shutil.copytree(ROOT / "recipes" / "mixtral-8x22b-instruct", model)
    data = yaml.safe_load((model / "fp8.yaml").read_text())
    data["targets"]["h200"]["ep"] = 4  # does not divide tp 2
    (model / "fp8.yaml").write_text(yaml.safe_dump(data))
    assert main(["validate", str(model / "fp8.yaml")]) == 2
    err = capsys.readouterr().err
    assert "fp8.yaml: targets.h200.ep: EP 4 must divide TP 2" in err and "set ep: 1 or ep: 2" in err


def test_a_prequantized_source_is_refused_before_download(in_repo):
    from pipeline.core.errors import SourceError
    from pipeline.recipe.loading import load_model
    from pipeline.stages.download import refuse_prequantized

    with pytest.raises(SourceError, match="quantization_config.*already quantized .quant_method 'mxfp4'"):
        refuse_prequantized(load_model(Path("recipes/gpt-oss-120b")))
    refuse_prequantized(load_model(Path("recipes/mixtral-8x7b-instruct")))  # a BF16 release passes


def test_plan_what_if_takes_an_moe_split(in_repo, capsys):
    from pipeline.cli import main

    assert main(["plan", "recipes/gpt-oss-120b/fp8.yaml", "--gpu", "h200", "--tp", "4", "--ep", "4",
                 "--attention-dp", "on", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["inputs"]["tp"], out["inputs"]["ep"], out["inputs"]["attention_dp"]) == (4, 4, True)
    assert out["predicted_output_tok_s"] > 0 and out["throughput"]["predicted_output_tok_s_per_gpu"] == pytest.approx(
        out["predicted_output_tok_s"] / 4)
    assert main(["plan", "recipes/mixtral-8x22b-instruct/fp8.yaml", "--gpu", "h200", "--tp", "1"]) == 2
    assert "--ep: EP 2 must divide TP 1" in capsys.readouterr().err  # the recipe's ep 2 with a what-if tp 1
