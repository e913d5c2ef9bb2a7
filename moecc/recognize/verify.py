"""Check a replacement against the block it replaces, before it replaces it.

    block(x_probe), replacement(x_probe)  ⇒  max abs error, or MoeccError (different structure or values)

x_probe: [2, 5, H] random (fixed seed) in the block's dtype and device. A block that needs more than
one input, or lives on the meta device, is not probed (returns None).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import MoeccError

RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}   # relative to the output's scale; half types: 2e-2


def probe(block: nn.Module, new: nn.Module, path: str, tokens: tuple[int, int] = (2, 5)) -> float | None:
    p = next(iter(new.parameters()), None)
    spec = getattr(new, "spec", None)
    if p is None or spec is None or p.device.type == "meta":
        return None
    gen = torch.Generator(device=p.device).manual_seed(0)
    dtype = new.w_in.dtype
    x = torch.randn(*tokens, spec.hidden, generator=gen, device=p.device, dtype=torch.float32).to(dtype)
    with torch.no_grad():
        try:
            ref = block(x)
        except TypeError:        # the block's forward needs more than the hidden states
            return None
        got = new(x)
    ref_leaves, ref_tree = tree_flatten(ref)
    got_leaves, got_tree = tree_flatten(got)
    if ref_tree != got_tree:
        raise MoeccError(f"{path}: the replacement returns {got_tree}, the block returned {ref_tree}")
    err = 0.0
    for r, g in zip(ref_leaves, got_leaves):
        if not isinstance(r, torch.Tensor) or r.shape != g.shape:
            raise MoeccError(f"{path}: replacement output {getattr(g, 'shape', g)} vs block "
                             f"{getattr(r, 'shape', r)}")
        diff = float((r.float() - g.float()).abs().max()) if r.numel() else 0.0
        scale = max(1.0, float(r.float().abs().max())) if r.numel() else 1.0
        if not diff <= RTOL.get(r.dtype, 2e-2) * scale:
            raise MoeccError(f"{path}: the replacement differs from the block by {diff:.3g} (scale "
                             f"{scale:.3g}) on a probe input; the block's semantics are not reproduced")
        err = max(err, diff)
    return err
