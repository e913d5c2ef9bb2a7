"""Experiment (measured, not adopted; samples/results/moefy_heal.md): layer-wise healing, each MoEfied
FFN distilled on its own towards the dense FFN it replaced, routers distilled towards an oracle choice.

    dense graph on the training inputs ─► per layer l: x_l [N, H] (the dense FFN's input), y_l = FFN_l(x_l)
    student layer l:  logits = router(x_l) [N, E];  chosen = top-k(logits) (0/1)        (as the moe op)
                      g = chosen ⊙ (1 + p − sg(p)),  p = softmax(logits)   (straight-through: g = 1 forward)
                      ŷ = Σ_e g_e · expert_e(x_l)                             [N, H]
    loss = Σ_l ‖ŷ_l − y_l‖² / ‖y_l‖²  +  ROUTER_CE · CE(logits_l, oracle_l)
       oracle_l: per token, the k experts chosen greedily (largest drop of ‖y − Σ chosen‖²) from the
       current experts' outputs: the choice the router should make; its cross-entropy gives the router
       a target for the experts it did NOT choose, which the straight-through gate cannot.

Why: end-to-end distillation through the whole model costs a full forward and backward of every layer
per step and sees only the calibration tokens; the layers' local problems are independent, cost one
FFN each, and train on many more FFN inputs (the dense model's, on augmented calibration text, see
`variants`). The FFN inputs are the dense model's, not the MoEfied one's (whose drift the end-to-end
step then corrects). Trains w_in, b_in, w_out, b_out and the router (linear routers: weight and
bias; MLP routers: the output layer). Held-out tokens (a share of the examples) choose the step kept.
"""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import fx

from moecc import calibration as calib
from moecc.ops import activate
from moecc.pipeline import attr, moe_nodes

from moecc.passes.ffn_match import find_ffns

log = logging.getLogger("moecc.passes.moefy_heal_local")

BATCH = 2048                 # tokens per step (the same rows of every layer)
LR = 3e-4
ROUTER_LR = 3e-3
ROUTER_CE = 0.1
WARMUP = 0.05
PATIENCE = 4


def variants(batches: list[tuple], rounds: int, pool: torch.Tensor | None, g: torch.Generator,
             share: float = 0.15) -> list[tuple]:
    """More token-id inputs from the same sentences (the teacher labels any input): per round and
    batch one of — `share` of the inner tokens replaced by random calibration tokens; the inner
    tokens shuffled; every inner token drawn at random from the calibration tokens."""
    out = []
    for r in range(rounds):
        for b in batches:
            ids = b[0]
            if pool is None or ids.is_floating_point() or ids.dim() != 2 or ids.shape[1] <= 3:
                continue
            kind = (r + len(out)) % 3
            inner = ids[:, 1:-1]
            if kind == 0:
                hit = torch.rand(inner.shape, generator=g) < share
                new = torch.where(hit, pool[torch.randint(0, pool.numel(), inner.shape, generator=g)], inner)
            elif kind == 1:
                new = inner.gather(1, torch.argsort(torch.rand(inner.shape, generator=g), dim=1))
            else:
                new = pool[torch.randint(0, pool.numel(), inner.shape, generator=g)]
            out.append((torch.cat([ids[:, :1], new, ids[:, -1:]], 1), *b[1:]))
    return out


