"""Healing after MoEfication: distil the dense model into the MoEfied one on the calibration data.

    teacher: the dense graph (before the split)  ─► per FFN layer l: h_l = x_l + FFN(x_l)   [B, S, H]
                                                    and the model's outputs
    student: the MoEfied graph                   ─► h_l = x_l + moe(x_l) (the MoE node's input + output)
    loss = mean_l ‖h_lˢ − h_lᵗ‖² / ‖h_lᵗ‖²  +  ‖outˢ − outᵗ‖² / ‖outᵗ‖²        (relative MSE, per batch)
    Adam, linear warm-up then cosine decay to 0 over `steps`, gradient norm clipped to CLIP;
    batches of ≤ STEP_TOKENS tokens drawn (seeded) from the calibration sentences that are not held out;
    token-id inputs are augmented: AUGMENT of each batch's inner tokens replaced by random calibration
    tokens, a fresh variant every step, labelled by the teacher on the fly (more distinct inputs for
    the same calibration data: without it, training every weight overfits ~6k MiniLM tokens within
    100 steps — train loss 0.30 → 0.08 while the held-out loss stalls at 0.25).

Every HOLD_OUT_EVERY-th calibration example is held out of the training: its loss, measured every
`eval_every` steps, picks the step whose weights are kept (early stop after PATIENCE evaluations without
a new best, and at least PATIENCE_SHARE of the schedule). A schedule whose held-out loss never goes below
the unhealed model's is run once more from the unhealed weights at RETRY_LR × the learning rate (unless
--heal-lr fixed it): at 50% active on MiniLM the default rate only made the model worse, a third of it
healed (E=8 k=4 cos 0.9337 -> 0.9380, E=16 k=8 0.9423 -> 0.9458 / NN 70.0 -> 74.3%). Both the teacher's
values and the student's run through the fx graphs themselves (an fx.Interpreter records the nodes), so
healing works on any graph moefy wrote; it trains the captured GraphModule's parameters in place (no
nn.Module is rebuilt).

What is trained (`params`):
- "experts": the MoE layers' w_in, b_in, w_out, b_out (the rest of the model stays the dense one's).
- "all" (default): also attention, embeddings and norms: the layers around the MoE absorb what the
  sparse FFNs lose. Measured on MiniLM (samples/results/moefy_curve.md): clearly better held-out quality
  for the same steps.
Routers are not trained by default: a `topk_unit` router weighs every chosen expert 1, so its logits get
no gradient from the output (moe's backward returns zeros for them); they stay the least-squares fit to
the oracle drop error made by moefy. `routers=True` trains them through straight-through gates
(`gated_moe`: forward unchanged, gradient as if each chosen expert were weighted by its softmax
probability); measured on MiniLM E=8 k=2 it did not help (samples/results/moefy_heal.md, session 2).
Deterministic for a seed (the batch order and nothing else is random) at a fixed thread count.
"""
from __future__ import annotations

import copy
import logging
import math
import time

import torch
from torch import fx

from moecc import calibration as calib
from moecc.errors import MoeccError
from moecc.ops import parse_spec
from moecc.pipeline import MOE_OP, SPEC_ARG, moe_nodes

from .ffn_match import find_ffns

log = logging.getLogger("moecc.passes.moefy_heal")

FACTS_KEY = "moecc.heal"
PARAMS = ("all", "experts")
HOLD_OUT_EVERY = 8             # 1 calibration example in 8 is held out to choose the step
STEP_TOKENS = 1024             # tokens per training batch (≈ sentences × their length)
LR = {"all": 1e-4, "experts": 3e-4}
WARMUP = 0.05                  # share of the steps with a linear warm-up
CLIP = 1.0
PATIENCE = 4                   # evaluations without a new best held-out loss before stopping ...
PATIENCE_SHARE = 0.25          # ... and at least this share of the schedule (long schedules: the held-out loss
                               # wanders while the learning rate is high; E=16 k=4 at 1000 steps stopped at 150)
MAX_STEPS = 100_000
RETRY_LR = 1 / 3               # a schedule that never beat the unhealed model is run again at lr × this
AUGMENT = 0.15                 # share of a training batch's inner tokens replaced by random calibration tokens
CURVE_POINTS = 50              # at most this many (step, train loss, held-out loss) rows in the facts


