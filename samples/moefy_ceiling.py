"""How good can MoEfication of all-MiniLM-L6-v2 get? Oracle ceilings at a given fraction of FFN neurons.

An oracle that sees every token's true activations and keeps, per token, the individually best
neurons (no expert grouping, no router error) bounds what any partition + router can do at that
fraction. Four oracles, each applied to all six FFNs at once; held-out sentence embeddings against
the dense model's (the same measures as samples/moefy_curve.py):

    zero     dropped neurons contribute 0                  keep: top |a_i|·‖w_out_i‖
    mean     dropped neurons contribute their mean         keep: top |a_i − mean_i|·‖w_out_i‖
    linear   dropped neurons contribute α_i·z_i + β_i      keep: top |a_i − α_i z_i − β_i|·‖w_out_i‖
             (a per-neuron least-squares line through GELU; costs a dense H×H map per token)
    refit    moefy's least-squares output refit (moefy_refit) given the oracle's choices, each neuron
             its own expert: the best the refit can do with perfect neuron-level routing

and, for scale, how fragile nearest-neighbour agreement is on these sentences: the share whose
runner-up is within 0.01 cosine of the nearest, and the agreement left by random isotropic noise
that brings the mean cosine to 0.999 / 0.995 / 0.99.

    python samples/moefy_ceiling.py --out out/moefy_ceiling [--fractions 0.125,0.25,0.5] [--quick]
    → OUT/ceiling.json, OUT/ceiling.md

Takes about 9 minutes on a 2-core CPU (4 oracles x 3 fractions, each over the held-out corpus);
--quick: one fraction (0.25), about a third of that.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402
from moefy_curve import quality  # noqa: E402

from moecc import calibration as calib  # noqa: E402
from moecc.passes import moefy_refit  # noqa: E402

ORACLES = ("zero", "mean", "linear", "refit")


class Readout(nn.Module):
    """Stands in for BertOutput.dense: features [.., D] @ weight [D, H] + bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, z):
        return z @ self.weight + self.bias


class Oracle(nn.Module):
    """Stands in for BertIntermediate: a [.., F] → the kept activations (and, for refit, the mask)."""

    def __init__(self, dense: nn.Linear, kind: str, frac: float, stats: dict, wn: torch.Tensor):
        super().__init__()
        self.dense, self.kind, self.frac, self.stats, self.wn = dense, kind, frac, stats, wn

    def forward(self, h):
        z = self.dense(h)
        a = F.gelu(z)
        base = {"zero": torch.zeros_like(a), "mean": self.stats["mean"].expand_as(a),
                "linear": self.stats["alpha"] * z + self.stats["beta"], "refit": torch.zeros_like(a)}[self.kind]
        keep = keep_mask(a - base, self.wn, self.frac)
        if self.kind == "refit":
            return torch.cat([keep * a, keep], -1)
        return base + keep * (a - base)


def keep_mask(r: torch.Tensor, wn: torch.Tensor, frac: float) -> torch.Tensor:
    k = max(1, int(round(frac * r.shape[-1])))
    return torch.zeros_like(r).scatter_(-1, (r.abs() * wn).topk(k, dim=-1).indices, 1.0)


def layer_inputs(model, batches) -> list[torch.Tensor]:
    """Every FFN's input [T, H] on the real (unpadded) calibration tokens of the dense model."""
    layers, xs, masks = model.bert.encoder.layer, [[] for _ in model.bert.encoder.layer], []
    hooks = [l.intermediate.register_forward_hook(lambda m, i, o, j=j: xs[j].append(i[0].flatten(0, 1)))
             for j, l in enumerate(layers)]
    with torch.no_grad():
        for ids, mask in batches:
            model(ids, mask)
            masks.append(mask.flatten().bool())
    for h in hooks:
        h.remove()
    keep = torch.cat(masks)
    return [torch.cat(x)[keep] for x in xs]


