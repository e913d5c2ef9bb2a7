"""Train an upcycled MoE GPT on CPU and watch its experts: loss, utilization, balancing on vs off.

    tiny GPT (dense, byte-level) → train D steps → capture → upcycle → route (router, capacity factor)
      → moecc.nn.MoE layers → train S steps per run, same seed and batches:
         softmax | softmax + Switch aux loss | sigmoid | sigmoid + bias balancing | (dense, continued)

Prints per run the loss (start → end, and validation), the expert utilization per layer over the last
quarter of the steps (load per expert, max/mean load, entropy, dropped fraction) and writes a PNG plot
and a markdown report. Corpus: moecc/data/corpus.txt (plain English prose written for the project).

    python samples/train_moe.py                      # the real run (a few minutes on 2 cores)
    python samples/train_moe.py --steps 20 --dense-steps 10 --out /tmp/t   # a quick look
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_gpt  # noqa: E402

from moecc import balance  # noqa: E402
from moecc.api import transform  # noqa: E402
from moecc.frontend import capture  # noqa: E402
from moecc.monitor import Monitor  # noqa: E402
from moecc.nn import from_graph  # noqa: E402

RUNS = {   # name: (router options for the route pass, aux-loss weights, bias-update rate)
    "softmax": ({}, {}, 0.0),
    "softmax+switch": ({}, {"switch": 0.05, "z": 1e-3}, 0.0),
    "sigmoid": ({"router": "sigmoid-topk"}, {}, 0.0),
    "sigmoid+bias": ({"router": "sigmoid-topk"}, {}, 0.01),
}


def corpus() -> torch.Tensor:
    text = (resources.files("moecc") / "data" / "corpus.txt").read_bytes()
    return torch.tensor(list(text), dtype=torch.long)                     # bytes: vocab 256


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        chunk = torch.stack([data[s:s + seq + 1] for s in start.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def lm_loss(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model, data, a) -> float:
    model.eval()
    losses = [lm_loss(model, x, y).item() for x, y in batches(data, 8, a.batch, a.seq, seed=999)]
    model.train()
    return sum(losses) / len(losses)


def train_dense(a, train) -> torch.nn.Module:
    model, _ = tiny_gpt.build(seed=a.seed, dim=a.dim, layers=a.layers, heads=4, ffn=a.ffn, max_len=a.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    model.train()
    for i, (x, y) in enumerate(batches(train, a.dense_steps, a.batch, a.seq, a.seed)):
        loss = lm_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 0 or i == a.dense_steps - 1:
            print(f"  dense step {i:4d}  loss {loss.item():.3f}")
    return model.eval()


def upcycled(dense: torch.nn.Module, route: dict, a) -> torch.nn.Module:
    """capture → upcycle (+ route) → the graph's MoE layers as trainable moecc.nn.MoE in a copy."""
    example = (torch.zeros(2, a.seq, dtype=torch.long),)
    c = capture(dense, example)
    passes = [("upcycle", {"num_experts": a.experts, "top_k": a.top_k, "router_init": "random", "seed": a.seed})]
    transform(c, passes + [("route", route)])
    model = copy.deepcopy(dense)
    for name, moe in from_graph(c.gm, expert_dropout=a.expert_dropout).items():
        model.set_submodule(name, moe)
    return model.train()


