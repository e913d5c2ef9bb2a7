"""moecc.bench.profile: which bench points are profiled, and the breakdown adds up."""
import torch

from moecc.bench import profile, report
from moecc.spec import MoESpec, RouterSpec


def _results(best_ms: float, limit_ms: float, tokens: int = 64) -> dict:
    times = {"moecc:torch.loop": {"median_ms": best_ms}, "moecc:torch.grouped_gemm": {"median_ms": best_ms * 2}}
    point = {"shape": "s", "tokens": tokens, "times": times, "chosen": "moecc:torch.loop",
             "limit_ms": limit_ms, "compute_limit_ms": limit_ms, "memory_limit_ms": 0.0}
    return {"runs": [{"threads": 1, "points": [point], "shapes": {"s": {"gemm_flops": 5e10}}}]}


def test_only_points_that_missed_their_limit_are_profiled():
    assert profile.misses(_results(1.0, 1.0), report) == []                  # at the limit: met
    [m] = profile.misses(_results(2.0, 1.0), report)                         # 2x at T=64: missed
    assert (m["threads"], m["shape"], m["tokens"], m["kernel"]) == (1, "s", 64, "torch.loop")
    assert m["best_over_limit"] == 2.0


def test_categories():
    assert profile.category("aten::mm") == "gemm"
    assert profile.category("aten::index_add_") == "gather"                  # in-place: its op's category
    assert profile.category("aten::fill_") == "alloc"
    assert profile.category("aten::index_add") == "gather"
    assert profile.category("aten::topk") == "routing"
    assert profile.category("aten::whatever_new") == "other"


def test_breakdown_of_a_real_layer_adds_up_to_its_wall_time():
    spec = MoESpec(4, 64, 128, "swiglu", RouterSpec(top_k=2), name="t")
    p = profile.profile_point(spec, 256, "torch.loop", threads=1, repeats=2)
    total = sum(p["categories"].values())
    assert p["categories"]["gemm"] > 0                                       # torch.loop runs ATen GEMMs
    assert total >= 0.99 * p["wall_ms"]                                      # untracked closes the gap
    md = profile.markdown([{**p, "threads": 1, "shape": "t", "tokens": 256, "kernel": "torch.loop",
                            "best_over_limit": 1.5}], {"runs": [{"threads": 1, "shapes": {"t": {"gemm_flops": 5e10}}}]})
    assert "| 1 | t | 256 | torch.loop | 1.50 |" in md
