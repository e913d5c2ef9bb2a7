"""Tiny Hugging Face MoE models, built offline from small configs with random weights.

    build_<family>(seed=0, batch=2, seq=8, **config_overrides) -> (model, example_inputs)

Each factory makes a causal LM (Switch Transformers: its encoder-decoder LM) with hidden 64, 2 layers
(DeepSeek-V3: 3, the first one dense), 8 experts and a 128-token vocabulary, in eval mode, fp32,
`use_cache=False`, eager attention and the eager experts loop (the HF reference moecc must match).
Nothing is downloaded: `AutoConfig.for_model` + `from_config`. Any config field can be overridden,
e.g. `build_qwen3_moe(norm_topk_prob=False)`.

    moecc compile samples/hf_moe.py:build_mixtral --to torch
"""
from __future__ import annotations

import torch

VOCAB = 128
INIT = 0.1   # larger than HF's 0.02 so routing and expert outputs visibly move the logits


def _build(model_type: str, seed: int, batch: int, seq: int, defaults: dict, overrides: dict):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = dict(vocab_size=VOCAB, use_cache=False, initializer_range=INIT, tie_word_embeddings=False)
    cfg.update(defaults)
    cfg.update(overrides)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager", experts_implementation="eager",
                             dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    if config.is_encoder_decoder:
        decoder_ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        return model, (input_ids, torch.ones_like(input_ids), decoder_ids)
    return model, (input_ids,)


_LLAMA_LIKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, hidden_act="silu")


def build_mixtral(seed: int = 0, batch: int = 2, seq: int = 8, **overrides):
    """Mixtral: softmax (fp32) → top-2 → renormalize, SwiGLU experts."""
    d = dict(_LLAMA_LIKE, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    return _build("mixtral", seed, batch, seq, d, overrides)


def build_qwen2_moe(seed: int = 0, batch: int = 2, seq: int = 8, **overrides):
    """Qwen2-MoE: softmax top-4 (norm_topk_prob off), sigmoid-gated shared expert."""
    d = dict(_LLAMA_LIKE, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
             num_experts=8, num_experts_per_tok=4, norm_topk_prob=False)
    return _build("qwen2_moe", seed, batch, seq, d, overrides)


def build_qwen3_moe(seed: int = 0, batch: int = 2, seq: int = 8, **overrides):
    """Qwen3-MoE: softmax top-2 with norm_topk_prob, no shared expert."""
    d = dict(_LLAMA_LIKE, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True)
    return _build("qwen3_moe", seed, batch, seq, d, overrides)


def build_olmoe(seed: int = 0, batch: int = 2, seq: int = 8, **overrides):
    """OLMoE: softmax top-2, no renormalization, q/k norms."""
    d = dict(_LLAMA_LIKE, intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
             eos_token_id=None)
    return _build("olmoe", seed, batch, seq, d, overrides)


def build_deepseek_v3(seed: int = 0, batch: int = 2, seq: int = 8, **overrides):
    """DeepSeek-V3: sigmoid scores + correction bias, group-limited top-k, scaling, shared expert,
    first layer dense, MLA attention."""
    d = dict(_LLAMA_LIKE, num_hidden_layers=3, first_k_dense_replace=1, num_key_value_heads=4,
             intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
             kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    model, inputs = _build("deepseek_v3", seed, batch, seq, d, overrides)
    _randomize_correction_bias(model, seed)
    return model, inputs


def _randomize_correction_bias(model, seed: int) -> None:
    """Trained DeepSeek-V3 checkpoints have non-zero (often negative) biases; zeros would hide bugs."""
    gen = torch.Generator().manual_seed(seed + 2)
    for m in model.modules():
        bias = getattr(m, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.5)


def build_gpt_oss(seed: int = 0, batch: int = 2, seq: int = 8, **overrides):
    """GPT-OSS: router bias, top-k → softmax, interleaved gate/up, clamped SwiGLU, expert biases."""
    d = dict(_LLAMA_LIKE, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
             sliding_window=4, layer_types=["sliding_attention", "full_attention"],
             max_position_embeddings=131072)   # = YaRN factor 32 × 4096, as the real config
    model, inputs = _build("gpt_oss", seed, batch, seq, d, overrides)
    gen = torch.Generator().manual_seed(seed + 3)
    for name, p in model.named_parameters():   # HF leaves the expert/router biases at zero
        if name.endswith(("gate_up_proj_bias", "down_proj_bias", "router.bias")):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * INIT)
    return model, inputs


def build_switch(seed: int = 0, batch: int = 2, seq: int = 8, **overrides):
    """Switch Transformers (encoder-decoder): top-1 softmax router in fp32, fixed expert capacity per
    sequence, ReLU experts in a ModuleDict. Inputs: (input_ids, attention_mask, decoder_input_ids)."""
    d = dict(d_model=64, d_kv=16, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
             num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=8, expert_capacity=2,
             router_jitter_noise=0.0, dropout_rate=0.0, relative_attention_num_buckets=8,
             relative_attention_max_distance=16, decoder_start_token_id=0)
    return _build("switch_transformers", seed, batch, seq, d, overrides)


FAMILIES = {"mixtral": build_mixtral, "qwen2_moe": build_qwen2_moe, "qwen3_moe": build_qwen3_moe,
            "olmoe": build_olmoe, "deepseek_v3": build_deepseek_v3, "gpt_oss": build_gpt_oss,
            "switch": build_switch}
