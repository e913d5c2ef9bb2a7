"""Split a fused gate/up Linear into two, so the gated-FFN pattern (ffn_match) sees it (canonicalize runs it).

    h = linear(x, W_gu [2F, H], b_gu);  g, u = h.chunk(2, -1)          (Phi-3; also split / split_with_sizes)
        ⇒  g = linear(x, W_gu[:F], b_gu[:F]);   u = linear(x, W_gu[F:], b_gu[F:])
    h = linear(x, W_gu, b_gu);  g, u = h[..., ::2], h[..., 1::2]       (interleaved gate/up rows)
        ⇒  g = linear(x, W_gu[0::2], b_gu[0::2]);  u = linear(x, W_gu[1::2], b_gu[1::2])

Each output element is the same dot product as before (rows of W_gu, unchanged), so the split graph
computes exactly what the fused one did. The halves become parameters `<weight>_gate` / `<weight>_up`
beside the fused one, which is dropped when nothing else reads it. Only a split whose gate half feeds
an activation that multiplies the up half is rewritten; other splits of a Linear are left alone and
reported by `why_not` (for the "no dense FFN found" message).
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

aten = torch.ops.aten
LINEAR = aten.linear.default
SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}
BIG = 1 << 62


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _last_dim(node: fx.Node, dim) -> bool:
    return dim == -1 or (_rank(node) is not None and dim == _rank(node) - 1)


def _param(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def halves(gm: fx.GraphModule, lin: fx.Node) -> tuple[str, fx.Node, fx.Node] | str | None:
    """('chunk' | 'interleaved', gate node, up node) when `lin`'s output is split in two halves on its
    last dim; a reason (str) when it is split some other way; None when it is not split at all."""
    users = list(lin.users)
    w = _param(gm, lin.args[1] if len(lin.args) > 1 else None)
    if w is None or w.dim() != 2:
        return None
    rows = w.shape[0]
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in SPLITS:
        s = users[0]
        args = list(s.args) + [None] * 3
        dim = args[2] if args[2] is not None else s.kwargs.get("dim", 0)
        if s.target is aten.chunk.default:
            parts, ok = args[1], args[1] == 2
        elif s.target is aten.split.Tensor:
            parts, ok = -(-rows // args[1]), args[1] * 2 == rows
        else:
            parts, ok = len(args[1]), list(args[1]) == [rows // 2, rows // 2] and rows % 2 == 0
        if parts != 2:
            return None                               # e.g. q, k, v: not a gate/up pair
        if not (ok and _last_dim(lin, dim)):
            return f"{s.name}: the fused Linear's output is split {s.target.__name__}{tuple(s.args[1:])}, not in two halves on its last dim"
        parts = {u.args[1]: u for u in s.users if u.target is operator.getitem}
        if set(parts) != {0, 1} or len(s.users) != 2:
            return f"{s.name}: both halves of the split must be used, once each"
        return "chunk", parts[0], parts[1]
    slices = [u for u in users if u.op == "call_function" and u.target is aten.slice.Tensor]
    if len(users) == 2 and len(slices) == 2:
        found = {}
        for s in slices:
            a = list(s.args) + [0, None, BIG, 1][len(s.args):]
            dim, start, end, step = a[1], a[2], a[3], a[4]
            if _last_dim(lin, dim) and step == 2 and start in (0, 1) and (end is None or end >= rows):
                found[start] = s
        if set(found) == {0, 1}:
            return "interleaved", found[0], found[1]
        return f"{slices[0].name}: the fused Linear's output is sliced, but not as [..., ::2] / [..., 1::2]"
    return None


def gated(gate: fx.Node, up: fx.Node) -> bool:
    """act(gate) * up: the shape of a gated FFN's hidden state."""
    from .ffn_match import GATED, MUL, activation_of
    if len(gate.users) != 1 or len(up.users) != 1:
        return False
    act = next(iter(gate.users))
    if activation_of(act) not in GATED or len(act.users) != 1:
        return False
    mul = next(iter(act.users))
    return mul.target is MUL and set(mul.args[:2]) == {act, up} and next(iter(up.users)) is mul


def _register(gm: fx.GraphModule, target: str, suffix: str, value: torch.Tensor) -> str:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    new = f"{name}_{suffix}"
    owner.register_parameter(new, nn.Parameter(value.detach().clone().contiguous(), requires_grad=False))
    return f"{owner_path}.{new}" if owner_path else new


def split_fused_gate_up(gm: fx.GraphModule) -> int:
    """Rewrite every fused gate/up Linear that feeds a gated FFN into two Linears; returns the count."""
    count, fused = 0, []
    for lin in list(gm.graph.nodes):
        if lin.op != "call_function" or lin.target is not LINEAR:
            continue
        found = halves(gm, lin)
        if not isinstance(found, tuple) or not gated(found[1], found[2]):
            continue
        layout, gate, up = found
        x, w_node = lin.args[0], lin.args[1]
        b_node = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        w, b = _param(gm, w_node), _param(gm, b_node)
        fused += [w_node.target] + ([b_node.target] if b is not None else [])
        F = w.shape[0] // 2
        pick = {"gate": slice(0, F), "up": slice(F, 2 * F)} if layout == "chunk" else \
               {"gate": slice(0, None, 2), "up": slice(1, None, 2)}
        for part, old in (("gate", gate), ("up", up)):
            with gm.graph.inserting_before(old):
                wn = gm.graph.get_attr(_register(gm, w_node.target, part, w[pick[part]]))
                args = (x, wn)
                if b is not None:
                    args += (gm.graph.get_attr(_register(gm, b_node.target, part, b[pick[part]])),)
                new = gm.graph.call_function(LINEAR, args)
            new.meta = {k: v for k, v in lin.meta.items() if k != "val"}
            if "val" in old.meta:
                new.meta["val"] = old.meta["val"]
            old.replace_all_uses_with(new)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        _drop_unused(gm, fused)
        gm.recompile()
    return count


def _drop_unused(gm: fx.GraphModule, targets: list[str]) -> None:
    """Delete the fused parameters nothing reads any more (their halves replace them)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets:
        if target not in used:
            owner_path, _, attr = target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if hasattr(owner, attr):
                delattr(owner, attr)
