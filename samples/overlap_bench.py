"""Overlap benchmark: the chunked expert-parallel layer (moecc.distributed.overlap) on gloo ranks on
127.0.0.1, every all-to-all delayed to an α–β model (moecc.distributed.transport: a sleep), so a
2-core machine can show communication hidden behind compute.

    python samples/overlap_bench.py [--quick] [--configs N] [--out samples/results]   (make bench-overlap)

Per configuration (tokens, hidden, experts, k, α, comm:compute ratio, skew, shared expert, ranks):
  1. constants measured at start-up on the ranks (moecc.distributed.probe): GEMM throughput and fixed
     costs timed while every rank computes (4 ranks share the 2 cores), the transport's α and β, a
     lone exchange's latency; β is set so that the modelled comm of a serial run is the
     configured ratio × the compute of the slowest rank in warm-up serial runs, then corrected
     (CALIBRATE rounds) until the comm : compute measured in serial runs (mean over ranks) is the
     configured ratio (the modelled comm alone under-states what a serial run's waits take: the real
     exchange, wake-ups), then measured again by the probe; the report gives the comm : compute
     measured in the timed serial run itself;
  2. the cost model (costmodel + ep_costs on the run's own routing) predicts the step time without
     overlap and at d = 1..8 and picks d*;
  3. every variant is run (1 warm-up + 3 timed, each started on every rank at one agreed instant:
     probe.together; the step = the slowest rank's time; the fastest of the 3, least disturbed by
     other jobs), with per-rank timelines: overlap fraction = hidden comm / comm by interval union, summed over ranks.
     --train-all's (d, b) pairs interleave their repeats: one untimed round over every pair, then 3 timed rounds.
Writes OUT/overlap.md (tables), OUT/overlap.json (every run), OUT/overlap_trace.json (Chrome trace of
the balanced headline run at d*; open in ui.perfetto.dev), with --timelines every configuration's
per-rank timelines (OUT/overlap_timelines.json; samples/overlap_model_check.py --timelines reads them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HEADLINE = [dict(name="balanced", world=4, tokens=2048, hidden=256, experts=16, top_k=2, alpha=2e-3,
                 ratio=1.0, skew=0.0, shared=True),
            dict(name="zipf-1.2", world=4, tokens=2048, hidden=256, experts=16, top_k=2, alpha=2e-3,
                 ratio=1.0, skew=1.2, shared=True),
            dict(name="zipf-1.2 planned", world=4, tokens=2048, hidden=256, experts=16, top_k=2, alpha=2e-3,
                 ratio=1.0, skew=1.2, shared=True, placement="planned")]
"""The headline: 4 ranks, comm:compute 1, 2048 tokens per rank (a layer's compute per rank is ~100 ms
stretched on the shared cores, so the runtime's fixed costs per chunk, ~0.3 ms of Python, weigh as they
would beside an accelerator's kernels; at 512 tokens they were a tenth of a chunk). "planned": the
Zipf routing on the placement `moecc plan --method eplb --replicas 4` makes from other tokens of the
same routing (the hottest experts copied, balanced packing), the deployment the planner exists for;
the others place experts contiguously."""


def planned(W: int, T: int, E: int, k: int, skew: float, seed: int, replicas: int):
    """LayerPlacement from `moecc plan --method eplb` (replicas of the hottest experts, balanced packing)
    on other tokens routed by the same popularities as the measured ones (`seed`)."""
    from moecc.distributed.ep_costs import sample_ids
    from moecc.distributed.layout import LayerPlacement
    from moecc.passes.placement.eplb import eplb
    from moecc.passes.placement.topology import Topology
    from moecc.passes.placement.trace import Trace

    ids = sample_ids(W, T, E, k, skew, seed=seed, permute=True, draw_seed=1).reshape(1, W * T, k)
    trace = Trace(ids.astype(np.int32), np.ones(ids.shape, np.float32), np.zeros(W * T, np.int32), E)
    share = eplb(trace, Topology(1, W, (E + replicas) // W), replicas=replicas)[0]        # [E, W]
    return LayerPlacement("moe", share, np.zeros(E, bool), 1)


ALPHAS = (4e-3, 8e-3)     # where the transport is an α–β channel here (overlap_notes.md, session 13)


def grid(n: int, seed: int = 0, alphas: tuple = ALPHAS) -> list[dict]:
    """The headline configurations, then random ones (seeded); alphas: the α values drawn from (s)."""
    rng = np.random.default_rng(seed)
    out = [dict(c) for c in HEADLINE]
    while len(out) < n:
        c = dict(name=f"g{len(out) - len(HEADLINE) + 2}",        # g2, g3, ...: the names before a third headline
                 world=int(rng.choice([2, 4])), tokens=int(rng.choice([128, 256, 512])),
                 hidden=int(rng.choice([64, 128, 256])), experts=int(rng.choice([8, 16, 32])),
                 top_k=int(rng.choice([1, 2, 4])), alpha=float(rng.choice(list(alphas))),
                 ratio=float(rng.choice([0.5, 1.0, 2.0])), skew=float(rng.choice([0.0, 1.2])),
                 shared=bool(rng.choice([True, False])))
        if c["tokens"] * c["top_k"] <= 1024:        # keeps a configuration's 36 runs within ~20 s
            out.append(c)
    return out


HEADLINE_REPS = 5
CALIBRATE = 3          # rounds of β correction towards the configured comm : compute (measured)


def agreed_fastest(rows: list[list[float]], where: str):
    """This rank's timed repeats, each [step s, *values] -> (every rank's [W, reps, n], the repeat whose
    slowest rank was fastest (least disturbed by other jobs), that step: the slowest rank's)."""
    import torch

    from moecc.distributed import comm
    mine = torch.tensor(rows, dtype=torch.float64)                              # [reps, n]
    allr = comm.agree(mine.flatten(), None, where).view(-1, *mine.shape)        # [W, reps, n]
    slowest = allr[:, :, 0].max(0).values                                       # [reps]
    i = int(slowest.argmin())
    return allr, i, slowest[i].item()


TRAIN_PAIR_REPS = 3    # timed repeats of each (degree, backward degree) pair in --train


def train_runs(cfg: dict, degree: int, reps: int, tl, together, layer, costs=None, chunk: float = 0.0) -> dict:
    """Forward + backward of the layer (x, routing weights, expert and shared-expert weights
    trainable): without overlap, at d* with autograd's backward (each exchange waited for inside its
    own node), at d* with the pipelined backward (overlap.PIPELINED_BACKWARD), and every (degree d,
    backward degree b | d) pair pipelined -> {"variants": {name: {step, forward, backward (s, slowest
    rank, fastest repeat), hidden (comm hidden by compute, summed over ranks)}}, "pairs": {"d,b":
    measured + predicted forward / backward}, "chosen": the cost model's (d, b) (choose_degrees)}."""
    import torch

    from moecc.distributed import overlap
    from moecc.distributed.costmodel import backward_pipeline, choose_degrees, pipeline

    def step(d: int, on: bool, pipelined: bool, b: int | None = None) -> list[float]:
        together(None)
        tl.clear()
        was, overlap.PIPELINED_BACKWARD = overlap.PIPELINED_BACKWARD, pipelined
        try:
            t0 = time.perf_counter()
            y = layer(d, on, b)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            t2 = time.perf_counter()
            o = tl.overlap()
            return [t2 - t0, o["hidden"], o["comm"], t1 - t0, t2 - t1]
        finally:
            overlap.PIPELINED_BACKWARD = was

    def fastest(rows: list, where: str) -> dict:
        allr, i, slowest = agreed_fastest(rows, where)
        return {"step": slowest, "hidden": float(allr[:, i, 1].sum() / allr[:, i, 2].sum()),
                "forward": allr[:, i, 3].max().item(), "backward": allr[:, i, 4].max().item()}
    out = {"variants": {}, "pairs": {}}
    variants = [("serial", (1, False, False))]
    if degree > 1:               # at d = 1 both run autograd's backward: the pair (1, 1) below
        variants += [(f"d={degree} autograd backward", (degree, True, False)),
                     (f"d={degree} pipelined backward", (degree, True, True))]
    for name, args in variants:
        out["variants"][name] = fastest([step(*args) for _ in range(reps + 1)][1:], "train")
    # the pairs' repeats interleave: round 0 (untimed) warms every pair, then each round times every
    # pair once, so a slow stretch of a few seconds (seen on this VM: every rank's backward 2-4x slower
    # for ~7 s, with high system time and page faults, at the start of the pairs whatever ran before)
    # spoils one repeat of several pairs rather than every repeat of one or two
    pairs = [(d, b) for d in range(1, 9) for b in range(1, d + 1) if d % b == 0]
    rows = {p: [] for p in pairs}
    for r in range(TRAIN_PAIR_REPS + 1):
        for d, b in pairs:
            row = step(d, True, True, b)
            if r:
                rows[(d, b)].append(row)
    for d, b in pairs:
        v = fastest(rows[(d, b)], "train pairs")
        if costs is not None:
            v.update(predicted_forward=pipeline(costs, d, chunk, cold_start=True).step,
                     predicted_backward=backward_pipeline(costs, d, b, chunk).step)
        out["pairs"][f"{d},{b}"] = v
    if costs is not None:
        f, bk = choose_degrees(costs, chunk)
        out["chosen"] = [f.degree, bk.degree]
        out["predicted_serial"] = {"forward": pipeline(costs, 1, chunk, overlap=False, cold_start=True).step,
                                   "backward": backward_pipeline(costs, 1, chunk_overhead=chunk, overlap=False).step}
    return out


def run_config(cfg: dict, rank: int, tr, tl, reps: int, keep: bool = False, aligned: bool = True) -> dict:
    import torch

    from moecc.distributed import comm
    from moecc.distributed.costmodel import LayerShape, choose_degree, pipeline
    from moecc.distributed.ep_costs import measured_costs, sample_ids
    from moecc.distributed.layout import LayerPlacement
    from moecc.distributed.overlap import moe_layer
    from moecc.distributed.probe import measure, measure_comm, together
    from moecc.spec import MoESpec, RouterSpec

    W, T, H, E, k = cfg["world"], cfg["tokens"], cfg["hidden"], cfg["experts"], cfg["top_k"]
    F = 2 * H
    spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation="swiglu", router=RouterSpec(top_k=k),
                   shared_ffn=F if cfg["shared"] else 0)
    g = torch.Generator().manual_seed(1)
    placement = LayerPlacement.contiguous("moe", E, W)
    if cfg.get("placement") == "planned":      # planned on other tokens of the same routing
        placement = planned(W, T, E, k, cfg["skew"], cfg.get("seed", 3), cfg.get("replicas", W))
    held = placement.held(rank)
    w_in = (torch.randn(E, 2 * F, H, generator=g) / H ** 0.5)[held].contiguous()
    w_out = (torch.randn(E, H, F, generator=g) / F ** 0.5)[held].contiguous()
    shared = (torch.randn(2 * F, H, generator=g) / H ** 0.5, torch.randn(H, F, generator=g) / F ** 0.5,
              None) if cfg["shared"] else None
    ids_all = sample_ids(W, T, E, k, cfg["skew"], seed=cfg.get("seed", 3), permute=True)   # [W, T, k]
    ids = torch.as_tensor(ids_all[rank])
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(10 + rank))
    wts = torch.rand(T, k, generator=g)
    tokens = np.arange(rank * T, (rank + 1) * T)
    layer = LayerShape(T, H, F, E, k, gated=True, shared_ffn=spec.shared_ffn, dispatch_bytes=4, combine_bytes=4)

    def model(m):
        return measured_costs(layer, W, ids_all, m.to_dict(), placement)

    def run(key):
        if aligned:
            together(None)
        else:                                     # the delayed barrier alone (--plain-barrier)
            comm.agree(torch.zeros(1, dtype=torch.int64), None, "barrier")
        tl.clear()
        t0 = time.perf_counter()
        moe_layer(x, ids, wts, w_in, w_out, spec, placement, degree=1 if key == "serial" else int(key),
                  overlap=key != "serial", shared=shared, tokens=tokens, timeline=tl)
        return time.perf_counter() - t0
    # 1. warm-up; the compute of a serial run sets β for the configured comm : compute ratio (the
    #    cost model does not see this: it uses the constants measured by the probe afterwards)
    tr.alpha, tr.beta = cfg["alpha"], 0.0
    mine = []
    for key in ("serial", "2", "serial", "serial"):
        run(key)
        if key == "serial":
            mine.append(tl.overlap()["compute"])
    busy = comm.agree(torch.tensor([min(mine)], dtype=torch.float64), None, "busy").max().item()
    m0 = measure(spec, w_in, w_out, placement, None, T)
    cl, c0 = model(replace(m0, beta=0.0))
    _, c1 = model(replace(m0, beta=1.0))                               # comm at β = 1 s/byte
    per_byte = (c1.dispatch + c1.combine) - (c0.dispatch + c0.combine)
    fixed = c0.sizes + c0.dispatch + c0.combine
    tr.beta = max(cfg["ratio"] * busy - fixed, 0.0) / per_byte
    for _ in range(CALIBRATE):          # the measured serial comm : compute towards the configured ratio
        got = []
        for _ in range(2):
            run("serial")
            o = tl.overlap()
            got.append((o["comm"], o["compute"]))
        cm_, cp_ = comm.agree(torch.tensor(min(got, key=lambda g: g[1]), dtype=torch.float64), None,
                              "calibrate").mean(0).tolist()
        if tr.beta > 0 and cm_ > fixed:
            tr.beta *= max(cfg["ratio"] * cp_ - fixed, 0.0) / (cm_ - fixed)
        tr.beta = comm.agree(torch.tensor([tr.beta], dtype=torch.float64), None, "beta").max().item()
    ab = comm.agree(torch.tensor(measure_comm(None, H, torch.float32), dtype=torch.float64), None, "probe")
    m = replace(m0, alpha=ab[:, 0].max().item(), beta=ab[:, 1].max().item(), lone=ab[:, 2].max().item())
    cl, c = model(m)
    # 2. predictions
    # each timed run starts from idle (after the start barrier): its first layout runs cold
    pred = {"serial": pipeline(c, 1, m.chunk, overlap=False, cold_start=True)}
    pred.update({str(d): pipeline(c, d, m.chunk, cold_start=True) for d in range(1, 9)})
    best = choose_degree(c, m.chunk)
    # the same with the probe before 2026-12-03 (compute timed uncontended, no lone exchange, no
    # dispatch reading), measured now: the two models against the same runs
    mb = replace(measure(spec, w_in, w_out, placement, None, T, aligned=False), alpha=m.alpha, beta=m.beta)
    _, cb = model(mb)
    pred_base = {"serial": pipeline(cb, 1, mb.chunk, overlap=False).step}
    pred_base.update({str(d): pipeline(cb, d, mb.chunk).step for d in range(1, 9)})
    # 3. runs (the headline configurations: at least HEADLINE_REPS timed repeats)
    reps = reps if cfg["name"].startswith("g") else max(reps, HEADLINE_REPS)
    measured, fractions, fastest_rep, late0, per_rank, ratio = {}, {}, {}, tr.late, {}, []
    late_s0 = tr.late_s
    for key in ["serial"] + [str(d) for d in range(1, 9)]:
        rows = []
        for rep in range(reps + 1):
            t = run(key)
            if rep:
                o = tl.overlap()
                rows.append([t, o["hidden"], o["comm"], o["compute"]])
            if rep and (keep or not cfg["name"].startswith("g")):
                cfg.setdefault("_timelines", {}).setdefault(key, []).append(tl.to_dict())
        allr, fastest, measured[key] = agreed_fastest(rows, "times")          # [W, reps, 4]
        fastest_rep[key] = fastest
        fractions[key] = float(allr[:, fastest, 1].sum() / allr[:, fastest, 2].sum())
        per_rank[key] = (allr[:, fastest, 1] / allr[:, fastest, 2]).tolist()   # hidden / comm
        if key == "serial":          # comm : compute of this very run, per rank (nothing overlaps)
            ratio = (allr[:, fastest, 2] / allr[:, fastest, 3]).tolist()

    def train_layer(degree: int, on: bool, backward_degree: int | None = None):
        leaves = [t.detach().requires_grad_() for t in (x, wts, w_in, w_out)]
        sh = None if shared is None else tuple(None if t is None else t.detach().requires_grad_() for t in shared)
        return moe_layer(leaves[0], ids, leaves[1], leaves[2], leaves[3], spec, placement, degree=degree,
                         overlap=on, shared=sh, tokens=tokens, timeline=tl, backward_degree=backward_degree)
    train = (train_runs(cfg, best.degree, reps, tl, together, train_layer, c, m.chunk)
             if cfg.get("train") else None)
    return {"config": {k_: v for k_, v in cfg.items() if not k_.startswith("_")}, "constants": m.to_dict(),
            "train": train, "beta_set": tr.beta, "chosen": best.degree, "late_calls": tr.late - late0,
            "late_s": tr.late_s - late_s0,
            "predicted": {k_: v.step for k_, v in pred.items()},
            "predicted_base": pred_base, "chosen_base": choose_degree(cb, mb.chunk).degree,
            "constants_base": mb.to_dict(),
            "predicted_overlap": {k_: v.overlap for k_, v in pred.items()},
            "measured": measured, "overlap": fractions, "overlap_per_rank": per_rank,
            "ratio_measured": ratio, "fastest": fastest_rep,
            "timeline": cfg.pop("_timelines", None)}