def install(model, kind: str, frac: float, xs: list[torch.Tensor]) -> None:
    for layer, x in zip(model.bert.encoder.layer, xs):
        dense, out = layer.intermediate.dense, layer.output.dense
        w1, b1, w2, b2 = dense.weight.detach(), dense.bias.detach(), out.weight.detach(), out.bias.detach()
        z = F.linear(x, w1, b1)
        a = F.gelu(z)
        zc, ac = z - z.mean(0), a - a.mean(0)
        alpha = (zc * ac).mean(0) / zc.pow(2).mean(0).clamp(min=1e-12)
        stats = {"mean": a.mean(0), "alpha": alpha, "beta": a.mean(0) - alpha * z.mean(0)}
        wn = w2.norm(dim=0)
        layer.intermediate = Oracle(dense, kind, frac, stats, wn)
        if kind == "refit":
            keep = keep_mask(a, wn, frac)
            val = torch.arange(len(x)) % 10 == 0
            w_a, d, _ = moefy_refit.refit(a, keep, torch.arange(a.shape[1]), w2, b2, ~val, val)
            layer.output.dense = Readout(torch.cat([w_a, d]), torch.zeros_like(b2))
        else:
            layer.output.dense = Readout(w2.t(), b2)


def run(fractions: list[float], oracles=ORACLES) -> dict:
    cal_lines, held = calib.split_corpus()
    held_b = calib.load(held, minilm.tokenize).batches
    cal_b = calib.load(cal_lines, minilm.tokenize).batches
    with torch.no_grad():
        model = minilm.SentenceEmbedder(minilm.load_bert()).eval()
        dense = torch.cat([model(*b) for b in held_b])
        xs = layer_inputs(model, cal_b)
    rows = []
    for kind in oracles:
        for frac in fractions:
            m = minilm.SentenceEmbedder(minilm.load_bert()).eval()
            install(m, kind, frac, xs)
            with torch.no_grad():
                rows.append({"oracle": kind, "active_fraction": frac,
                             **quality(torch.cat([m(*b) for b in held_b]), dense)})
            print(rows[-1], flush=True)
    return {"model": "all-MiniLM-L6-v2", "calibration_tokens": len(xs[0]), "held_out_sentences": len(held),
            "rows": rows, "nn_fragility": fragility(dense)}


def fragility(dense: torch.Tensor) -> dict:
    sim = dense @ dense.t()
    sim.fill_diagonal_(-2)
    top = sim.topk(2, dim=1).values
    out = {"runner_up_within_0.01": round((top[:, 0] - top[:, 1] < 0.01).float().mean().item(), 4), "noise": []}
    g = torch.Generator().manual_seed(0)
    for eps in (0.045, 0.1, 0.141):           # mean cosine ≈ 0.999, 0.995, 0.99 at H = 384
        noisy = F.normalize(dense + eps * torch.randn(dense.shape, generator=g) / dense.shape[1] ** 0.5, dim=1)
        out["noise"].append(quality(noisy, dense))
    return out


def table(result: dict) -> str:
    fr = result["nn_fragility"]
    lines = ["| oracle | active FFN | cos mean | cos worst | NN agree |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['oracle']} | {r['active_fraction']:.1%} | {r['cos_mean']:.4f} | "
                     f"{r['cos_worst']:.4f} | {r['nn_agreement']:.1%} |")
    return (f"# MoEfication ceilings: {result['model']}\n\nPer-token oracle neuron selection in all six FFNs; "
            f"{result['calibration_tokens']} calibration tokens, {result['held_out_sentences']} held-out "
            "sentences.\n\n" + "\n".join(lines) + "\n\n"
            f"Nearest-neighbour fragility: {fr['runner_up_within_0.01']:.1%} of held-out sentences have a runner-up "
            "within 0.01 cosine of their nearest neighbour; random noise that leaves mean cosine "
            + ", ".join(f"{q['cos_mean']:.4f} keeps {q['nn_agreement']:.1%}" for q in fr["noise"]) + ".\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=None,
                   help="kept fractions (default 0.125,0.25,0.5; 0.25 with --quick)")
    p.add_argument("--quick", action="store_true", help="one fraction (0.25): about 3 minutes instead of 9")
    args = p.parse_args(argv)
    args.fractions = args.fractions or ([0.25] if args.quick else [0.125, 0.25, 0.5])
    runs = len(ORACLES) * len(args.fractions)
    print(f"moefy_ceiling: {runs} oracle runs over the held-out corpus; about {3 * runs / 4:.0f} min on a "
          f"2-core CPU{'' if args.quick else ' (--quick: one fraction, about 3 min)'}", file=sys.stderr, flush=True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args.fractions)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ceiling.json").write_text(json.dumps(result, indent=1))
    (args.out / "ceiling.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
