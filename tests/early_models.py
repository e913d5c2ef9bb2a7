"""Factories for the early-check tests: loading one means a check came too late."""
import torch
from torch import nn


def must_not_load():
    raise AssertionError("FACTORY CALLED: the flag was checked after loading the model")


def none_inputs():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), None


class MustNotRun(nn.Module):
    """A model whose forward fails: the API must refuse bad arguments before capturing it."""

    def forward(self, x):
        raise AssertionError("MODEL RAN: the argument was checked after capture started")


def must_not_run():
    return MustNotRun(), (torch.randn(2, 8),)


def wrong_shape():
    """Example inputs of the wrong width: torch.export fails (and torch logs a traceback)."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), (torch.randn(2, 5),)


def small_gpt():
    """samples/tiny_gpt.py with one block: a quick real compile."""
    from tiny_gpt import build
    return build(layers=1)


def small_moe_gpt():
    """small_gpt upcycled to E=2 (one MoE layer), as a graph module a factory may return."""
    import moecc
    model, inputs = small_gpt()
    c = moecc.capture(model, inputs)
    moecc.transform(c, [("upcycle", {"num_experts": 2, "top_k": 1})])
    return c.gm, inputs
