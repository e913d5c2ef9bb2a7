"""Find dense FFNs on the canonical ATen graph (run `canonicalize` first).

    linear(x, W1, b1) → act → linear(·, W2, b2)                       act ∈ relu, gelu, gelu_tanh, silu
    linear(act(linear(x, Wg)) ⊙ linear(x, Wu), Wd)                     gated: swiglu (silu), geglu (gelu)

    fused gate/up: linear(x, W_gu) split in halves (chunk / interleaved) is first split into two
    Linears by canonicalize (fused_gate_up.py), then matched as gated.

The two Linears may come from different modules (BERT: intermediate.dense + gelu, then output.dense).
Every candidate that looks like an FFN start (a Linear feeding an activation) but must not be rewritten
yields a `Refusal` with the reason, so users (and tests) see why a rule did not fire.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from moecc.pipeline import attr

aten = torch.ops.aten
LINEAR = aten.linear.default
MUL = aten.mul.Tensor


def activation_of(node: fx.Node) -> str | None:
    """The activation name an ATen node computes, or None."""
    if node.op != "call_function":
        return None
    if node.target in (aten.relu.default, aten.relu_.default):
        return "relu"
    if node.target in (aten.silu.default, aten.silu_.default):
        return "silu"
    if node.target in (aten.gelu.default, aten.gelu_.default):
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else "gelu"
    return None


GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}


@dataclass(frozen=True)
class FFNMatch:
    x: fx.Node                      # the FFN input
    w_in: tuple[fx.Node, ...]       # (W1,) or (W_gate, W_up): get_attr nodes, [F, H] each
    b_in: tuple                     # matching biases (get_attr nodes or None)
    w_out: fx.Node                  # [H, F]
    b_out: fx.Node | None
    activation: str                 # relu | gelu | gelu_tanh | silu | swiglu | geglu
    nodes: tuple[fx.Node, ...]      # every node the FFN consists of, output Linear last
    name: str                       # module path shared by the two Linears

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]


@dataclass(frozen=True)
class Refusal:
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _common_name(a: fx.Node, b: fx.Node) -> str:
    pa, pb = _module_path(a).split("."), _module_path(b).split(".")
    common = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        common.append(x)
    return ".".join(common) or _module_path(a) or a.name


def _param_shape(gm: fx.GraphModule, node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    return tuple(attr(gm, node.target).shape)


def _linear_parts(node: fx.Node):
    args = list(node.args) + [None] * (3 - len(node.args))
    return args[0], args[1], args[2] if args[2] is not None else node.kwargs.get("bias")


def _users(node: fx.Node) -> str:
    return ", ".join(u.name for u in node.users)


def _match_from(gm: fx.GraphModule, lin1: fx.Node) -> FFNMatch | Refusal | None:
    """Try to match an FFN whose first (gate) Linear is `lin1`."""
    if len(lin1.users) != 1 or activation_of(next(iter(lin1.users))) is None:
        return _why_not(gm, lin1)                 # None: not an FFN start at all
    act = next(iter(lin1.users))
    kind = activation_of(act)
    x, w1, b1 = _linear_parts(lin1)
    if len(act.users) != 1:
        return Refusal(act.name, f"the hidden activation is used by {len(act.users)} nodes "
                                 f"({_users(act)}), not only by the second Linear")
    nxt = next(iter(act.users))
    ins, bins, nodes, activation = (w1,), (b1,), [lin1, act], kind
    if nxt.op == "call_function" and nxt.target is MUL:
        other = nxt.args[1] if nxt.args[0] is act else nxt.args[0]
        if not (isinstance(other, fx.Node) and other.target is LINEAR and other.args[0] is x
                and len(other.users) == 1 and kind in GATED):
            return Refusal(nxt.name, f"{act.name} is multiplied by {getattr(other, 'name', other)}, "
                                     "which is not a Linear of the same input (not a gated FFN)")
        if len(nxt.users) != 1:
            return Refusal(nxt.name, f"the gated hidden state is used by {len(nxt.users)} nodes ({_users(nxt)})")
        _, wu, bu = _linear_parts(other)
        ins, bins, nodes, activation = (w1, wu), (b1, bu), [lin1, act, other, nxt], GATED[kind]
        nxt = next(iter(nxt.users))
    if not (nxt.op == "call_function" and nxt.target is LINEAR and nxt.args[0] is nodes[-1]):
        what = nxt.target if nxt.op == "call_function" else nxt.op
        return Refusal(nxt.name, f"{what} between the Linears is not elementwise; "
                                 "an FFN needs Linear → activation → Linear")
    _, w2, b2 = _linear_parts(nxt)
    shapes = [_param_shape(gm, w) for w in (*ins, w2)]
    if any(s is None or len(s) != 2 for s in shapes):
        return Refusal(nxt.name, "an FFN weight is computed in the graph, not a 2-D parameter")
    (F_, H), (H2, F2) = shapes[0], shapes[-1]
    if any(s != shapes[0] for s in shapes[:-1]) or (H2, F2) != (H, F_):
        return Refusal(nxt.name, f"shapes do not fit an FFN: in {shapes[:-1]}, out {shapes[-1]}")
    for b, want in [*((b, F_) for b in bins), (b2, H)]:
        if b is not None and _param_shape(gm, b) != (want,):
            return Refusal(nxt.name, "an FFN bias is computed in the graph, not a parameter")
    return FFNMatch(x, ins, bins, w2, b2, activation, (*nodes, nxt), _common_name(lin1, nxt))


OTHER_ACTIVATIONS = {"tanh", "sigmoid", "elu", "selu", "celu", "leaky_relu", "hardswish", "hardsigmoid",
                     "hardtanh", "mish", "softplus", "log_sigmoid", "erf", "abs", "exp", "pow", "square"}


def _why_not(gm: fx.GraphModule, lin1: fx.Node) -> Refusal | None:
    """A Linear that is almost an FFN start, and why it is not one (fused gate/up split some other
    way, or an activation moecc does not rewrite); None for an ordinary Linear."""
    from .fused_gate_up import gated, halves
    split = halves(gm, lin1)
    if isinstance(split, str):
        return Refusal(lin1.name, split)
    if isinstance(split, tuple) and not gated(split[1], split[2]):
        return Refusal(lin1.name, "a fused gate/up Linear is split in halves, but silu/gelu(first half) * "
                                  "second half does not follow (a gated FFN needs it)")
    if len(lin1.users) == 1:
        act = next(iter(lin1.users))
        op = str(getattr(act.target, "__name__", act.target)).split(".")[0]
        if act.op == "call_function" and op in OTHER_ACTIVATIONS and len(act.users) == 1 \
                and next(iter(act.users)).target is LINEAR:
            return Refusal(act.name, f"activation {op} is not one moecc rewrites (relu, gelu, gelu_tanh, silu; "
                                     "gated: silu/gelu)")
    return None


def find_ffns(gm: fx.GraphModule) -> tuple[list[FFNMatch], list[Refusal]]:
    """All dense FFNs in graph order, and the reasons candidates were refused."""
    matches, refusals, taken = [], [], set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not LINEAR or node in taken:
            continue
        m = _match_from(gm, node)
        if isinstance(m, FFNMatch):
            matches.append(m)
            taken.update(m.nodes)
        elif isinstance(m, Refusal):
            refusals.append(m)
    return matches, refusals


LOOKED_FOR = ("Linear → relu/gelu/silu → Linear, and gated (act(x·Wg) ⊙ x·Wu)·Wd (separate or one fused "
              "gate_up Linear split by chunk(2, -1) or [..., ::2]/[..., 1::2]), with or without biases, on the ATen graph")
