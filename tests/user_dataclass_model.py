"""A user's model file as people write them: postponed annotations and a @dataclass config."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

if os.environ.get("MOECC_TEST_IMPORT_LOG"):
    with open(os.environ["MOECC_TEST_IMPORT_LOG"], "a") as f:
        f.write("imported\n")


@dataclass
class Config:
    hidden: int = 16
    ffn: int = 32


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.up, self.down = nn.Linear(cfg.hidden, cfg.ffn), nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def build():
    torch.manual_seed(0)
    cfg = Config()
    return Block(cfg), (torch.randn(2, 5, cfg.hidden),)