def check_steps(steps) -> int:
    """--heal STEPS: a whole number, 0 (no healing) .. MAX_STEPS."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise MoeccError(f"--heal {steps!r}: give a whole number of training steps from 0 (no healing) "
                         f"to {MAX_STEPS}, e.g. --heal 300")
    return steps


def patience_for(steps: int, eval_every: int) -> int:
    """Evaluations without a new best held-out loss before healing stops: PATIENCE, or PATIENCE_SHARE
    of the schedule where that is more (measured on MiniLM E=16 k=4, 1000 steps: 4 evaluations of 25
    steps stopped the run at step 150 with cos 0.884; with 10 it ran to 1000, best step 925, cos 0.904)."""
    return max(PATIENCE, math.ceil(PATIENCE_SHARE * steps / eval_every))


def check_params(params: str) -> str:
    if params not in PARAMS:
        raise MoeccError(f"--heal-params {params!r}: choose one of {', '.join(PARAMS)}")
    return params


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the values of `wanted` nodes (with autograd if it is on).
    gate=True: `topk_unit` MoE nodes run with straight-through gates (`gated_moe`), so routers learn."""

    def __init__(self, gm: fx.GraphModule, wanted: list[fx.Node], gate: bool = False):
        super().__init__(gm)
        self.wanted, self.values, self.gate = set(wanted), {}, gate

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.wanted:
            self.values[n] = value
        return value

    def call_function(self, target, args, kwargs):
        if self.gate and target is MOE_OP and torch.is_grad_enabled():
            spec = parse_spec(args[SPEC_ARG])
            if spec.router.kind == "topk_unit" and args[7] is None and spec.router.capacity_factor is None \
                    and not spec.router.capacity:
                return gated_moe(*args[:6], spec)
        return super().call_function(target, args, kwargs)


def gated_moe(x, logits, w_in, w_out, b_in, b_out, spec) -> torch.Tensor:
    """A `topk_unit` moe with gates g = 1 + p − sg(p) on the chosen experts, p = softmax(logits):
    the same output as the op (g = 1 exactly), and a gradient for the logits: how much the loss
    would change if a chosen expert's output were scaled up, through p to every expert's logit."""
    xt = x.reshape(-1, x.shape[-1])                                         # [T, H]
    lt = logits.reshape(xt.shape[0], -1).float()                           # [T, E]
    ids = torch.topk(lt, spec.router.top_k, dim=-1).indices                # [T, k]
    p = lt.softmax(-1).gather(1, ids)                                       # [T, k]
    weights = (1 + (p - p.detach())).to(x.dtype)                          # exactly 1 forward
    y = torch.ops.moecc.experts(xt, ids, weights, w_in, w_out, b_in, b_out, spec.to_json(), "reference")
    return y.reshape(x.shape)


def _outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return list(out.all_input_nodes)


