"""Modules that look like an MoE but match no recognizer.

    module with (a router weight [E, H], named like gate/router/wg/...) + (E experts: a ModuleList/ModuleDict of E alike modules, or
    stacked 3-D weights [E, *, *])  ⇒  "why it looks like an MoE" (a reason string), else None

Such a module stays in the model as it is (its ops are captured one by one: correct, but no `moe`
node and no MoE-aware pass or kernel sees it); `recognize` warns, or stops when asked to.
"""
from __future__ import annotations

from torch import nn

ADVICE = ("register a recognizer for it (moecc.recognize.MoEMapping or Recognizer; see "
          "samples/custom_moe.py), or pass on_unrecognized='ignore' to keep it as ordinary ops")


ROUTER_HINTS = ("gate", "gating", "router", "classifier", "wg", "switch")   # gpt-fast, HF, fairseq, DeepSpeed


class UnrecognizedMoEWarning(UserWarning):
    """A block looks like an MoE (or matched a recognizer that refused it) and stays as ordinary ops."""


def looks_like_moe(module: nn.Module) -> str | None:
    """A reason when `module` has a router weight and E experts, else None."""
    if _is_moe(module):
        return None                                                 # already canonical
    experts = _expert_sets(module)                                  # {E: where}
    if not experts:
        return None
    for name, p in module.named_parameters():
        parts = name.split(".")
        if p.dim() != 2 or len(parts) > 3 or any(name.startswith(w + ".") for w in experts.values()):
            continue
        if not any(h in part.lower() for part in parts[:-1] or parts for h in ROUTER_HINTS):
            continue
        E = p.shape[0]
        if E in experts:
            return (f"router weight {name} {tuple(p.shape)} and {E} experts in {experts[E]}")
    return None


def _expert_sets(module: nn.Module) -> dict[int, str]:
    """Candidate expert containers: {count: name}."""
    found: dict[int, str] = {}
    for name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and len(child) >= 2:
            members = list(child.values()) if isinstance(child, nn.ModuleDict) else list(child)
            alike = len({type(m) for m in members}) == 1 and not _is_moe(members[0])
            if alike and all(sum(p.dim() == 2 for p in m.parameters()) >= 2 for m in members):
                found.setdefault(len(members), name)
    for name, p in module.named_parameters():
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        if p.dim() == 3 and p.shape[0] >= 2 and len(name.split(".")) <= 2 and not _is_moe(owner):
            found.setdefault(p.shape[0], name.rpartition(".")[0] or name)
    return found


def _is_moe(module: nn.Module) -> bool:
    from ..nn import MoE
    return isinstance(module, MoE)
