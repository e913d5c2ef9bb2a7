"""Factories that misbehave, for the CLI's bad-input tests."""
import torch
from torch import nn


def raises():
    raise RuntimeError("weights not found")


def not_a_model():
    return 42


def no_ffn():
    return nn.Sequential(nn.Linear(8, 8), nn.Softmax(-1)), (torch.randn(2, 8),)