def train_dense_more(dense, train, val, a) -> dict:
    """The baseline: the dense model trained for the same steps on the same batches."""
    model, t0 = copy.deepcopy(dense).train(), time.perf_counter()
    opt, losses = torch.optim.AdamW(model.parameters(), lr=a.lr), []
    for x, y in batches(train, a.steps, a.batch, a.seq, a.seed + 1):
        loss = lm_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"name": "dense", "losses": losses, "val": evaluate(model, val, a), "monitor": None,
            "summary": {}, "window": max(1, a.steps // 4), "seconds": time.perf_counter() - t0}


def train_moe(name: str, dense, train, val, a) -> dict:
    if name == "dense":
        return train_dense_more(dense, train, val, a)
    route, aux_weights, bias_rate = RUNS[name]
    route = dict(route, capacity_factor=a.capacity_factor or "dropless")
    torch.manual_seed(a.seed)
    model = upcycled(dense, route, a)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    mon, losses, t0 = Monitor(model), [], time.perf_counter()
    for step, (x, y) in enumerate(batches(train, a.steps, a.batch, a.seq, a.seed + 1)):
        with mon.step(step):
            loss = lm_loss(model, x, y)
        total = loss + balance.aux_loss(model, aux_weights) if aux_weights else loss
        opt.zero_grad()
        total.backward()
        opt.step()
        if bias_rate:
            balance.update_bias(model, bias_rate)
        losses.append(loss.item())
    window = max(1, a.steps // 4)
    return {"name": name, "losses": losses, "val": evaluate(model, val, a), "monitor": mon,
            "summary": mon.summary(window), "window": window, "seconds": time.perf_counter() - t0}


def smooth(xs: list[float], n: int = 10) -> tuple[float, float]:
    n = max(1, min(n, len(xs) // 2 or 1))
    return sum(xs[:n]) / n, sum(xs[-n:]) / n


def report(results: list[dict], dense_val: float, out: Path, a) -> str:
    cf = f"capacity factor {a.capacity_factor}" if a.capacity_factor else "dropless"
    lines = [f"# train_moe: upcycled tiny GPT, E={a.experts}, top-{a.top_k}, {cf}, {a.steps} steps per run",
             "", f"dense model before upcycling: validation loss {dense_val:.3f}", "",
             "| run | train loss start → end | validation | layer | max/mean load | entropy | dropped |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        first, last = smooth(r["losses"])
        if not r["summary"]:
            lines.append(f"| {r['name']} | {first:.3f} → {last:.3f} | {r['val']:.3f} | – | – | – | – |")
        for layer, s in r["summary"].items():
            lines.append(f"| {r['name']} | {first:.3f} → {last:.3f} | {r['val']:.3f} | {layer} | "
                         f"{s['max_over_mean']:.2f} | {s['entropy']:.3f} | {100 * s['dropped']:.1f}% |")
    lines += ["", f"Utilization over the last {results[0]['window']} steps (training batches): max/mean = 1 "
              "and entropy = 1 are perfectly even; dropped = (token, slot) assignments over capacity.", ""]
    for r in (r for r in results if r["monitor"] is not None):
        png = out / f"utilization_{r['name'].replace('+', '_')}.png"
        r["monitor"].plot(png, title=f"{r['name']}: expert utilization per layer")
        lines += [f"## {r['name']} ({r['seconds']:.0f} s)", "", r["monitor"].table(r["window"]), "",
                  f"![{r['name']}]({png.name})", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def compare(results: list[dict]) -> list[str]:
    by = {r["name"]: r for r in results}
    lines = []
    for off, on in (("softmax", "softmax+switch"), ("sigmoid", "sigmoid+bias")):
        if off in by and on in by:
            for layer in by[off]["summary"]:
                a_, b_ = by[off]["summary"][layer], by[on]["summary"][layer]
                lines.append(f"  layer {layer}: {off:>8} max/mean {a_['max_over_mean']:.2f} entropy "
                             f"{a_['entropy']:.3f} dropped {100 * a_['dropped']:4.1f}%  |  {on:>15} max/mean "
                             f"{b_['max_over_mean']:.2f} entropy {b_['entropy']:.3f} dropped "
                             f"{100 * b_['dropped']:4.1f}%")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="MoE training steps per run")
    p.add_argument("--dense-steps", type=int, default=300, help="dense steps before upcycling")
    p.add_argument("--runs", default=",".join([*RUNS, "dense"]), help=f"comma list of {', '.join(RUNS)}, dense")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25, help="0 = dropless")
    p.add_argument("--expert-dropout", type=float, default=0.0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("out/train_moe"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS and r != "dense"]
    if unknown:
        p.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}, dense")
    a.out.mkdir(parents=True, exist_ok=True)
    data = corpus()
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    print(f"corpus: {len(data)} bytes; dense pretraining {a.dense_steps} steps")
    dense = train_dense(a, train)
    dense_val = evaluate(dense, val, a)
    results = []
    for name in runs:
        r = train_moe(name, dense, train, val, a)
        first, last = smooth(r["losses"])
        print(f"{name:>15}: loss {first:.3f} → {last:.3f}, validation {r['val']:.3f} "
              f"(dense {dense_val:.3f}), {r['seconds']:.0f} s")
        results.append(r)
    print(report(results, dense_val, a.out, a))
    print("balancing off vs on (same seed, same batches):")
    print("\n".join(compare(results)))
    print(f"wrote {a.out / 'report.md'} and utilization_*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
