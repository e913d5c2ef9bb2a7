"""Factories of MoE models whose routing matters (for `moecc compile` end-to-end tests).

Each is a sample upcycled to E experts, then `moecc.perturb.perturb_experts`: every expert differs and
the router decides, so a backend that routes, orders or combines experts wrongly cannot match it.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))

import tiny_bert  # noqa: E402
import tiny_gpt  # noqa: E402

from moecc.api import transform  # noqa: E402
from moecc.frontend import capture  # noqa: E402
from moecc.perturb import perturb_experts  # noqa: E402


def upcycled(build, experts: int = 8, top_k: int = 2, seed: int = 0):
    model, inputs = build()
    captured = capture(model, inputs)
    transform(captured, [("upcycle", {"num_experts": experts, "top_k": top_k})])
    return perturb_experts(captured.gm, seed=seed, inplace=True), inputs


def gpt():
    return upcycled(tiny_gpt.build)


def bert():
    return upcycled(tiny_bert.build, experts=4, top_k=1)
