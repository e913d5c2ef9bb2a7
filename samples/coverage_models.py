"""Every MoE model family of the installed transformers, as a tiny random model (offline).

    families() -> [Family(name, model_type, text)]      (scan of transformers/models/*/modeling_*.py)
    build(model_type, seed=0) -> (model, example_inputs)  fp32, eval, eager attention, eager experts loop

A family is MoE when its modeling file decorates an experts class with `use_experts_implementation` or
defines a sparse-MoE / experts module. It is a *text* family when one of its model types has a causal
LM (AutoModelForCausalLM); the others (vision-language, speech, encoder-only) are listed, not built.
Configs are shrunk generically: the family's defaults with small sizes written over the fields it has
(hidden 64, 2-4 layers, 8 experts top-2, vocab 128), per-layer lists cut to the new depth, and the
first layers made sparse when the default would leave no MoE layer. Nothing is downloaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 128
INIT = 0.1
_MOE_CLASS = re.compile(r"^@use_experts_implementation|^class \w*(SparseMoe|SparseMoE|MoE|Moe|Experts)\w*\(",
                        re.M)
SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, ffn_hidden_size=96,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
    max_position_embeddings=256, max_window_layers=2,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2,
    moe_k=2, moe_topk=2, top_k=2, top_k_experts=2, moe_top_k=2, n_shared_experts=1, shared_expert_intermediate_size=32,
    moe_shared_expert_intermediate_size=32, n_group=2, topk_group=1, first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    qk_head_dim=16, index_head_dim=16, index_n_heads=2, index_topk=4, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
    sliding_window=4, expert_capacity=8, use_cache=False, initializer_range=INIT, tie_word_embeddings=False,
    pad_token_id=0, eos_token_id=1, bos_token_id=1,
)
# families whose config the generic shrink cannot reach (other field names, nested sub-configs)
FAMILY = {
    # DBRX: d_model/n_heads/n_layers and nested attn/ffn configs; the default attn_config has no
    # rope_theta, and clip_qkv=None breaks its clamp
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"hidden_size": 64, "ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2}),
    # LongCat-Flash: its rotary embedding takes head_dim, which must be the MLA rotary dim (8 here; 64 =
    # 64 in the real config); 256 zero-compute (identity) experts by default would drown the 8 routed
    # ones: keep the real model's ratio (512 routed + 256 zero)
    "longcat_flash": dict(head_dim=SMALL["qk_rope_head_dim"], zero_expert_num=4),
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=2),     # product keys: 4 × 4
    # DeepSeek-V3.2's sparse-attention indexer scores keys by Σ_heads w·ReLU(q·k): with 2 index heads
    # (SMALL) both ReLUs are often 0, so keys tie at score 0 and which of them the indexer's top-k keeps
    # is each backend's tie order (the 1×5 check input has such a tie at the top-4 cut, and every ONNX/TVM
    # artifact, transformers' own exporter's too, was 0.3 off). 8 heads (the real model has 64) leave no
    # zero score on the check input
    "deepseek_v32": dict(index_n_heads=8),
    # LFM2-MoE: no default layer_types (checkpoints give them: short convolutions and attention), and its
    # 2 leading dense layers would leave 2 layers no MoE: one conv and one attention layer, both MoE
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    # ZAYA: its config refuses anything but top-1 routing (the real model's)
    "zaya": dict(num_experts_per_tok=1),
    # Kolibri-1.1: its indexer scores keys with the query heads of key head 0 (4 heads / 2 kv heads here)
    "kolibri1_1": dict(index_num_heads=2),
}
# layer-type / sparsity lists cut or rewritten to the new depth
_SPARSE_HINTS = ("mlp_only_layers", "decoder_sparse_step", "moe_layer_freq", "first_k_dense_replace",
                 "moe_layer_start_index", "moe_layer_end_index", "expert_layer_period", "expert_layer_offset")


@dataclass(frozen=True)
class Family:
    name: str            # the transformers.models subpackage, e.g. "qwen3_moe"
    model_type: str      # its config's model_type (the one with a causal LM when there is one)
    text: bool


def families() -> list[Family]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    root = Path(transformers.__file__).parent / "models"
    moe = {d.name for d in sorted(root.iterdir())
           if any(_MOE_CLASS.search(f.read_text(errors="ignore")) for f in d.glob("modeling_*.py"))}
    out: dict[str, Family] = {}
    for mt in CONFIG_MAPPING_NAMES:
        name = model_type_to_module_name(mt)
        if name not in moe:
            continue
        text = mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not _multimodal(CONFIG_MAPPING_NAMES[mt])
        if name not in out or (text and not out[name].text):
            out[name] = Family(name, mt, text)
    for name in moe - set(out):
        out[name] = Family(name, name, False)
    return sorted(out.values(), key=lambda f: f.name)


def _multimodal(config_class: str) -> bool:
    import transformers
    cfg = getattr(transformers, config_class, None)
    return bool(getattr(cfg, "sub_configs", None)) and "text_config" in cfg.sub_configs


def config(model_type: str, **overrides):
    from transformers import AutoConfig
    base = AutoConfig.for_model(model_type)
    layers0 = getattr(base, "num_hidden_layers", None)
    kw = {k: v for k, v in SMALL.items() if _has(base, k)}
    if _has(base, "kv_lora_rank"):                        # MLA: as many kv heads as heads, no head_dim
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
        kw.pop("head_dim", None)
    layers = kw.get("num_hidden_layers", 2)
    for k, v in vars(base).items():                       # per-layer lists (layer_types, ...) cut to depth
        if isinstance(v, list) and layers0 and len(v) == layers0 and k not in kw:
            kw[k] = v[:layers]
    if _has(base, "mlp_only_layers") and base.mlp_only_layers:
        kw["mlp_only_layers"] = []
    if isinstance(getattr(base, "mlp_layer_types", None), list):   # every layer MoE, of the family's own kinds
        kinds = list(dict.fromkeys(k for k in base.mlp_layer_types if k != "dense")) or ["sparse"]
        kw["mlp_layer_types"] = [kinds[i % len(kinds)] for i in range(layers)]
    if _has(base, "enable_moe_block"):
        kw["enable_moe_block"] = True
    if hasattr(base, "decoder_sparse_step"):
        kw["decoder_sparse_step"] = 1
    if hasattr(base, "moe_layer_freq") and isinstance(base.moe_layer_freq, int):
        kw["moe_layer_freq"] = 1
    if hasattr(base, "moe_layer_freq") and isinstance(base.moe_layer_freq, list):
        kw["moe_layer_freq"] = [1] * layers
    if getattr(base, "n_group", None) and "n_routed_experts" not in kw and "num_experts" not in kw:
        kw.pop("n_group", None)
        kw.pop("topk_group", None)
    kw.update(FAMILY.get(model_type, {}))
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def _has(config, key: str) -> bool:
    try:
        return hasattr(config, key)
    except Exception:          # per-layer attributes (config.per_layer_config) refuse a global read
        return False


# Doge views its router logits as (2, B·S, -1): an example batch of 2 lets export tie B to that literal
# and fix it (the graph then takes batch 2 only); any other example batch keeps it dynamic
EXAMPLE_BATCH = {"doge": 3}


def build(model_type: str, seed: int = 0, batch: int | None = None, seq: int = 8, **overrides):
    """(model, (input_ids,)) for a tiny random `model_type` causal LM, HF eager everywhere."""
    from transformers import AutoModelForCausalLM
    cfg = config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", experts_implementation="eager",
                                             dtype=torch.float32).eval()
    _perturb(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    batch = EXAMPLE_BATCH.get(model_type, 2) if batch is None else batch
    return model, (torch.randint(2, VOCAB, (batch, seq), generator=gen),)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Give zero-initialised biases and correction biases random values (zeros would hide bugs), and
    every tensor left at zero or uninitialised a finite value."""
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() == 0:
                continue
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            elif name.endswith(("_bias", ".bias")) and t.dim() >= 1 and torch.count_nonzero(t) == 0:
                t.copy_(torch.randn(t.shape, generator=gen) * INIT)
            elif not torch.isfinite(t).all():
                t.copy_(torch.randn(t.shape, generator=gen) * INIT)
