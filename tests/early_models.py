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
