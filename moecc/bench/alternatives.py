"""The alternatives `moecc bench` measures against, built on the SAME weights as moecc's kernels.

    ort_fused(spec, weights, threads) -> (run(x [T, H] np) -> y np) | reason
        onnxruntime's com.microsoft::MoE in a tiny graph made with onnx.helper:
        x → MatMul(router) → MoE(x, logits, fc1 (E, R, H), fc2 (E, H, F)) (+ shared expert) → y
    hf_block(spec, weights, implementation) -> (run(x [T, H] torch) -> y) | reason
        the transformers 5.x MoE block with its experts module switched between "eager" and
        "grouped_mm" (config._experts_implementation, read at every call):
        gated + renormalized → MixtralSparseMoeBlock; gated + one shared expert, no renormalize →
        DeepseekV2Moe; not gated → NemotronHExperts (has_gate=False) behind the same softmax-top-k.
    tvm_kernels(spec, weights, work_dir) -> {"tvm:<kernel>": (run(x [T, H] np) -> y np, checker)}
        moecc's TVM backend: a moecc.nn.MoE layer holding the weights, exported once (dynamic T),
        lowered once per TVM kernel.
    tvm_threads(n)   TVM's runtime thread pool resized to n threads (before or after tvm's import)

`weights` = {"router": [E, H], "w_in": [E, R, H], "w_out": [E, H, F], "shared_w_in"?, "shared_w_out"?}.
Facts used (issue 2): the fused op takes RAW logits (softmax over E, top-k, optional renormalize),
weights in nn.Linear layout (E, out, in), swiglu as swiglu_fusion=1 (gate/up rows interleaved),
activation "gelu" = tanh approximation, float32 only on CPU.
"""
from __future__ import annotations

import numpy as np
import torch

from moecc.spec import MoESpec

ONE_HEAD = {"num_attention_heads": 1, "num_key_value_heads": 1}   # configs validate H against heads
ORT_ACT = {"relu": "relu", "gelu_tanh": "gelu", "silu": "silu", "swiglu": "swiglu"}


def ort_reason(spec: MoESpec) -> str | None:
    r = spec.router
    if r.kind != "softmax_topk" or r.scaling != 1.0 or r.capacity_factor is not None:
        return f"fused op routes softmax→top-k only (got {r.kind}, scaling {r.scaling}, capacity {r.capacity_factor})"
    if spec.activation not in ORT_ACT or spec.interleaved:
        return f"fused op has no {spec.activation}{' interleaved' if spec.interleaved else ''} activation"
    if spec.expert_bias or spec.shared_gated or (spec.shared_ffn and spec.activation != "swiglu"):
        return "bench builds the fused op without expert biases, with a swiglu shared expert only"
    return None


