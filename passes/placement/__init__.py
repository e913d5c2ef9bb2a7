"""Expert-to-device placement: which devices hold which experts (and replicas), planned from traces.

    trace = load_trace("trace.npz")                      # per layer, per token: k experts, weights
    topo = parse_topology("4x8:slots=9,intra=300,inter=25")
    p = plan(trace, topo, method="graph", replicas=32)   # or "eplb", "contiguous", "round_robin"
    save_plan(p, "placement.json")
    evaluate(trace, topo, ["eplb", "graph"], replicas=32)   # plan on window i, score on window i+1

Formats and metrics: README.md in this folder.
"""
from .evaluate import evaluate
from .metrics import Metrics, score
from .plan import METHODS, Plan, load_plan, plan, save_plan
from .topology import Topology, parse_topology
from .trace import Trace, load_trace, save_trace

__all__ = ["METHODS", "Metrics", "Plan", "Topology", "Trace", "evaluate", "load_plan", "load_trace",
           "parse_topology", "plan", "save_plan", "save_trace", "score"]
