"""A mixture-of-experts model with real weights whose function is known: sparse upcycling of a dense
Llama-layout model into transformers' Mixtral layout (Komatsuzaki et al., "Sparse Upcycling",
arXiv 2212.05055: every expert starts as a copy of the dense MLP).

Why it computes the dense model exactly: Mixtral's router softmaxes the logits, keeps the top k and
renormalises them to sum to one (transformers MixtralTopKRouter.forward: `router_top_value /=
router_top_value.sum(...)`), and the block sums the chosen experts' outputs weighted by them
(MixtralExperts.forward). With every expert equal to the dense MLP that sum is the dense MLP's output,
whichever experts are chosen; attention, norms and embeddings are copied unchanged (Mixtral's
attention is Mistral's, which is Llama's without biases). So the upcycled model's baseline must equal
the dense one's, and a quantized copy's recovery measures what quantizing the experts does.

Why routing still spreads: the router is fresh, drawn from a seeded normal distribution, so tokens
go to different experts by their hidden states, as in any MoE, and per-expert calibration coverage is
exercised for real. Both are measured on a probe text and recorded in the download manifest; a model
whose upcycled logits drift from the dense ones, or whose router leaves an expert unused on the probe,
is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import SourceError

log = logging.getLogger(__name__)

# A probe in plain English, long enough that every expert of a 4-expert router is chosen.
PROBE_TEXT = ("The capital of France is Paris. Water boils at one hundred degrees Celsius at sea level. "
              "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The committee "
              "met on Tuesday and agreed to publish its report before the end of the year.")
# Float32 logits of the two models differ only by summation order (measured 4e-5 on SmolLM2-135M);
# anything near a logit's own scale means the construction is wrong.
MAX_LOGIT_DIFF = 1e-3
# Llama configs forge can upcycle: what Mixtral's layer has (no biases, SiLU gate/up/down MLP).
DENSE_TYPES = ("llama",)


@dataclass(frozen=True)
class Upcycled:
    experts: int
    top_k: int
    router_seed: int
    router_std: float
    dense_parameters: int
    parameters: int
    probe_tokens: int
    max_logit_diff: float  # |upcycled - dense| over the probe's float32 logits
    routed_tokens: list[list[int]]  # per layer, per expert: probe tokens routed there

    def to_json(self) -> dict[str, Any]:
        return {"experts": self.experts, "top_k": self.top_k, "router_seed": self.router_seed,
                "router_std": self.router_std, "dense_parameters": self.dense_parameters,
                "parameters": self.parameters, "probe_tokens": self.probe_tokens,
                "max_logit_diff_vs_dense": self.max_logit_diff, "probe_routed_tokens": self.routed_tokens}


def upcycle(dense_dir: Path, out_dir: Path, experts: int, top_k: int, router_seed: int, router_std: float,
            where: str) -> Upcycled:
    """Write the upcycled Mixtral checkpoint of the dense checkpoint in `dense_dir` to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    moe = upcycled_model(dense, experts, top_k, router_seed, router_std, where)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    diff, routed, tokens = probe(dense, moe, tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"])
    if diff > MAX_LOGIT_DIFF:
        raise SourceError(where, f"the upcycled model's logits differ from the dense model's by {diff:.3g} on the probe "
                          f"(at most {MAX_LOGIT_DIFF:g} expected).", "report it: the construction no longer holds.")
    unused = [f"layer {i} expert {e}" for i, layer in enumerate(routed) for e, n in enumerate(layer) if n == 0]
    if unused:
        raise SourceError(where, f"the router sends no probe token to {', '.join(unused[:6])}"
                          f"{' and more' if len(unused) > 6 else ''}.", "use another router_seed or a larger router_std.")
    moe.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name in ("generation_config.json", "chat_template.jinja"):
        if (dense_dir / name).is_file() and not (out_dir / name).is_file():
            (out_dir / name).write_bytes((dense_dir / name).read_bytes())
    result = Upcycled(experts, top_k, router_seed, router_std, dense.num_parameters(), moe.num_parameters(), tokens,
                      diff, routed)
    log.info("upcycled %d -> %d parameters (%d experts, top %d): max logit diff %.2g on %d probe tokens",
             result.dense_parameters, result.parameters, experts, top_k, diff, tokens)
    return result


def upcycled_model(dense: Any, experts: int, top_k: int, router_seed: int, router_std: float, where: str) -> Any:
    """The upcycled MixtralForCausalLM of a dense LlamaForCausalLM (in memory, the dense one's dtype)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = dense.config
    if config.model_type not in DENSE_TYPES or getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
        raise SourceError(where, f"upcycling reads a bias-free Llama layout, not model_type {config.model_type!r}"
                          f" (mlp_bias {getattr(config, 'mlp_bias', None)}, attention_bias "
                          f"{getattr(config, 'attention_bias', None)}).", "upcycle a Llama-layout dense model.")
    moe_config = MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    moe = MixtralForCausalLM(moe_config).to(next(dense.parameters()).dtype)
    moe.load_state_dict(_upcycled_state(dense.state_dict(), moe.state_dict(), experts, router_seed, router_std, where))
    moe.tie_weights()
    return moe.eval()


def _upcycled_state(dense: dict[str, Any], shell: dict[str, Any], experts: int, seed: int, std: float,
                    where: str) -> dict[str, Any]:
    """Mixtral's state dict from Llama's: each layer's fused experts are E copies of [gate; up] and of
    down (MixtralExperts.gate_up_proj [E, 2I, h], down_proj [E, h, I]); the router is drawn fresh."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, empty in shell.items():
        prefix, _, leaf = key.rpartition(".mlp.")
        if key in dense:
            state[key] = dense[key]
        elif leaf == "experts.gate_up_proj":
            gate_up = torch.cat([dense[f"{prefix}.mlp.gate_proj.weight"], dense[f"{prefix}.mlp.up_proj.weight"]], dim=0)
            state[key] = gate_up.unsqueeze(0).repeat(experts, 1, 1)
        elif leaf == "experts.down_proj":
            state[key] = dense[f"{prefix}.mlp.down_proj.weight"].unsqueeze(0).repeat(experts, 1, 1)
        elif leaf == "gate.weight":
            state[key] = torch.randn(empty.shape, generator=generator, dtype=torch.float32) * std
        elif key == "lm_head.weight" and "model.embed_tokens.weight" in dense:  # tied
            state[key] = dense["model.embed_tokens.weight"]
        else:
            raise SourceError(where, f"no dense weight maps to {key}.", "upcycle a Llama-layout dense model.")
    return state


def probe(dense: Any, moe: Any, input_ids: Any) -> tuple[float, list[list[int]], int]:
    """Max |logit difference| and per-layer, per-expert routed token counts on `input_ids`."""
    import torch

    from pipeline.sources.routing import count_routing

    with torch.no_grad(), count_routing(moe) as routing, routing.counting():
        diff = (dense(input_ids).logits.float() - moe(input_ids).logits.float()).abs().max().item()
    return diff, list(routing.per_layer.values()), int(input_ids.shape[1])