def _interleave(w_in: torch.Tensor) -> torch.Tensor:
    """[E, 2F, H] rows [gate; up] → rows gate0, up0, gate1, up1, … (swiglu_fusion=1)."""
    E, R, H = w_in.shape
    return w_in.view(E, 2, R // 2, H).transpose(1, 2).reshape(E, R, H)


def ort_fused(spec: MoESpec, weights: dict, threads: int):
    reason = ort_reason(spec)
    if reason:
        return reason

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    H = spec.hidden
    inits, nodes = [], []

    def init(name, t):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(t.detach().float().numpy()), name))
        return name

    nodes.append(helper.make_node("MatMul", ["x", init("router_t", weights["router"].t())], ["logits"]))
    fc1 = _interleave(weights["w_in"]) if spec.gated else weights["w_in"]
    attrs = dict(k=spec.top_k, activation_type=ORT_ACT[spec.activation],
                 normalize_routing_weights=int(spec.router.renormalize))
    if spec.gated:
        attrs["swiglu_fusion"] = 1
    moe_out = "y_routed" if spec.shared_ffn else "y"
    nodes.append(helper.make_node("MoE", ["x", "logits", init("fc1", fc1), "", init("fc2", weights["w_out"])],
                                  [moe_out], domain="com.microsoft", **attrs))
    if spec.shared_ffn:                     # the shared expert in standard ops
        nodes.append(helper.make_node("MatMul", ["x", init("sh_in_t", weights["shared_w_in"].t())], ["sh_h"]))
        nodes += [helper.make_node("Split", ["sh_h"], ["sh_g", "sh_u"], axis=-1, num_outputs=2),
                  helper.make_node("Sigmoid", ["sh_g"], ["sh_sg"]),
                  helper.make_node("Mul", ["sh_g", "sh_sg"], ["sh_silu"]),
                  helper.make_node("Mul", ["sh_silu", "sh_u"], ["sh_a"])]
        nodes += [helper.make_node("MatMul", ["sh_a", init("sh_out_t", weights["shared_w_out"].t())], ["sh_y"]),
                  helper.make_node("Add", [moe_out, "sh_y"], ["y"])]
    graph = helper.make_graph(nodes, "moe_bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")   # idle after a call, as
    # torch's pool: spinning threads slowed the next implementation timed by up to 1.7x (ORT's own time
    # is the same either way: 86.6 vs 90.4 ms at mixtral-like T=512, 2 threads)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del model, inits
    return lambda x: sess.run(["y"], {"x": x})[0]


def hf_reason(spec: MoESpec) -> str | None:
    r = spec.router
    if r.kind != "softmax_topk" or r.scaling != 1.0 or r.capacity_factor is not None or spec.expert_bias:
        return "transformers blocks in the bench: softmax→top-k routing, no capacity, no expert bias"
    if spec.gated and spec.activation != "swiglu" or spec.interleaved:
        return f"no transformers block with {spec.activation} experts in the bench"
    if spec.shared_ffn and (spec.shared_gated or spec.shared_ffn != spec.ffn or r.renormalize or not spec.gated):
        return "DeepseekV2Moe: one ungated shared expert of the experts' width, no renormalize"
    if spec.gated and not spec.shared_ffn and not r.renormalize:
        return "MixtralSparseMoeBlock renormalizes the top-k weights"
    if not spec.gated and spec.activation not in ("relu", "silu", "gelu"):
        return f"no transformers experts module with {spec.activation}"
    return None


def hf_block(spec: MoESpec, weights: dict, implementation: str):
    """A transformers MoE block sharing `weights` (no copy); run(x [T, H]) -> y [T, H]."""
    reason = hf_reason(spec)
    if reason:
        return reason
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    E, H, Fw, k = spec.num_experts, spec.hidden, spec.ffn, spec.top_k
    p = lambda t: torch.nn.Parameter(t, requires_grad=False)   # noqa: E731  (shares storage)
    if spec.gated and spec.shared_ffn:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        cfg = DeepseekV2Config(hidden_size=H, moe_intermediate_size=Fw, n_routed_experts=E, num_experts_per_tok=k,
                               n_shared_experts=1, topk_method="greedy", routed_scaling_factor=1.0, hidden_act="silu",
                               **ONE_HEAD)
        block = DeepseekV2Moe(cfg)
        block.gate.weight = p(weights["router"])
        sh = block.shared_experts
        sh.gate_proj.weight, sh.up_proj.weight = p(weights["shared_w_in"][:Fw]), p(weights["shared_w_in"][Fw:])
        sh.down_proj.weight = p(weights["shared_w_out"])
    elif spec.gated:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=H, intermediate_size=Fw, num_local_experts=E, num_experts_per_tok=k,
                            hidden_act="silu", router_jitter_noise=0.0, **ONE_HEAD)
        block = MixtralSparseMoeBlock(cfg)
        block.gate.weight = p(weights["router"])
    else:
        from transformers import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
        cfg = NemotronHConfig(hidden_size=H, moe_intermediate_size=Fw, n_routed_experts=E,
                              num_experts_per_tok=k, mlp_hidden_act=spec.activation, **ONE_HEAD)
        block = _topk_block(NemotronHExperts(cfg), weights["router"], k, spec.router.renormalize)
    experts = block.experts
    if spec.gated:
        experts.gate_up_proj, experts.down_proj = p(weights["w_in"]), p(weights["w_out"])
    else:
        experts.up_proj, experts.down_proj = p(weights["w_in"]), p(weights["w_out"])
    cfg._experts_implementation = implementation
    experts.config._experts_implementation = implementation
    block.eval()
    return lambda x: block(x.view(1, *x.shape)).view(x.shape)


