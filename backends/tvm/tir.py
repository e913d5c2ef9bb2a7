"""CPU TIR kernels for the expert GEMMs (TVMScript, specialized per layer shape, token count symbolic).

    gather_gemv:   out[n, r]      = w[e_n, r, :] · src[n // S, :] + b[e_n, r]     e_n = max(ids[n], 0), row by row
    segment_gemm:  out[dst[i], r] = w[e, r, :] · src[srcidx[i], :] + b[e, r]     i in expert e's segment

Both read the weights in their stored layout (w [E, R, K], K contiguous): the dot product over K is
vectorized with V-wide partial sums (U independent chains, so the FP-add latency is hidden), summed
at the end, so no weight transpose is ever needed. `segment_gemm` walks expert e's segment
[ends[e] - counts[e], ends[e]) (data-dependent loop extents) in tiles of TM rows, for one L2-sized
block of RB weight rows at a time: each weight vector loaded serves TM rows, each block of weights is
read from memory once per expert (the grouped GEMM of MLC-LLM's `moe_matmul`, with a CPU schedule:
(expert, block of weight rows) pairs in parallel, token rows tiled, K vectorized); with E = 1 and one
segment of every row it is a dense Linear (linear.py). Rows outside every segment
are left unwritten: callers mask them. GPU-bound TIR (threadIdx/blockIdx) does not compile for `llvm`.
"""
from __future__ import annotations

from tvm.script import tirx as T

TM = TILE_ROWS = 4  # token rows per tile in segment_gemm (each weight vector serves TM rows)
L2_BLOCK = 1 << 16  # bytes of weight rows kept hot while every tile of a segment passes over them


def lanes_of(target) -> int:
    """float32 SIMD lanes of an llvm target: 16 (AVX-512), 8 (AVX), else 4 (SSE2 / NEON / generic)."""
    from tvm.target.codegen import target_has_features
    for feature, lanes in (("avx512f", 16), ("avx", 8)):
        try:
            if target_has_features(feature, target):
                return lanes
        except Exception:     # not an x86 target
            return 4
    return 4


def vector_width(k: int, lanes: int) -> int:
    """Largest power of two <= lanes dividing the reduction length (the dot product's SIMD width)."""
    return next(v for v in (16, 8, 4, 2, 1) if v <= lanes and k % v == 0)


