"""capture warns when export fixed a dim it was asked to keep dynamic (a Python loop over the sequence,
as Jamba's Mamba scan in torch): the graph then runs at that size only, and the user is told which."""
from __future__ import annotations

import logging

import torch

from moecc.frontend import capture


class SeqLoop(torch.nn.Module):
    def forward(self, x):                       # [B, S, H]: a Python loop over S fixes S in export
        y = x[:, 0]
        for i in range(1, x.shape[1]):
            y = y * 0.5 + x[:, i]
        return y


class NoLoop(torch.nn.Module):
    def forward(self, x):
        return x.cumsum(1)


def test_a_dim_fixed_by_export_is_named(caplog):
    with caplog.at_level(logging.WARNING, logger="moecc.capture"):
        cap = capture(SeqLoop(), (torch.randn(2, 6, 4),), source="loop")
    assert cap.inputs[0].shape == ["batch", 6, 4]
    assert any("export fixed" in r.getMessage() and "dim 1 = 6" in r.getMessage() for r in caplog.records)


def test_no_warning_when_dims_stay_dynamic(caplog):
    with caplog.at_level(logging.WARNING, logger="moecc.capture"):
        cap = capture(NoLoop(), (torch.randn(2, 6, 4),), source="cumsum")
    assert cap.inputs[0].shape == ["batch", "seq", 4]
    assert not any("export fixed" in r.getMessage() for r in caplog.records)
