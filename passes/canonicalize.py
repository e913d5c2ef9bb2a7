"""Canonicalize ATen spellings so one FFN pattern covers every way of writing it.

    matmul(x, W.T) [+ b]      ⇒  linear(x, W, b)      (W a parameter; .T / .t() / transpose / permute)
    x * sigmoid(x)            ⇒  silu(x)
    relu_ / silu_ / gelu_     ⇒  relu / silu / gelu    (the in-place input has no other user)
    dropout(x, p, train=False), clone(x), alias(x)  ⇒  x
    linear(x, W_gu) → chunk(2, -1) | [..., ::2], [..., 1::2] → gated FFN  ⇒  two Linears (fused_gate_up.py)
"""
from __future__ import annotations

import torch
from torch import fx

from moecc.pipeline import PassResult, attr

from .fused_gate_up import split_fused_gate_up

aten = torch.ops.aten
TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}
INPLACE = {aten.relu_.default: aten.relu.default, aten.silu_.default: aten.silu.default,
           aten.gelu_.default: aten.gelu.default}
IDENTITY = {aten.clone.default, aten.alias.default}


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in TRANSPOSES:
        return False
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    return True


def _param(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _attr_rank(gm: fx.GraphModule, node: fx.Node) -> int:
    return attr(gm, node.target).dim()


def _rewrite_matmul(gm: fx.GraphModule, node: fx.Node) -> bool:
    x, wt = node.args
    if not (isinstance(wt, fx.Node) and _is_2d_transpose(wt) and _param(wt.args[0])
            and _attr_rank(gm, wt.args[0]) == 2):
        return False
    bias = None
    users = list(node.users)
    if len(users) == 1 and users[0].target is aten.add.Tensor and users[0].args[0] is node \
            and _param(users[0].args[1]) and _attr_rank(gm, users[0].args[1]) == 1:
        bias = users[0].args[1]
    with gm.graph.inserting_before(node):
        lin = gm.graph.call_function(aten.linear.default, (x, wt.args[0], bias))
    lin.meta = dict(node.meta)
    replaced = users[0] if bias is not None else node
    if "val" in replaced.meta:
        lin.meta["val"] = replaced.meta["val"]
    replaced.replace_all_uses_with(lin)
    return True


def _rewrite_silu(gm: fx.GraphModule, node: fx.Node) -> bool:
    a, b = node.args[:2]
    for x, s in ((a, b), (b, a)):
        if isinstance(s, fx.Node) and s.target is aten.sigmoid.default and s.args[0] is x \
                and len(s.users) == 1:
            with gm.graph.inserting_before(node):
                silu = gm.graph.call_function(aten.silu.default, (x,))
            silu.meta = dict(node.meta)
            node.replace_all_uses_with(silu)
            return True
    return False


def canonicalize(gm: fx.GraphModule) -> PassResult:
    stats = {"linear": 0, "silu": 0, "inplace": 0, "identity": 0, "gate_up_split": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if t is aten.matmul.default and _rewrite_matmul(gm, node):
            stats["linear"] += 1
        elif t is aten.mul.Tensor and _rewrite_silu(gm, node):
            stats["silu"] += 1
        elif t in INPLACE and len(node.args[0].users) == 1:
            node.target = INPLACE[t]
            stats["inplace"] += 1
        elif t in IDENTITY or (t is aten.dropout.default and node.args[2] is False):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            stats["identity"] += 1
    gm.graph.eliminate_dead_code()
    stats["gate_up_split"] = split_fused_gate_up(gm)
    gm.recompile()
    return PassResult(gm, any(stats.values()), {k: v for k, v in stats.items() if v})


def make(options: dict):
    return canonicalize
