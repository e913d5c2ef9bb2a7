"""Fit, from calibration activations, a router that predicts how much each expert matters per token.

    x [T, H] (FFN input), target [T, E] (each expert's drop error, see `drop_error`)
      linear: ridge least squares          logits = x·Wᵀ + b                    (Linear H → E)
      mlp:    small MLP, Adam, a few hundred steps
                                           logits = relu(x·W1ᵀ + b1)·W2ᵀ + b2   (H → M → E)

Both are scored the same way on tokens held out of the fit (`recall`): the share of the true top-k
experts' target mass that the predicted top-k catches, averaged over k = 1..E-1.
"""
from __future__ import annotations

import torch

from moecc.errors import MoeccError

ROUTERS = ("linear", "mlp")
RIDGE = 1e-3            # relative to the mean diagonal of xᵀx
MLP_HIDDEN = 128
MLP_STEPS = 300
MLP_BATCH = 1024
MLP_LR = 3e-3


def fit_linear(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Ridge regression y ≈ x·Wᵀ + b -> {"weight": [E, H], "bias": [E]}."""
    xd, yd = x.double(), y.double()
    mx, my = xd.mean(0), yd.mean(0)
    xc, yc = xd - mx, yd - my                                               # [T, H], [T, E]
    gram = xc.t() @ xc                                                      # [H, H]
    lam = RIDGE * gram.diagonal().mean().clamp(min=1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.t() @ yc)  # [H, E]
    return {"weight": w.t().to(x.dtype).contiguous(), "bias": (my - mx @ w).to(x.dtype)}


def fit_mlp(x: torch.Tensor, y: torch.Tensor, seed: int = 0, hidden: int = MLP_HIDDEN,
            steps: int = MLP_STEPS) -> dict:
    """A 2-layer MLP trained briefly on MSE -> {"w1": [M, H], "b1": [M], "w2": [E, M], "b2": [E]}."""
    g = torch.Generator().manual_seed(seed)
    H, E = x.shape[1], y.shape[1]
    mx, sx = x.mean(0), x.std(0).clamp(min=1e-6)                            # standardize inside the fit
    l1, l2 = torch.nn.Linear(H, hidden), torch.nn.Linear(hidden, E)
    with torch.no_grad():
        for p in (*l1.parameters(), *l2.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5 if p.dim() == 2
                    else torch.zeros_like(p))
        l2.bias.copy_(y.mean(0))
    opt = torch.optim.Adam([*l1.parameters(), *l2.parameters()], lr=MLP_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xs = (x - mx) / sx
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(MLP_BATCH, x.shape[0]),), generator=g)
            loss = torch.nn.functional.mse_loss(l2(torch.relu(l1(xs[idx]))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():   # fold the standardization into the first layer
        w1 = l1.weight / sx
        b1 = l1.bias - w1 @ mx
    return {"w1": w1.detach().to(x.dtype), "b1": b1.detach().to(x.dtype),
            "w2": l2.weight.detach().to(x.dtype), "b2": l2.bias.detach().to(x.dtype)}


def fit(kind: str, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> dict:
    if kind == "linear":
        return fit_linear(x, y)
    if kind == "mlp":
        return fit_mlp(x, y, seed)
    raise MoeccError(f"moefy --router {kind!r}: choose one of {', '.join(ROUTERS)}")


def predict(router: dict, x: torch.Tensor) -> torch.Tensor:
    """x [T, H] -> logits [T, E]."""
    if "weight" in router:
        return torch.nn.functional.linear(x, router["weight"], router["bias"])
    h = torch.relu(torch.nn.functional.linear(x, router["w1"], router["b1"]))
    return torch.nn.functional.linear(h, router["w2"], router["b2"])


def recall(pred: torch.Tensor, target: torch.Tensor, ks=None) -> float:
    """Mean over k of (target mass in the predicted top-k) / (target mass in the true top-k)."""
    E = target.shape[1]
    ks = ks or range(1, E)
    order = torch.argsort(pred, dim=1, descending=True)
    best = torch.sort(target, dim=1, descending=True).values.cumsum(1)      # [T, E]
    got = target.gather(1, order).cumsum(1)
    scores = [(got[:, k - 1].sum() / best[:, k - 1].sum().clamp(min=1e-12)).item() for k in ks]
    return sum(scores) / max(len(scores), 1)


def random_recall(target: torch.Tensor, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    return recall(torch.rand(target.shape, generator=g), target)