def rank_main(rank: int, world: int, port: int, job: str) -> None:
    pin = json.loads(Path(job).read_text())["pin"]
    if pin:                                  # every thread of this rank (gloo's too) on one core
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    import torch
    import torch.distributed as dist

    from moecc.distributed.comm import use_transport
    from moecc.distributed.timeline import Timeline
    from moecc.distributed.transport import DelayedTransport
    torch.set_num_threads(1)
    spec = json.loads(Path(job).read_text())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    tl = Timeline(rank)
    # spinning waits where ranks share the cores (there a sleeping wait lends its core to the partner
    # rank); where each rank has its own core, spinning only takes time from the exchange's threads
    spin = spec.get("spin", True) and world > (os.cpu_count() or 1)
    tr = DelayedTransport(0.0, 0.0, timeline=tl, spin=spin)
    use_transport(tr)
    if spec["nice"]:
        # the communication threads (gloo's, the transport's: started above, at priority 0) preempt
        # this compute thread when they wake: as an accelerator's copy engine and NIC, the modelled
        # channel never waits for a core (the compute of the 4 ranks still shares the 2 cores)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), spec["nice"])
    sys.setswitchinterval(2e-4)              # a woken delivery thread gets the GIL within 0.2 ms
    out = []
    for cfg in spec["configs"]:
        r = run_config(cfg, rank, tr, tl, spec["reps"], spec.get("timelines", False),
                       spec.get("aligned", True))
        out.append(r)
        if rank == 0:
            print(f"[{cfg['name']}] W={world} d*={r['chosen']} serial {r['measured']['serial'] * 1e3:.1f} ms "
                  f"best {min(r['measured'][str(d)] for d in range(1, 9)) * 1e3:.1f} ms", flush=True)
    Path(spec["out"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))
    tr.close()


