"""Start-up of the overlap schedule on the ranks of an expert-parallel model:

    plan = configure(gm, group, warmup, degree="auto" | 1..8, out=Path | None,
                     training=False, backward_degree="auto" | 1..8)

1. one warm-up forward (`warmup()`) records each EP experts layer's tokens per rank;
2. the cost model's constants are measured on the ranks (moecc.distributed.probe.measure, on the
   first EP layer's experts; every rank takes part, the slowest rank's values are kept);
3. passes/overlap.plan_layers picks each layer's degree (or takes `degree` for all) and
   passes/overlap.apply sets it on the modules; rank 0 writes schedule.json to `out`.
   training=True: the degree and the backward's degree (a divisor of it) are chosen together for
   the fastest predicted forward + backward; `backward_degree` forces the latter.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moecc.ops import parse_spec


def _ep_modules(gm) -> list:
    return [m for m in gm.modules() if hasattr(m, "placement") and hasattr(m, "w_in")]


def configure(gm, group, warmup, degree="auto", out: Path | None = None, training: bool = False,
              backward_degree="auto"):
    import torch.distributed as dist

    from moecc.passes.overlap import LayerShape, apply, plan_layers

    from .probe import measure

    mods = _ep_modules(gm)
    if not mods:
        return None
    tokens: dict[str, int] = {}
    def record(mod, args):                      # a pre-hook returning None leaves the inputs alone
        tokens.setdefault(mod.placement.name, args[0].shape[0])
    hooks = [m.register_forward_pre_hook(record) for m in mods]
    try:
        with torch.no_grad():
            warmup()
    finally:
        for h in hooks:
            h.remove()
    first = mods[0]
    spec = parse_spec(first.spec)
    with torch.no_grad():
        measured = measure(spec, first.w_in, first.w_out, first.placement, group,
                           max(tokens.get(first.placement.name, 1), 1))
    layers = []
    for m in mods:
        s = parse_spec(m.spec)
        layers.append(LayerShape(m.placement.name, max(tokens.get(m.placement.name, 1), 1), s.hidden, s.ffn,
                                 s.num_experts, s.top_k, s.gated, s.shared_ffn, m.w_in.element_size()))
    plan = plan_layers(layers, dist.get_world_size(group), measured,
                       None if degree == "auto" else int(degree), training=training,
                       backward_degree=None if backward_degree in ("auto", None) else int(backward_degree))
    apply(gm, plan)
    if out is not None and dist.get_rank(group) == 0:
        plan.write(out)
    return plan