def _split(cal: calib.Calibration) -> tuple[list[tuple], list[tuple]]:
    """Calibration batches -> (training batches, held-out batches) of ≤ STEP_TOKENS tokens each, by example."""
    if cal.examples < HOLD_OUT_EVERY:
        raise MoeccError(f"heal: calibration {cal.source} has {cal.examples} examples; healing holds out 1 "
                         f"in {HOLD_OUT_EVERY} to choose its steps and needs at least {HOLD_OUT_EVERY}")
    train, held = [], []
    seen = 0
    for batch in cal.batches:
        first = batch[0]
        n = first.shape[0]
        per_row = max(1, first[0].numel() if not first.is_floating_point() else first[0].numel() // first.shape[-1])
        index = torch.arange(n)
        out = (index + seen) % HOLD_OUT_EVERY == 0
        seen += n
        rows = max(1, STEP_TOKENS // per_row)
        for mask, dest in ((~out, train), (out, held)):
            idx = index[mask]
            for i in range(0, idx.numel(), rows):
                take = idx[i:i + rows]
                dest.append(tuple(t[take] if isinstance(t, torch.Tensor) and t.shape[:1] == (n,) else t
                                  for t in batch))
    return train, held


def _token_pool(batches: list[tuple]) -> torch.Tensor | None:
    """Token ids of the inner positions (not the first or last, e.g. [CLS]/[SEP]) of integer inputs."""
    ids = [b[0][:, 1:-1].reshape(-1) for b in batches
           if not b[0].is_floating_point() and b[0].dim() == 2 and b[0].shape[1] > 2]
    return torch.cat(ids) if ids else None


def _augment(batch: tuple, pool: torch.Tensor | None, share: float, g: torch.Generator) -> tuple:
    """A fresh variant of a batch of token ids: `share` of its inner tokens replaced by ids drawn from
    the calibration tokens (the teacher labels any input; more distinct inputs, less overfitting)."""
    ids = batch[0]
    if pool is None or share <= 0 or ids.is_floating_point() or ids.dim() != 2 or ids.shape[1] <= 2:
        return batch
    hit = torch.rand(ids.shape, generator=g) < share                         # [B, S]
    hit[:, 0] = hit[:, -1] = False
    new = pool[torch.randint(0, pool.numel(), ids.shape, generator=g)]
    return (torch.where(hit, new, ids), *batch[1:])


def _pairs(gm: fx.GraphModule, names: list[str], dense: bool) -> list[tuple[fx.Node, fx.Node]]:
    """(x, FFN output) node per layer name: the dense FFN's in the teacher, the MoE node's in the student."""
    if dense:
        by = {m.name: (m.x, m.output) for m in find_ffns(gm)[0]}
    else:
        by = {spec.name: (node.args[0], node) for node, spec in moe_nodes(gm)}
    missing = [n for n in names if n not in by]
    if missing:
        raise MoeccError(f"heal: layer {missing[0]} is not in the {'dense' if dense else 'MoEfied'} graph")
    return [by[n] for n in names]


def _values(gm, pairs, outs, batch, gate: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rec = _Recorder(gm, [n for p in pairs for n in p] + outs, gate)
    rec.run(*batch)
    hidden = [rec.values[x] + rec.values[y] for x, y in pairs]
    return hidden, [rec.values[o].float() for o in outs]


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b).pow(2).sum() / b.pow(2).sum().clamp(min=1e-12)


def _loss(student, target) -> torch.Tensor:
    (hs, os_), (ht, ot) = student, target
    layers = sum(_rel(a, b) for a, b in zip(hs, ht)) / max(len(hs), 1)
    return layers + sum(_rel(a, b) for a, b in zip(os_, ot))


def _cosine(student_out, target_out) -> float:
    a, b = student_out[0].reshape(student_out[0].shape[0], -1), target_out[0].reshape(target_out[0].shape[0], -1)
    return torch.nn.functional.cosine_similarity(a.float(), b, dim=1).sum().item()


def trainable(gm: fx.GraphModule, params: str, routers: bool = False) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters healing trains: never the routers (see the module docstring), nor embedding
    tables (a calibration set sees few of their rows; their dense gradient alone costs more than a step)."""
    moe = {n.target for node, _ in moe_nodes(gm) for n in node.args[2:6] if isinstance(n, fx.Node)}
    frozen = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users and all(
        u.op == "call_function" and u.target is torch.ops.aten.embedding.default for u in n.users)}
    chosen = []
    for name, p in gm.named_parameters():
        router = name.rsplit(".", 1)[-1].startswith("router")
        if not p.is_floating_point() or name in frozen or (router and not routers):
            continue
        if params == "all" or name in moe or router:
            chosen.append((name, p))
    return chosen


def heal(student: fx.GraphModule, teacher: fx.GraphModule, cal: calib.Calibration, steps: int,
         seed: int = 0, params: str = "all", lr: float | None = None, eval_every: int | None = None,
         augment: float = AUGMENT, progress: bool = True, routers: bool = False) -> dict:
    """Train `student` (in place) towards `teacher` on `cal`; returns the facts (see module docstring)."""
    check_steps(steps)
    check_params(params)
    names = [spec.name for _, spec in moe_nodes(student)]
    if all(spec.top_k >= spec.num_experts for _, spec in moe_nodes(student)):
        log.info("heal: every expert is on in every layer (k = E): the MoE is the dense FFN; nothing to heal")
        steps = 0
    t_pairs, s_pairs = _pairs(teacher, names, True), _pairs(student, names, False)
    t_outs, s_outs = _outputs(teacher), _outputs(student)
    train, held = _split(cal)
    start = time.perf_counter()
    with torch.no_grad():
        targets = {id(b): _values(teacher, t_pairs, t_outs, b) for b in held + ([] if augment else train)}
    pool = _token_pool(train)
    lr_given = lr is not None
    lr = LR[params] if lr is None else lr
    eval_every = eval_every or max(1, min(25, steps // 10))
    patience = patience_for(steps, eval_every)
    chosen = trainable(student, params, routers)
    grad_was = {name: p.requires_grad for name, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in chosen:
        p.requires_grad_(True)
    @torch.no_grad()
    def held_out() -> tuple[float, float]:
        loss = cos = n = 0.0
        for b in held:
            s = _values(student, s_pairs, s_outs, b)
            loss += _loss(s, targets[id(b)]).item() * b[0].shape[0]
            cos += _cosine(s[1], targets[id(b)][1])
            n += b[0].shape[0]
        return loss / n, cos / n

    before = held_out()
    start_values = {k: p.detach().clone() for k, p in chosen}
    curve, done = [(0, None, round(before[0], 6))], 0
    bar = None
    if progress and steps:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="heal", unit="step", leave=False, disable=None)

    def attempt(rate: float, offset: int) -> tuple[tuple, int]:
        """One schedule of `steps` at learning rate `rate` from the start weights -> (its best
        (loss, step, weights) or the start's, steps run); curve rows numbered from `offset`."""
        opt = torch.optim.Adam([p for _, p in chosen], lr=rate)
        warm = max(1, int(WARMUP * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (
            1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm))))))
        g = torch.Generator().manual_seed(seed)
        top, since_best, order, run_loss, ran = (before[0], 0, start_values), 0, [], [], 0
        with torch.enable_grad():
            for step in range(1, steps + 1):
                if not order:
                    order = torch.randperm(len(train), generator=g).tolist()
                b = train[order.pop()]
                if augment:
                    b = _augment(b, pool, augment, g)
                    with torch.no_grad():
                        target = _values(teacher, t_pairs, t_outs, b)
                else:
                    target = targets[id(b)]
                loss = _loss(_values(student, s_pairs, s_outs, b, routers), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in chosen], CLIP)
                opt.step()
                sched.step()
                run_loss.append(loss.item())
                ran = step
                if bar is not None:
                    bar.update(1)
                if step % eval_every == 0 or step == steps:
                    h = held_out()[0]
                    curve.append((offset + step, round(sum(run_loss) / len(run_loss), 6), round(h, 6)))
                    run_loss = []
                    if bar is not None:
                        bar.set_postfix(held_out=f"{h:.4f}")
                    if h < top[0]:
                        top, since_best = (h, step, {k: p.detach().clone() for k, p in chosen}), 0
                    else:
                        since_best += 1
                        if since_best >= patience:
                            log.info("heal: held-out loss has not improved for %d evaluations; stopped at "
                                     "step %d, keeping step %d", patience, step, top[1])
                            break
        return top, ran

    rates = [lr] if lr_given or not steps else [lr, lr * RETRY_LR]
    tried = []
    for rate in rates:
        if tried:                                # the first rate never beat the start: from it again
            log.info("heal: at lr %.3g the held-out loss never went below the unhealed model's; "
                     "trying lr %.3g", tried[-1], rate)
            with torch.no_grad():
                for k, p in chosen:
                    p.copy_(start_values[k])
            if bar is not None:
                bar.total += steps
                bar.refresh()
        best, ran = attempt(rate, done)
        done += ran
        tried.append(rate)
        if best[1] > 0:
            break
    lr = tried[-1]
    if bar is not None:
        bar.close()
    with torch.no_grad():
        values = dict(chosen)
        for k, v in best[2].items():
            values[k].copy_(v)
    for name, p in student.named_parameters():
        p.requires_grad_(grad_was[name])
    after = held_out()
    stride = max(1, math.ceil(len(curve) / CURVE_POINTS))
    return {"steps": steps, "steps_run": done, "best_step": best[1], "params": params, "lr": lr,
            "lr_tried": tried,
            "trained_parameters": int(sum(p.numel() for _, p in chosen)), "seed": seed, "augment": augment,
            "train_batches": len(train), "held_out_batches": len(held), "hold_out_every": HOLD_OUT_EVERY,
            "held_out_loss_before": round(before[0], 6), "held_out_loss_after": round(after[0], 6),
            "held_out_cosine_before": round(before[1], 6), "held_out_cosine_after": round(after[1], 6),
            "seconds": round(time.perf_counter() - start, 2),
            "curve": [list(c) for c in curve[::stride]] + ([list(curve[-1])] if (len(curve) - 1) % stride else []),
            "curve_columns": ["step", "train loss (mean since last)", "held-out loss"]}


def teacher_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """The dense graph as it is before moefy rewrites it (the healing teacher)."""
    t = copy.deepcopy(gm)
    for p in t.parameters():
        p.requires_grad_(False)
    return t