def launch(configs: list[dict], world: int, out: Path, reps: int, pin: bool = False,
           nice: int = 0, timelines: bool = False, aligned: bool = True,
           spin: bool = True) -> list[list[dict]]:
    from moecc.distributed.comm import free_port
    job = out / f"job{world}.json"
    job.write_text(json.dumps({"configs": configs, "reps": reps, "out": str(out / f"runs{world}"),
                               "pin": pin, "nice": nice, "timelines": timelines,
                               "aligned": aligned, "spin": spin}))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--job", str(job)]) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"overlap bench: ranks exited {codes}")
    ranks = [json.loads((out / f"runs{world}.rank{r}.json").read_text()) for r in range(world)]
    for i, run in enumerate(ranks[0]):                   # rank 0's results + every rank's timeline
        tls = [ranks[r][i].pop("timeline") for r in range(world)]
        run["timelines"] = tls if tls[0] else None
    for r in range(world):
        (out / f"runs{world}.rank{r}.json").unlink()
    job.unlink()
    return ranks[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=53, help="grid size incl. the headline configs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the headline configs only")
    ap.add_argument("--alpha", type=float, help="α in ms for every config (default: the grid's)")
    ap.add_argument("--tokens", type=int, help="tokens per rank for every config (default: the grid's)")
    ap.add_argument("--alphas", help="comma list of α in ms the grid's random configurations draw from "
                                     "(default 4,8; sessions 9-12 drew from 1,2,4); the headline configurations keep theirs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="let the scheduler move ranks (default: rank r's threads pinned to core r mod cores: "
                         "unpinned, a rank that loses its core delays every collective it is part of)")
    ap.add_argument("--nice", type=int, default=10,
                    help="niceness of each rank's compute thread above its communication threads (0: off)")
    ap.add_argument("--note", default="", help="a sentence on the machine's state, for the report")
    ap.add_argument("--only", help="comma list of config names to run (default: all)")
    ap.add_argument("--plain-barrier", action="store_true",
                    help="start each timed run after the delayed barrier alone (ranks up to ~α apart) "
                         "instead of at one agreed instant")
    ap.add_argument("--train", action="store_true",
                    help="also time forward + backward of the headline configurations: no overlap, d* with "
                         "autograd's backward, d* with the pipelined backward, and every (degree, backward "
                         "degree) pair against the cost model")
    ap.add_argument("--train-all", action="store_true",
                    help="with --train: time the training step of every configuration, not only the headline ones")
    ap.add_argument("--sleep-waits", dest="spin", action="store_false",
                    help="waits for an exchange sleep (sessions 9-13) instead of keeping the core busy: ranks "
                         "sharing a core then lend it, so an imbalanced layer runs faster than on a device "
                         "per rank (default: waits spin where ranks share the cores, as a device per rank)")
    ap.add_argument("--timelines", action="store_true",
                    help="keep every configuration's per-rank timelines: OUT/overlap_timelines.json")
    ap.add_argument("--rank", type=int), ap.add_argument("--world", type=int)
    ap.add_argument("--port", type=int), ap.add_argument("--job")
    a = ap.parse_args()
    if a.rank is not None:
        return rank_main(a.rank, a.world, a.port, a.job)
    a.out.mkdir(parents=True, exist_ok=True)
    alphas = tuple(float(v) * 1e-3 for v in a.alphas.split(",")) if a.alphas else ALPHAS
    configs = grid(len(HEADLINE) if a.quick else a.configs, alphas=alphas)
    if a.only:
        configs = [c for c in configs if c["name"] in a.only.split(",")]
    for c in configs:
        c.update({k: v for k, v in (("alpha", a.alpha and a.alpha * 1e-3), ("tokens", a.tokens)) if v})
        if a.train and (a.train_all or not c["name"].startswith("g")):
            c["train"] = True
    t0 = time.time()
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    runs = []
    for world in (4, 2):
        mine = [c for c in configs if c["world"] == world]
        if mine:
            runs += launch(mine, world, a.out, a.reps, a.pin, a.nice, a.timelines, not a.plain_barrier,
                           a.spin)
    if a.timelines:                 # {config: {key: [per repeat: [per rank: timeline]]}}
        (a.out / "overlap_timelines.json").write_text(json.dumps(
            {r["config"]["name"]: {k: [list(x) for x in zip(*[t[k] for t in r["timelines"]])]
                                   for k in r["timelines"][0]} for r in runs if r.get("timelines")}))
    from overlap_report import write_report
    setup = (f"Setup: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, 1 torch thread per rank, "
             f"{'each rank pinned to core rank mod ' + str(os.cpu_count()) if a.pin else 'ranks not pinned'}, "
             f"{'compute threads at nice +' + str(a.nice) + ' below the communication threads' if a.nice else 'no priorities'}, "
             f"{'waits spin where ranks share a core (a device per rank)' if a.spin else 'waits sleep (ranks sharing a core lend it)'}; "
             f"load average before the run {load0}. {a.note}")
    write_report(runs, a.out, time.time() - t0, setup)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