class _Layer:
    """One MoE node's trainable tensors (the graph's own Parameters) and the dense FFN's weights."""

    def __init__(self, student: fx.GraphModule, node: fx.Node, spec, dense: tuple):
        self.spec, self.dense = spec, dense
        get = lambda n: None if n is None else attr(student, n.target)          # noqa: E731
        self.w_in, self.w_out, self.b_in, self.b_out = (get(n) for n in node.args[2:6])
        logits = node.args[1]
        self.router_w, self.router_b = get(logits.args[1]), get(logits.args[2]) if len(logits.args) > 2 else None
        first = logits.args[0]
        self.mlp = None
        if first.op == "call_function" and first.target is torch.ops.aten.relu.default:
            lin = first.args[0]
            self.mlp = (get(lin.args[1]).detach(), get(lin.args[2]).detach())

    def params(self) -> tuple[list, list]:
        experts = [p for p in (self.w_in, self.w_out, self.b_in, self.b_out) if p is not None]
        return experts, [p for p in (self.router_w, self.router_b) if p is not None]

    def target(self, x: torch.Tensor) -> torch.Tensor:
        w_in, b_in, w_out, b_out = self.dense
        h = torch.cat([F.linear(x, w, b) for w, b in zip(w_in, b_in)], -1)
        return F.linear(activate(h, self._dense_spec), w_out, b_out)

    @property
    def _dense_spec(self):
        return self.spec

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(x, *self.mlp)) if self.mlp else x
        return F.linear(h, self.router_w, self.router_b)                          # [N, E]

    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's output for every token [N, E, H] (bias included)."""
        E, R, H = self.w_in.shape
        h = F.linear(x, self.w_in.reshape(E * R, H), None if self.b_in is None else self.b_in.reshape(-1))
        a = activate(h.view(-1, E, R), self.spec)                                 # [N, E, m]
        c = torch.einsum("nem,ehm->neh", a, self.w_out)
        return c if self.b_out is None else c + self.b_out

    def loss(self, x: torch.Tensor, y: torch.Tensor, router_ce: float) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.spec.router.top_k
        logits = self.logits(x)
        chosen = torch.zeros_like(logits).scatter_(1, logits.topk(k, dim=1).indices, 1.0)
        p = logits.float().softmax(1)
        gate = chosen * (1 + p - p.detach())                                      # [N, E], = chosen
        c = self.contributions(x)                                                 # [N, E, H]
        y_hat = torch.einsum("ne,neh->nh", gate, c)
        rel = (y_hat - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-12)
        if router_ce <= 0:
            return rel, rel
        oracle = greedy_oracle(c.detach(), y, k)                                  # [N, E] 0/1
        ce = -(oracle * logits.float().log_softmax(1)).sum(1).mean() / k
        return rel + router_ce * ce, rel


