"""Where a MoEfied FFN's time goes: MiniLM's FFN shape split into E experts, top-k, against the dense FFN.

    dense:   x [T, 384] → Linear 384→1536 → GELU → Linear 1536→384
    moefied: router Linear 384→E → topk_unit → moe(E experts of 1536/E neurons), one column per kernel
             (--kernels; default torch.grouped_gemm (before), torch.grouped_mm (issue 17), torch.auto
             (what the backend's selection picks at this T, named in the table))
    bound:   the experts' GEMMs + GELU alone, on balanced contiguous rows (T·k/E each): what no
             routing, sorting, gathering or scattering would cost; per expert (F.linear) and batched (bmm)
    → per T: time MoE / dense, bound / dense (1 thread, thread CPU time, fastest of repeats, the
      candidates measured in turn within each repeat so a load change hits them alike);
      a torch.profiler table of each kernel's MoE op at one T (self CPU per aten op)

    python samples/moefy_ffn_profile.py [--experts 8] [--top-k 2] [--tokens 64,128,256,512] [--profile 512]
Random weights and router: the experts get balanced loads (a fitted router's are less even).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moecc.backends.torch import packed, select
from moecc.ops import call_moe
from moecc.spec import MoESpec, RouterSpec

H, FF = 384, 1536


def cpu_times(fns: dict, x, repeats: int, clock=time.thread_time) -> dict:
    """{name: fastest time of fn(x)} (1 thread: this thread's CPU time; more: wall time), the fns called
    in turn within each repeat."""
    for fn in fns.values():
        fn(x)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = clock()
            fn(x)
            best[name] = min(best[name], clock() - t)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", default="64,128,256,512,1024")
    p.add_argument("--profile", type=int, default=512, help="T of the profiler table (0: none)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (above 1: wall time)")
    p.add_argument("--kernels", default="torch.grouped_gemm,torch.grouped_mm,torch.auto")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    g = torch.Generator().manual_seed(0)
    E, k, m = a.experts, a.top_k, FF // a.experts
    w1, b1 = torch.randn(FF, H, generator=g) / 20, torch.randn(FF, generator=g) / 20
    w2, b2 = torch.randn(H, FF, generator=g) / 40, torch.randn(H, generator=g) / 20
    w_in, b_in = w1.reshape(E, m, H).contiguous(), b1.reshape(E, m).contiguous()        # [E, m, H], [E, m]
    w_out = w2.reshape(H, E, m).permute(1, 0, 2).contiguous()                          # [E, H, m]
    b_out, router = torch.zeros(E, H), torch.randn(E, H, generator=g)
    spec = MoESpec(num_experts=E, hidden=H, ffn=m, activation="gelu", expert_bias=True,
                   router=RouterSpec("topk_unit", k, renormalize=False)).validate()

    def dense(x):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    def dense_dnn(x):                    # the same dense FFN on oneDNN's reordered weights (packed once)
        return packed.dnn_linear(F.gelu(packed.dnn_linear(x, w1, b1)), w2, b2)

    kernels = a.kernels.split(",")

    def moe(kernel):
        return lambda x: call_moe(x, F.linear(x, router), w_in, w_out, spec, b_in=b_in, b_out=b_out, kernel=kernel)

    names = [kn.removeprefix("torch.") for kn in kernels]
    print(f"E={E} k={k} ({k / E:.0%} active), {a.threads} thread(s); MoE / dense per kernel (auto: the kernel "
          f"torch.auto dispatches to at this T)\n")
    print(f"| T | dense ms | {' | '.join(names)} | auto picks | GEMMs alone (F.linear) | GEMMs alone (bmm) "
          f"| dense on oneDNN ms | auto / dense on oneDNN |")
    print("|---" * (len(names) + 7) + "|")
    for T in (int(t) for t in a.tokens.split(",")):
        x = torch.randn(T, H, generator=g)
        xe = torch.randn(max(1, T * k // E), H, generator=g)
        xb = torch.randn(E, *xe.shape, generator=g)                          # [E, T·k/E, H]

        def bound(_):
            for e in range(E):
                F.linear(F.gelu(F.linear(xe, w_in[e], b_in[e])), w_out[e], b_out[e])

        def bound_bmm(_):
            h = torch.baddbmm(b_in.unsqueeze(1), xb, w_in.transpose(1, 2))
            torch.baddbmm(b_out.unsqueeze(1), F.gelu(h), w_out.transpose(1, 2))
        fns = {"dense": dense, "dense_dnn": dense_dnn, **{kn: moe(kn) for kn in kernels}, "bound": bound, "bound_bmm": bound_bmm}
        t = cpu_times(fns, x, a.repeats, clock)
        d = t["dense"]
        picked = select.dispatch(spec, T).removeprefix("torch.")
        cols = " | ".join(f"{t[kn] / d:.3f}" for kn in kernels)
        print(f"| {T} | {d * 1e3:.2f} | {cols} | {picked} | {t['bound'] / d:.3f} | {t['bound_bmm'] / d:.3f} "
              f"| {t['dense_dnn'] * 1e3:.2f} | {t.get('torch.auto', float('nan')) / t['dense_dnn']:.3f} |")
    if a.profile:
        from torch.profiler import profile
        x = torch.randn(a.profile, H, generator=g)
        for kn in kernels:
            fn = moe(kn)
            with profile() as prof:
                for _ in range(a.repeats):
                    fn(x)
            print(f"\n{kn}: profile at T={a.profile}, {a.repeats} calls:\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