def _topk_block(experts, router: torch.Tensor, k: int, renormalize: bool):
    """Mixtral's softmax-top-k router in front of a non-gated transformers experts module."""
    def forward(x3):                                                # [1, T, H]
        x = x3.reshape(-1, x3.shape[-1])
        probs = torch.softmax(torch.nn.functional.linear(x, router).float(), dim=-1)
        top, idx = torch.topk(probs, k, dim=-1)
        if renormalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return experts(x, idx, top.to(x.dtype)).view(x3.shape)
    forward.experts, forward.eval = experts, experts.eval
    return forward


def tvm_threads(n: int) -> None:
    """TVM_NUM_THREADS caps the pool when tvm's runtime starts (set it to every core, once, before the
    first import); runtime.config_threadpool then resizes it for this run."""
    import os
    os.environ.setdefault("TVM_NUM_THREADS", str(max(n, os.cpu_count() or 1)))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")     # idle between calls (see ort_fused)
    try:
        import tvm
    except ImportError:
        return
    tvm.get_global_func("runtime.config_threadpool")(1, n)      # 1 = kBig: n threads on the big cores


TVM_TARGET, TVM_TUNE_TRIALS = "host", 8    # what a user deploys: this CPU, expert GEMMs tuned (the
                                           # database is cached, so a second shape/thread count reuses it)
TVM_TUNE_TOKENS = {"tvm.gather": 8, "tvm.grouped_gemm": 512}   # the token count each kernel is tuned at


def tvm_kernels(spec: MoESpec, weights: dict, work_dir) -> dict | str:
    import pathlib
    try:
        from moecc import backends
        from moecc.backends.tvm import kernels as tvm_k
    except ImportError as e:
        return f"TVM backend unavailable: {e}"
    from moecc.nn import MoE
    model = MoE(spec, init_std=0.0).eval()
    p = lambda t: torch.nn.Parameter(t, requires_grad=False)   # noqa: E731  (shares storage)
    model.router.weight, model.w_in, model.w_out = p(weights["router"]), p(weights["w_in"]), p(weights["w_out"])
    if spec.shared_ffn:
        model.shared_w_in, model.shared_w_out = p(weights["shared_w_in"]), p(weights["shared_w_out"])
    program = torch.export.export(model, (torch.randn(1, 8, spec.hidden),),
                                  dynamic_shapes=({1: torch.export.Dim.AUTO},))
    out = {}
    for name, kernel in tvm_k.KERNELS.items():
        if kernel.checker(spec, {}) is not True:
            continue
        d = pathlib.Path(work_dir) / name
        d.mkdir(parents=True, exist_ok=True)
        options = {"kernel": name, "target": TVM_TARGET}
        if name in TVM_TUNE_TOKENS:
            options.update(tune_trials=TVM_TUNE_TRIALS, tokens=TVM_TUNE_TOKENS[name])
        backends.get("tvm").lower(program, d, options)
        run = backends.runtime("tvm").load(d, {})
        check = lambda T, k=kernel: k.checker(spec, {"tokens": T})           # noqa: E731
        out[f"tvm:{name.split('.', 1)[1]}"] = (lambda x, run=run: run([x[None]])[0][0], check)
    return out