def chains(k: int, v: int) -> int:
    """Independent partial sums over K (4, 2 or 1 dividing K / V)."""
    return next(u for u in (4, 2, 1) if (k // v) % u == 0)


def row_block(r: int, k: int, l2_block: int = L2_BLOCK) -> int:
    """Largest divisor of R whose RB rows of K floats fit l2_block bytes (at least 1)."""
    fit = max(1, l2_block // (4 * k))
    return max(d for d in range(1, min(r, fit) + 1) if r % d == 0)


def gather_gemv(E: int, R: int, K: int, S: int, dtype: str, lanes: int, knobs: dict | None = None):
    """out [N, R] for N = rows(ids) * S: each row's own expert, weights read once per row (decode).
    knobs (tune.py): {"chains": U} independent partial sums (must divide K / V); default chains()."""
    V = vector_width(K, lanes)
    U = int((knobs or {}).get("chains") or chains(K, V))
    KU = K // (V * U)

    @T.prim_func(private=True)
    def gather(var_src: T.handle, var_ids: T.handle, w: T.Buffer((E, R, K), dtype),
               b: T.Buffer((E, R), dtype), var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        n = T.int64()
        src = T.match_buffer(var_src, (m, K), dtype)
        ids = T.match_buffer(var_ids, (n,), "int64")
        out = T.match_buffer(var_out, (n, R), dtype)
        for i in T.parallel(n):
            acc = T.alloc_buffer((U, V), "float32", scope="local")
            for r in range(R):
                for u in T.unroll(U):
                    for v in T.vectorized(V):
                        acc[u, v] = T.float32(0)
                for k0 in range(KU):
                    for u in T.unroll(U):
                        for v in T.vectorized(V):
                            acc[u, v] = acc[u, v] + T.Cast("float32", src[i // S, (k0 * U + u) * V + v]) \
                                * T.Cast("float32", w[T.max(ids[i], T.int64(0)), r, (k0 * U + u) * V + v])
                for u in range(1, U):
                    for v in T.vectorized(V):
                        acc[0, v] = acc[0, v] + acc[u, v]
                for v in range(1, V):
                    acc[0, 0] = acc[0, 0] + acc[0, v]
                out[i, r] = T.Cast(dtype, acc[0, 0] + T.Cast("float32", b[T.max(ids[i], T.int64(0)), r]))

    return gather


def segment_gemm(E: int, R: int, K: int, dtype: str, lanes: int, knobs: dict | None = None):
    """out [N_out, R]: expert e multiplies the rows of its segment; weights blocked, rows tiled (prefill).
    knobs (tune.py): {"tm": token rows per tile, "l2_block": bytes of weight rows kept hot, "ru": weight
    rows per step (1 or 2)}; defaults TM, L2_BLOCK, 2 where RB is even."""
    knobs = knobs or {}
    TM = int(knobs.get("tm") or TILE_ROWS)
    V, RB = vector_width(K, lanes), row_block(R, K, int(knobs.get("l2_block") or L2_BLOCK))
    KV, NRB = K // V, R // RB
    RU = 2 if RB % 2 == 0 and int(knobs.get("ru") or 2) == 2 else 1

    @T.prim_func(private=True)
    def segment(var_src: T.handle, var_srcidx: T.handle, var_dst: T.handle, counts: T.Buffer((E,), "int64"),
                ends: T.Buffer((E,), "int64"), w: T.Buffer((E, R, K), dtype), b: T.Buffer((E, R), dtype),
                var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        n = T.int64()
        n_out = T.int64()
        src = T.match_buffer(var_src, (m, K), dtype)
        srcidx = T.match_buffer(var_srcidx, (n,), "int64")
        dst = T.match_buffer(var_dst, (n,), "int64")
        out = T.match_buffer(var_out, (n_out, R), dtype)
        for job in T.parallel(E * NRB):                    # (expert, block of RB weight rows) per job:
            e = job // NRB                                 # parallel even with one expert (a Linear)
            rb = job % NRB                                 # RB weight rows stay in cache for all tiles
            acc = T.alloc_buffer((RU, TM, V), "float32", scope="local")
            row = T.alloc_buffer((TM,), "int64", scope="local")
            for tile in range(T.ceildiv(counts[e], T.int64(TM))):
                for t in T.unroll(TM):             # a short last tile recomputes its last row
                    row[t] = ends[e] - counts[e] + T.min(tile * TM + t, counts[e] - 1)
                for r0 in range(RB // RU):         # RU weight rows x TM token rows per step
                    for q in T.unroll(RU):
                        for t in T.unroll(TM):
                            for v in T.vectorized(V):
                                acc[q, t, v] = T.float32(0)
                    for k0 in range(KV):
                        for q in T.unroll(RU):
                            for t in T.unroll(TM):
                                for v in T.vectorized(V):
                                    acc[q, t, v] = acc[q, t, v] \
                                        + T.Cast("float32", w[e, rb * RB + r0 * RU + q, k0 * V + v]) \
                                        * T.Cast("float32", src[srcidx[row[t]], k0 * V + v])
                    for q in T.unroll(RU):
                        for t in T.unroll(TM):
                            for v in range(1, V):
                                acc[q, t, 0] = acc[q, t, 0] + acc[q, t, v]
                            out[dst[row[t]], rb * RB + r0 * RU + q] = T.Cast(
                                dtype, acc[q, t, 0] + T.Cast("float32", b[e, rb * RB + r0 * RU + q]))

    return segment
