"""Expert-utilization monitor any training (or inference) loop can attach.

    mon = Monitor(model)                 # optional model: names unnamed moecc.nn.MoE layers by path
    with mon.step(i):                    # every moecc::moe call inside is recorded (forward only)
        loss = model(x) ...
    mon.table() -> markdown; mon.plot("util.png"); mon.summary(window=50) -> {layer: stats}

Per layer and step: load per expert (share of the kept (token, slot) assignments), normalized
entropy of that load (1 = perfectly even, 0 = one expert takes all), max/mean load (1 = even, E =
collapsed), dropped fraction (token choice: assignments dropped by capacity; expert choice: tokens
no expert took). Recording uses `moecc.ops.record_routing()`, so it sees eager `moecc.nn.MoE`
layers and captured graphs alike, whenever the op runs its reference kernel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from .errors import MoeccError
from .ops import record_routing
from .routing import capacity_factor_for, dropped_fraction, expert_load


@dataclass
class StepLoad:
    step: int
    layer: str
    load: torch.Tensor        # [E] kept assignments per expert
    dropped: float            # fraction, as dropped_fraction
    tokens: int
    demand: torch.Tensor | None = None   # [E] choices before capacity (moecc.nn.MoE in training)


def evenness(load: torch.Tensor) -> dict[str, float]:
    """[E] counts -> {max_over_mean, entropy (normalized to [0, 1]), cv}."""
    load = load.double()
    total = float(load.sum())
    E = load.numel()
    if total <= 0:
        return {"max_over_mean": float("nan"), "entropy": float("nan"), "cv": float("nan")}
    p = load / total
    ent = float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(E)
    return {"max_over_mean": float(p.max() * E), "entropy": ent, "cv": float(p.std(unbiased=False) * E)}


class Monitor:
    def __init__(self, model: torch.nn.Module | None = None):
        self.modules = {}
        if model is not None:
            from .nn import moe_modules
            self.modules = moe_modules(model)   # also names unnamed layers by their module path
        self.history: list[StepLoad] = []

    @contextlib.contextmanager
    def step(self, step: int | None = None):
        step = len(self.steps()) if step is None else step
        before = {name: id(m.aux) for name, m in self.modules.items()}
        with record_routing() as records:
            yield records
        merged: dict[str, StepLoad] = {}
        for i, rec in enumerate(records):
            spec, ids = rec["spec"], rec["expert_ids"]
            name = rec["layer"] or f"moe{i}"
            load, drop = expert_load(ids, spec.num_experts), dropped_fraction(ids, spec)
            if name in merged:       # the same layer twice in a step (gradient accumulation): pool
                m = merged[name]
                n = m.tokens + ids.shape[0]
                m.dropped = (m.dropped * m.tokens + drop * ids.shape[0]) / n
                m.load, m.tokens = m.load + load, n
            else:
                merged[name] = StepLoad(step, name, load, drop, ids.shape[0])
        for m in self.modules.values():     # a training forward ran: its pre-capacity choices
            if id(m.aux) != before.get(m.spec.name) and m.aux and m.spec.name in merged:
                merged[m.spec.name].demand = expert_load(m.aux["ids"], m.spec.num_experts)
        self.history.extend(merged.values())

    def steps(self) -> list[int]:
        return sorted({h.step for h in self.history})

    def layers(self) -> list[str]:
        return list(dict.fromkeys(h.layer for h in self.history))

    def series(self, layer: str) -> list[StepLoad]:
        return [h for h in self.history if h.layer == layer]

    def summary(self, window: int | None = None) -> dict[str, dict]:
        """Per layer over the last `window` recorded steps (all if None): load shares + evenness."""
        if not self.history:
            raise MoeccError("the monitor has recorded nothing: run the model inside `with monitor.step():`")
        out = {}
        for layer in self.layers():
            hs = self.series(layer)[-window:] if window else self.series(layer)
            load = torch.stack([h.load for h in hs]).sum(0)
            demand = torch.stack([h.load if h.demand is None else h.demand for h in hs]).sum(0)
            tokens = sum(h.tokens for h in hs)
            out[layer] = {"load": (load / load.sum().clamp(min=1)).tolist(), **evenness(load),
                          "demand": (demand / demand.sum().clamp(min=1)).tolist(),
                          "dropped": sum(h.dropped * h.tokens for h in hs) / max(tokens, 1),
                          "steps": len(hs)}
        return out

    def table(self, window: int | None = None) -> str:
        """Markdown: one row per layer, load per expert in %, max/mean, entropy, dropped."""
        rows = ["| layer | load per expert (%) | max/mean | entropy | dropped |", "|---|---|---|---|---|"]
        for layer, s in self.summary(window).items():
            shares = " ".join(f"{100 * v:.0f}" for v in s["load"])
            rows.append(f"| {layer} | {shares} | {s['max_over_mean']:.2f} | {s['entropy']:.3f} | "
                        f"{100 * s['dropped']:.1f}% |")
        return "\n".join(rows)

    def plot(self, path, title: str = "expert utilization") -> None:
        """PNG: per layer, load share per expert over steps (stacked), entropy and dropped fraction."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        layers = self.layers()
        if not layers:
            raise MoeccError("the monitor has recorded nothing to plot")
        fig, axes = plt.subplots(len(layers), 2, figsize=(11, 2.6 * len(layers)), squeeze=False)
        for row, layer in zip(axes, layers):
            hs = self.series(layer)
            steps = [h.step for h in hs]
            shares = torch.stack([h.load / h.load.sum().clamp(min=1) for h in hs]).T.numpy()   # [E, n]
            row[0].stackplot(steps, shares, linewidth=0)
            row[0].set(ylim=(0, 1), ylabel=f"{layer}\nload share", xlabel="step")
            row[1].plot(steps, [evenness(h.load)["entropy"] for h in hs], label="entropy (1 = even)")
            row[1].plot(steps, [h.dropped for h in hs], label="dropped fraction")
            row[1].set(ylim=(0, 1.05), xlabel="step")
            row[1].legend(loc="center right", fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def dynamic_capacity(model: torch.nn.Module, monitor: Monitor, window: int = 20,
                     margin: float = 1.0) -> dict[str, float]:
    """Set each moecc.nn.MoE layer's capacity factor so that capacity = its busiest expert's demand
    (choices before capacity; the kept load where the monitor saw no training forward) over the last
    `window` steps (× margin). Call between steps; the op itself stays deterministic."""
    from .nn import moe_modules
    summary = monitor.summary(window)
    factors = {}
    for name, m in moe_modules(model).items():
        if m.spec.name not in summary or m.spec.router.kind == "expert_choice":
            continue
        cf = capacity_factor_for(max(summary[m.spec.name]["demand"]), m.spec, margin)
        m.spec = m.spec.replace(router=_with_capacity(m.spec.router, cf))
        factors[m.spec.name] = cf
    return factors


def _with_capacity(router, cf: float):
    return dataclasses.replace(router, capacity_factor=cf)
