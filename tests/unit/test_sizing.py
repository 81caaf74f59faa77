"""Golden tests for the planner. Expected values are computed by hand here, from the shapes in the
models' config.json and the byte arithmetic written out below, never by calling the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.formats import FORMATS, KV_CACHE_DTYPES
from pipeline.core.gpus import DEFAULT_CATALOG, load_catalog
from pipeline.sizing.memory import ServingShape
from pipeline.sizing.parallel import Parallelism
from pipeline.sizing.plan import plan
from pipeline.sizing.shapes import ModelShape, count_params

ROOT = Path(__file__).resolve().parents[2]
LLAMA_70B = json.loads((ROOT / "recipes/llama-3-3-70b-instruct/config.json").read_text())
LLAMA_8B = json.loads((ROOT / "recipes/llama-3-1-8b-instruct/config.json").read_text())
# Llama-3.1-405B: hidden 16384, MLP 53248, 126 layers, 128 heads, 8 KV heads, vocab 128256.
LLAMA_405B = {**LLAMA_70B, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
              "num_attention_heads": 128}
CATALOG = load_catalog(DEFAULT_CATALOG)
SERVING = ServingShape(max_input_len=1024, max_output_len=1024, seq_len=8192)
GB = 1e9

# Per 70B layer: q,o 2*8192*8192 + k,v 2*8192*1024 + gate,up,down 3*8192*28672 = 855,638,016.
LINEAR_70B = 80 * 855_638_016
EMBED_70B = 128256 * 8192  # one of embeddings / lm_head, each kept BF16
NORMS_70B = 80 * 2 * 8192 + 8192
BF16_REST_70B = 2 * (2 * EMBED_70B + NORMS_70B)
# Memory the driver reports (pipeline/core/data/gpus.yaml: nvidia-smi totals, MiB x 2^20).
H200_BYTES = 143_771 * 2**20
B200_BYTES = 183_359 * 2**20


def reserve_70b(tokens: int) -> int:
    """1 GiB runtime + `tokens` (the plan's max_num_tokens) x (2*8192 + 2*28672) x 2 bytes of activations."""
    return 2**30 + tokens * (2 * 8192 + 2 * 28672) * 2


def _plan(config, fmt, kv, gpu, tp=1, serving=SERVING):
    return plan(config, FORMATS[fmt], KV_CACHE_DTYPES[kv], CATALOG[gpu], gpu, serving, par=Parallelism(tp))


def test_llama_70b_param_count_matches_hand_arithmetic():
    counts = count_params(ModelShape.from_hf_config(LLAMA_70B))
    assert counts.linear == LINEAR_70B == 68_451_041_280
    assert counts.total == LINEAR_70B + 2 * EMBED_70B + NORMS_70B  # 70.55 B
    assert 70.5e9 < counts.total < 70.6e9


def test_llama_70b_fp8_on_h200():
    p = _plan(LLAMA_70B, "fp8", "fp8", "h200")
    assert p.weights_bytes == LINEAR_70B + BF16_REST_70B == 72_656_371_712  # by hand: ~72.6 GB
    assert 72 * GB < p.weights_bytes < 73 * GB
    assert p.kv_bytes_per_token == 160 * 1024  # 2 x 80 layers x 8 heads x 128 x 1 byte
    assert p.reserve_bytes == reserve_70b(p.inputs["max_num_tokens"])
    left = H200_BYTES - p.weights_bytes - p.reserve_bytes
    assert p.memory_left_for_kv_bytes == left
    # 141e9 (H200 datasheet) - ~72.7e9 of weights leaves ~65-70 GB for KV and activations; the driver's
    # 150.75e9 adds 9.75 GB, and a workload-sized max_num_tokens shrinks the activation reserve.
    assert 74 * GB <= left <= 81 * GB
    assert p.kv_pool_bytes == int(left * 0.9)
    blocks = int(p.kv_pool_bytes // (160 * 1024 * 32))
    assert p.kv_capacity_tokens == blocks * 32
    assert p.max_batch_at_seq_len == blocks // (8192 // 32)
    assert p.fits and p.min_tp == 1


def test_llama_70b_bf16_kv_is_320_kib_per_token():
    assert _plan(LLAMA_70B, "fp8", "auto", "h200").kv_bytes_per_token == 320 * 1024


def test_llama_70b_nvfp4_on_b200_leaves_well_over_110_gb():
    p = _plan(LLAMA_70B, "nvfp4", "fp8", "b200")
    # Linear layers at 4.5 bits: 68.45e9 * 0.5625 = 38.5 GB ("~40 GB"); plus 4.2 GB of BF16 embeddings.
    assert p.weights_bytes == int(LINEAR_70B * 0.5625) + BF16_REST_70B
    assert 42 * GB < p.weights_bytes < 43 * GB
    assert p.memory_left_for_kv_bytes == B200_BYTES - p.weights_bytes - reserve_70b(p.inputs["max_num_tokens"])
    assert p.memory_left_for_kv_bytes > 110 * GB


def test_llama_405b_fp8_needs_tp4_on_h200():
    p = _plan(LLAMA_405B, "fp8", "fp8", "h200")
    # 126 x (2*16384^2 + 2*16384*1024 + 3*16384*53248) = 401.6e9 FP8 bytes: over 2 x 141 GB, under 4.
    linear = 126 * (2 * 16384 * 16384 + 2 * 16384 * 1024 + 3 * 16384 * 53248)
    assert p.weights_bytes == linear + 2 * (2 * 128256 * 16384 + 126 * 2 * 16384 + 16384)
    assert not p.fits
    assert "exceed" in p.why_not
    assert p.min_tp == 4
    p4 = _plan(LLAMA_405B, "fp8", "fp8", "h200", tp=4)
    assert p4.fits and p4.weights_bytes_per_gpu == -(-p.weights_bytes // 4)


def test_batch1_decode_is_bandwidth_over_streamed_bytes():
    p = _plan(LLAMA_8B, "fp8", "fp8", "h200", serving=ServingShape(1024, 1024, 2048))
    # Streamed per step: FP8 Linear 6.98 GB + BF16 lm_head 1.05 GB + norms + KV of 1536 tokens x 64 KiB.
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    streamed = linear + 2 * (128256 * 4096 + 32 * 2 * 4096 + 4096) + 1536 * 64 * 1024
    assert p.decode_tok_s_batch1 == pytest.approx(4.8e12 / streamed, rel=1e-9)
    assert 560 < p.decode_tok_s_batch1 < 620  # ~600 tok/s: 4.8 TB/s (H200 datasheet) / ~8 GB read per step
    assert p.roofline["decode_bound_batch1"] == "memory"


def test_max_batch_decode_and_energy_cost():
    serving = ServingShape(1024, 1024, 2048, concurrency=64, price_per_gpu_hour_usd=3.5)
    p = _plan(LLAMA_8B, "fp8", "fp8", "h200", serving=serving)
    assert p.roofline["decode_batch"] == 64
    tok_s = p.decode_tok_s_max_batch
    assert tok_s > 10 * p.decode_tok_s_batch1  # batching amortizes the weight stream
    # J/token and $/Mtok are of the predicted run, not of the ceiling (one price basis, issue 26)
    run = p.throughput["predicted_output_tok_s"]
    assert run < tok_s and "usd_per_mtok" not in p.roofline
    assert p.joules_per_token == pytest.approx(700 / run)
    assert p.usd_per_mtok == pytest.approx(3.5 / (run * 3600) * 1e6)


def test_tp_splits_weights_and_kv_heads():
    p1 = _plan(LLAMA_70B, "fp8", "fp8", "h100", tp=1)
    p2 = _plan(LLAMA_70B, "fp8", "fp8", "h100", tp=2)
    assert p2.weights_bytes_per_gpu == -(-p1.weights_bytes // 2)
    assert p2.kv_bytes_per_token_per_gpu == p1.kv_bytes_per_token / 2


def test_moe_counts_active_experts_only():
    mixtral = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
               "num_experts_per_tok": 2}
    counts = count_params(ModelShape.from_hf_config(mixtral))
    per_expert = 3 * 4096 * 14336
    assert counts.mlp == 32 * 8 * per_expert
    assert counts.active_mlp == 32 * 2 * per_expert
    assert counts.router == 32 * 4096 * 8
    assert 46.6e9 < counts.total < 46.8e9  # Mixtral-8x7B: 46.7 B total


def test_missing_config_key_is_a_clear_error():
    from pipeline.core.errors import RecipeError

    with pytest.raises(RecipeError, match="missing 'hidden_size'"):
        ModelShape.from_hf_config({"num_attention_heads": 8})


# ---------------------------------------------------------------------------- issue 12, item 15

# Gemma-3-4B-it's config.json (google/gemma-3-4b-it): the language model's shape is nested under
# text_config, the vision tower under vision_config.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208,
                    "max_position_embeddings": 131072, "model_type": "gemma3_text",
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
    "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27, "model_type": "siglip_vision_model"},
    "tie_word_embeddings": True,
}


def test_nested_text_config_is_read():
    from pipeline.sizing.shapes import max_positions

    shape = ModelShape.from_hf_config(GEMMA3_4B)
    assert (shape.hidden, shape.intermediate, shape.layers) == (2560, 10240, 34)
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.vocab) == (8, 4, 256, 262208)
    assert shape.tie_embeddings  # from the top level, which text_config leaves out
    counts = count_params(shape)
    # per layer: q,o 2*2560*8*256 + k,v 2*2560*4*256 + MLP 3*2560*10240 = 93,388,800
    assert counts.linear == 34 * (2 * 2560 * 2048 + 2 * 2560 * 1024 + 3 * 2560 * 10240)
    assert 3.8e9 < counts.total < 3.9e9  # Gemma-3-4B's language model: ~3.9 B (the card's 4.3 B adds SigLIP)
    # Gemma-3's 131072 positions already include its linear RoPE factor 8.
    assert max_positions(GEMMA3_4B) == 131072


def test_max_positions_uses_rope_scaling():
    from pipeline.sizing.shapes import max_positions

    assert max_positions({"max_position_embeddings": 32768}) == 32768
    yarn = {"max_position_embeddings": 32768,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert max_positions(yarn) == 131072  # Qwen2.5 with YaRN x4
    assert max_positions({"max_position_embeddings": 32768, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}) == 131072
    assert max_positions(LLAMA_8B) == 131072  # llama3 rope: 8192 x 8 = 65536 < the config's 131072
    assert max_positions({"hidden_size": 1}) is None


def test_fitting_alternatives_are_smallest_tp_per_gpu():
    from pipeline.sizing.memory import fitting_alternatives

    found = fitting_alternatives(LLAMA_405B, [FORMATS["fp8"]], KV_CACHE_DTYPES["fp8"], CATALOG, SERVING)
    by_gpu = {a.gpu: a for a in found}
    assert by_gpu["h200"].tp == 4  # test_llama_405b_fp8_needs_tp4_on_h200
    assert "l40s" not in by_gpu  # 8 x 48 GB < 406 GB of FP8 weights
    for a in found:
        assert _plan(LLAMA_405B, "fp8", "fp8", a.gpu, tp=a.tp).fits