def greedy_oracle(c: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """c [N, E, H] expert outputs, y [N, H] -> [N, E] 0/1: k experts chosen one at a time, each the
    one that most reduces ‖y − Σ chosen‖²."""
    chosen = torch.zeros(c.shape[:2], dtype=c.dtype)
    r = y.clone()
    for _ in range(k):
        gain = 2 * torch.einsum("neh,nh->ne", c, r) - c.pow(2).sum(-1)           # ‖r‖² − ‖r − c_e‖²
        gain = gain.masked_fill(chosen > 0, -float("inf"))
        e = gain.argmax(1)
        chosen[torch.arange(len(e)), e] = 1
        r = r - c[torch.arange(len(e)), e]
    return chosen


def _dense(teacher: fx.GraphModule, names: list[str]):
    from moecc.passes.moefy import _weights
    by = {m.name: m for m in find_ffns(teacher)[0]}
    return [by[n] for n in names], [_weights(teacher, by[n]) for n in names]


def heal_local(student: fx.GraphModule, teacher: fx.GraphModule, cal: calib.Calibration, steps: int,
               seed: int = 0, rounds: int = 6, lr: float = LR, router_lr: float = ROUTER_LR,
               router_ce: float = ROUTER_CE, hold_out_every: int = 8, eval_every: int | None = None,
               progress: bool = False) -> dict:
    """Train every MoE layer of `student` (in place) towards the dense FFN of `teacher`; facts."""
    from moecc.passes.moefy_heal import _split, _token_pool
    start = time.perf_counter()
    nodes = list(moe_nodes(student))
    names = [spec.name for _, spec in nodes]
    matches, dense = _dense(teacher, names)
    layers = [_Layer(student, node, spec, d) for (node, spec), d in zip(nodes, dense)]
    train, held = _split(cal)
    g = torch.Generator().manual_seed(seed)
    more = variants(train, rounds, _token_pool(train), g)
    with torch.no_grad():
        xs = calib.collect(teacher, [m.x for m in matches], calib.Calibration(tuple(train + more), 0, 0, "", "heal"))
        xh = calib.collect(teacher, [m.x for m in matches], calib.Calibration(tuple(held), 0, 0, "", "heal"))
        xs, xh = [x.float() for x in xs], [x.float() for x in xh]
        ys = [L.target(x) for L, x in zip(layers, xs)]
        yh = [L.target(x) for L, x in zip(layers, xh)]
    n = xs[0].shape[0]
    experts, routers = [], []
    for L in layers:
        e, r = L.params()
        experts += e
        routers += r
    grad_was = {id(p): p.requires_grad for p in experts + routers}
    for p in experts + routers:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": experts, "lr": lr}, {"params": routers, "lr": router_lr}])
    warm = max(1, int(WARMUP * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm))))))
    eval_every = eval_every or max(1, min(50, steps // 10))

    @torch.no_grad()
    def held_out() -> float:
        return sum(L.loss(x, y, 0.0)[1].item() for L, x, y in zip(layers, xh, yh)) / len(layers)

    before = held_out()
    params = experts + routers
    best = (before, 0, [p.detach().clone() for p in params])
    curve, since, order = [(0, None, round(before, 6))], 0, torch.empty(0, dtype=torch.long)
    run = []
    with torch.enable_grad():
        for step in range(1, steps + 1):
            if order.numel() < BATCH:
                order = torch.cat([order, torch.randperm(n, generator=g)])
            idx, order = order[:BATCH], order[BATCH:]
            total, rel = 0.0, 0.0
            for L, x, y in zip(layers, xs, ys):
                loss, r = L.loss(x[idx], y[idx], router_ce)
                total = total + loss
                rel += r.item()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            run.append(rel / len(layers))
            if step % eval_every == 0 or step == steps:
                h = held_out()
                curve.append((step, round(sum(run) / len(run), 6), round(h, 6)))
                run = []
                if progress:
                    log.warning("local heal step %d: train %.4f held-out %.4f", step, curve[-1][1], h)
                if h < best[0]:
                    best, since = (h, step, [p.detach().clone() for p in params]), 0
                else:
                    since += 1
                    if since >= PATIENCE:
                        break
    with torch.no_grad():
        for p, v in zip(params, best[2]):
            p.copy_(v)
    for p in params:
        p.requires_grad_(grad_was[id(p)])
    return {"steps": steps, "best_step": best[1], "tokens": n, "rounds": rounds,
            "held_out_loss_before": round(before, 6), "held_out_loss_after": round(best[0], 6),
            "seconds": round(time.perf_counter() - start, 2), "curve": curve}


def main(argv=None) -> None:
    """MiniLM, E=8 k=2: held-out sentences' cosine / NN agreement before and after local healing with
    the given settings (lr, router lr, router CE weight, steps, augmentation rounds)."""
    import argparse
    import copy
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import minilm
    import moefy_curve as mc
    from moecc.frontend import capture
    from moecc.passes import moefy
    from moecc.passes.canonicalize import canonicalize
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--variants", default="1e-4,0,0,60,1;0,1e-3,0.1,60,1;0,3e-4,1,60,1",
                   help="lr,router_lr,router_ce,steps,rounds;... (one local healing each, from the same split)")
    args = p.parse_args(argv)
    cal_lines, held = calib.split_corpus()
    model, example = minilm.build()
    cal = calib.load(cal_lines, minilm.tokenize)
    held_b = calib.load(held, minilm.tokenize).batches
    base = capture(model, example, source="samples/minilm.py:build")
    canonicalize(base.gm)
    dense = mc.embed(base.gm, held_b)
    plans = moefy.plan(base.gm, args.experts, calibration=cal, seed=0)[0]
    start = moefy.apply(copy.deepcopy(base.gm), plans, args.top_k)
    print("unhealed", mc.quality(mc.embed(start, held_b), dense), flush=True)
    for v in args.variants.split(";"):
        lr, rlr, ce, steps, rounds = (float(t) for t in v.split(","))
        gm = copy.deepcopy(start)
        f = heal_local(gm, base.gm, cal, int(steps), rounds=int(rounds), router_ce=ce, lr=lr, router_lr=rlr)
        print(v, {k: f[k] for k in ("best_step", "tokens", "held_out_loss_before", "held_out_loss_after",
                                    "seconds")}, mc.quality(mc.embed(gm, held_b), dense), flush=True)


if __name__ == "__main__":
    main()
