"""Output refit of a MoEfied FFN for one top-k: least squares on calibration tokens, with the router's
own choices.

    a [T, F] hidden activations, chosen [T, E] 0/1 (the router's top-k, shared experts always 1)
    features  Φ = [ a ⊙ chosen[:, expert of each neuron]  |  chosen ]           [T, F + E]
    target    Y = a·W_outᵀ + b_out                                              [T, H] (the dense FFN)
    weights   W = [ W_outᵀ (each neuron's output column)  ;  d (each expert's output bias) ]
    ridge     min ‖Φ·W − Y‖² + λ‖W_a − W_outᵀ‖²      (prior: the dense weights; biases unpenalized)

With k of E experts a token loses the dropped neurons' contribution. Part of it is predictable from
the neurons that did run (they are correlated) and from which experts were chosen: the refit moves
that prediction into the kept experts' output columns and biases. It is a calibration fit per layer
(seconds; no gradient steps), chosen among a few λ by error on tokens left out of the fit.
`refit=False` fits only the biases d with W_out fixed: the mean of the dropped experts' contribution
given the router's choice (the plain compensation). At k = E nothing is refit: the MoE is the dense FFN.
Cost: one [F + E]² Gram solve per layer and k (F + E ≤ MAX_FEATURES; wider FFNs are refit one expert
block at a time, Gauss–Seidel).
"""
from __future__ import annotations

import torch

LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)   # relative to the mean diagonal of the activation block
MAX_FEATURES = 6144                        # joint solve up to here; wider: blockwise sweeps
SWEEPS = 3
BLOCK_LAMBDA = LAMBDAS[2]                  # blockwise: one λ (no per-λ validation)


def chosen_mask(pred: torch.Tensor, shared: int, k: int) -> torch.Tensor:
    """Router logits of the routed experts [T, Er] -> chosen [T, shared + Er] (0/1) at top-k."""
    routed = torch.zeros_like(pred).scatter_(1, pred.topk(k - shared, dim=1).indices, 1.0)
    return torch.cat([torch.ones(pred.shape[0], shared, dtype=pred.dtype), routed], 1)


def expert_of(groups: list[torch.Tensor], F: int) -> torch.Tensor:
    """[F] expert index of every real neuron."""
    owner = torch.full((F,), -1, dtype=torch.long)
    for e, idx in enumerate(groups):
        owner[idx] = e
    return owner


def predict(a, chosen, owner, w_a, d) -> torch.Tensor:
    """The MoE's FFN output [T, H] with neuron output rows w_a [F, H] and expert biases d [E, H]."""
    return _output(a * chosen[:, owner], chosen, w_a, d)


def _output(kept: torch.Tensor, chosen: torch.Tensor, w_a, d) -> torch.Tensor:
    """predict() given kept = a ⊙ chosen[:, owner] [T, F] (the activations of the chosen experts)."""
    return kept @ w_a + chosen @ d


def rel_error(y_hat: torch.Tensor, y: torch.Tensor) -> float:
    return ((y_hat - y).norm(dim=1) / y.norm(dim=1).clamp(min=1e-12)).mean().item()


def _biases_only(kept, chosen, w_a, y, fit) -> torch.Tensor:
    """d [E, H] = least squares of the residual on the chosen-expert indicators."""
    r = (y - kept @ w_a)[fit].double()
    c = chosen[fit].double()
    g = c.t() @ c
    return torch.linalg.solve(g + 1e-9 * g.diagonal().mean() * torch.eye(len(g), dtype=g.dtype),
                              c.t() @ r).to(kept.dtype)


def refit(a, chosen, owner, w_out, b_out, fit, val, full: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """-> (w_a [F, H] neuron output rows, d [E, H] expert biases, facts) fitted on tokens `fit`,
    λ chosen on tokens `val`. a [T, F], chosen [T, E], w_out [H, F], b_out [H]."""
    y = a @ w_out.t() + b_out                                               # [T, H]
    w0 = w_out.t().contiguous()                                             # [F, H]
    kept = a * chosen[:, owner]                                             # [T, F]

    def val_error(w_a, d) -> float:
        return rel_error(_output(kept[val], chosen[val], w_a, d), y[val])

    before = _biases_only(kept, chosen, w0, y, fit)
    facts = {"val_error_bias_only": val_error(w0, before)}
    if not full:
        facts["val_error"] = facts["val_error_bias_only"]
        return w0, before, facts
    F_, E = a.shape[1], chosen.shape[1]
    if F_ + E > MAX_FEATURES:
        w, d = _blockwise(kept, chosen, owner, w0, before, y, fit)
        facts.update(val_error=val_error(w, d), ridge=BLOCK_LAMBDA)
        return w, d, facts
    phi = torch.cat([kept, chosen], 1)[fit].double()                        # [N, F + E]
    gram, rhs = phi.t() @ phi, phi.t() @ y[fit].double()
    scale = gram.diagonal()[:F_].mean().clamp(min=1e-12)
    prior = torch.cat([w0.double(), torch.zeros(E, w0.shape[1], dtype=torch.float64)])
    best = None
    for lam in LAMBDAS:
        pen = torch.cat([torch.full((F_,), lam * scale.item()), torch.full((E,), 1e-9 * scale.item())])
        w = torch.linalg.solve(gram + torch.diag(pen.double()), rhs + pen.double()[:, None] * prior).float()
        err = val_error(w[:F_], w[F_:])
        if best is None or err < best[0]:
            best = (err, lam, w)
    err, lam, w = best
    facts.update(val_error=err, ridge=lam)
    return w[:F_].contiguous(), w[F_:].contiguous(), facts


def _blockwise(kept, chosen, owner, w0, d, y, fit):
    """Wide FFNs: each expert's output rows by ridge on the residual of the others, SWEEPS times."""
    w = w0.clone()
    for _ in range(SWEEPS):
        for e in range(chosen.shape[1]):
            cols = torch.nonzero(owner == e).flatten()
            if cols.numel() == 0:
                continue
            rows = fit & (chosen[:, e] > 0)
            own = kept[rows][:, cols]                                       # [N, m]
            rest = _output(kept[rows], chosen[rows], w, d) - own @ w[cols]
            g = own.double().t() @ own.double()
            pen = BLOCK_LAMBDA * g.diagonal().mean().clamp(min=1e-12)
            rhs = own.double().t() @ (y[rows] - rest).double() + pen * w0[cols].double()
            w[cols] = torch.linalg.solve(g + pen * torch.eye(len(g), dtype=g.dtype), rhs).float()
        d = _biases_only(kept, chosen, w, y, fit)
    return w, d
