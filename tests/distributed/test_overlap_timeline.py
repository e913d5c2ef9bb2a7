"""Timeline (intervals, overlap fraction by interval union, Chrome trace JSON) and the delayed
transport's channel on a one-rank gloo group (no timed assertions: only what a sleep guarantees)."""
import contextlib
import json
import time

import pytest
import torch

from moecc.distributed.comm import use_transport
from moecc.distributed.timeline import Timeline, write_chrome_trace
from moecc.distributed.transport import DelayedTransport


@contextlib.contextmanager
def _delayed(alpha: float = 0.0, timeline=None, pipelined: bool | None = None):
    """The delayed transport installed for the block (and overlap.PIPELINED_BACKWARD set, unless
    None); both undone after, the transport closed."""
    from moecc.distributed import overlap
    tr = DelayedTransport(alpha=alpha, beta=0.0, timeline=timeline)
    use_transport(tr)
    was = overlap.PIPELINED_BACKWARD
    if pipelined is not None:
        overlap.PIPELINED_BACKWARD = pipelined
    try:
        yield tr
    finally:
        overlap.PIPELINED_BACKWARD = was
        use_transport(None)
        tr.close()


def test_overlap_fraction_by_interval_union(tmp_path):
    tl = Timeline(rank=1)
    tl.add("comm", "a", 0.0, 4.0)
    tl.add("comm", "b", 3.0, 6.0)            # overlaps a: comm union is [0, 6) = 6
    tl.add("compute", "x", 1.0, 2.0)
    tl.add("compute", "y", 5.0, 9.0)         # hidden: [1, 2) + [5, 6) = 2
    o = tl.overlap()
    assert o["comm"] == pytest.approx(6.0) and o["hidden"] == pytest.approx(2.0)
    assert o["fraction"] == pytest.approx(1 / 3) and o["compute"] == pytest.approx(5.0)
    doc = json.loads(write_chrome_trace([tl, Timeline(0)], tmp_path / "t.json").read_text())
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {(e["name"], e["tid"], e["ts"], e["dur"]) for e in xs} == {
        ("a", 1, 0.0, 4e6), ("b", 1, 3e6, 3e6), ("x", 0, 1e6, 1e6), ("y", 0, 5e6, 4e6)}
    assert doc["metadata"]["overlap"]["1"]["fraction"] == pytest.approx(1 / 3)
    assert Timeline.from_dict(tl.to_dict()).events == tl.events
    with pytest.raises(ValueError):
        tl.add("io", "z", 0, 1)



def test_delayed_transport_is_a_fifo_channel(one_rank_group):
    tl = Timeline(0)
    tr = DelayedTransport(alpha=0.02, beta=0.0, timeline=tl)
    try:
        t = torch.arange(6.0).view(3, 2)
        pend = [tr.all_to_all(t, [3], [3], None, f"c{i}", async_op=True) for i in range(3)]
        outs = [p.wait() for p in pend]
        assert all(torch.equal(o, t) for o in outs)
        g = tr.all_gather(torch.tensor([7], dtype=torch.int64), None, "gather")
        assert g.tolist() == [[7]]
    finally:
        tr.close()
    comm = sorted(tl.intervals("comm"))
    assert tr.calls == 4 and len(comm) == 4
    assert all(b - a >= 0.02 for a, b in comm)                      # each call lasts >= alpha
    assert all(comm[i + 1][0] >= comm[i][0] + 0.02 for i in range(3))  # one at a time, in order


@pytest.mark.parametrize("spin", [False, True])
def test_spinning_waits_keep_the_core_busy(one_rank_group, spin):
    """A device per rank on shared cores: a spinning wait uses its core until delivery (so a core
    partner gets no more of the machine than it would beside a waiting device); a sleeping one
    gives it away. Same result either way, delivered at the modelled end."""
    tr = DelayedTransport(alpha=0.2, beta=0.0, spin=spin)
    try:
        t = torch.arange(6.0).view(3, 2)
        rng = torch.get_rng_state()
        w0, c0 = time.perf_counter(), time.thread_time()
        out = tr.all_to_all(t, [3], [3], None, "spin", async_op=True).wait()
        wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
    finally:
        tr.close()
    assert torch.equal(out, t) and wall >= 0.2
    assert torch.equal(torch.get_rng_state(), rng)  # waiting draws nothing from the caller's stream
    if spin:
        assert cpu >= 0.25 * wall, (cpu, wall)      # busy (less what other threads and processes took)
    else:
        assert cpu <= 0.1 * wall, (cpu, wall)


def _layer_timeline(degree: int, alpha: float, overlap: bool = True):
    """One rank, the chunked layer with a shared expert through the delayed transport -> (y,
    reference, timeline events sorted by start)."""
    from moecc.distributed.layout import LayerPlacement
    from moecc.distributed.overlap import moe_layer
    from moecc.ops import experts_reference, shared_expert
    from moecc.spec import MoESpec, RouterSpec

    E, K, H, F, T = 4, 2, 8, 16, 24
    g = torch.Generator().manual_seed(3)
    spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation="swiglu", router=RouterSpec(top_k=K), shared_ffn=F)
    w_in, w_out = torch.randn(E, 2 * F, H, generator=g), torch.randn(E, H, F, generator=g)
    sh = (torch.randn(2 * F, H, generator=g), torch.randn(H, F, generator=g), None)
    x, ids = torch.randn(T, H, generator=g), torch.topk(torch.rand(T, E, generator=g), K, 1).indices
    wts = torch.rand(T, K, generator=g)
    tl = Timeline(0)
    with _delayed(alpha, tl):
        y = moe_layer(x, ids, wts, w_in, w_out, spec, LayerPlacement.contiguous("m", E, 1), degree=degree,
                      overlap=overlap, shared=sh, tokens=torch.arange(T).numpy(), timeline=tl)
    ref = experts_reference(x, ids, wts, w_in, w_out, None, None, spec) + shared_expert(x, *sh, spec)
    return y, ref, sorted(tl.events, key=lambda e: e[2])


def test_shared_expert_fills_the_first_dispatch_wait(one_rank_group):
    """The schedule runs the shared expert (compute independent of the exchanged tokens) while the
    first dispatch is in flight: its first block starts before that dispatch is delivered and before
    any experts chunk; each chunk's experts start only after its dispatch arrived (the wait placed
    right before them). The delayed transport holds each collective alpha = 0.2 s (a sleep), far
    longer than a block of this tiny shared expert. Without overlap, the shared expert runs after
    every collective."""
    y, ref, ev = _layer_timeline(degree=2, alpha=0.2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    disp = {n: (a, b) for k, n, a, b in ev if "dispatch" in n}
    shared = [(a, b) for k, n, a, b in ev if "shared[" in n]
    experts = {n: (a, b) for k, n, a, b in ev if "experts[" in n}
    assert len(shared) == 4                                       # 2d row blocks at d = 2
    d0 = disp["layer m [0]: dispatch hidden rows + pairs"]
    assert shared[0][0] < d0[1], "the shared expert did not start while dispatch[0] was in flight"
    assert shared[0][0] < min(a for a, _ in experts.values())
    for c in range(2):
        assert experts[f"layer m experts[{c}]"][0] >= disp[f"layer m [{c}]: dispatch hidden rows + pairs"][1]
    # waits as late as possible: chunk 0 computes while chunk 1's dispatch is still in flight
    assert experts["layer m experts[0]"][0] < disp["layer m [1]: dispatch hidden rows + pairs"][1]
    y, ref, ev = _layer_timeline(degree=1, alpha=0.05, overlap=False)
    assert torch.equal(y, ref)                                    # d = 1: bit-identical
    last_comm = max(b for k, _, _, b in ev if k == "comm")
    assert all(a >= last_comm for k, n, a, _ in ev if "shared" in n)


def test_dispatch_buffers_are_packed_while_the_split_sizes_are_in_flight(one_rank_group):
    """The chunked layer packs every chunk's dispatch buffer (it needs only the layouts) while the
    split-size exchange is in flight, and issues the dispatches when the sizes arrive; without
    overlap the packing comes after the sizes (the baseline's order)."""
    y, ref, ev = _layer_timeline(degree=2, alpha=0.2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    sizes = next((a, b) for k, n, a, b in ev if k == "comm" and "split sizes" in n)
    pack = next((a, b) for k, n, a, b in ev if k == "compute" and n.endswith(" pack"))
    first = min(a for k, n, a, b in ev if k == "comm" and "dispatch" in n)
    assert sizes[0] <= pack[0] and pack[1] < sizes[1], (sizes, pack)
    assert first >= sizes[1]
    y, ref, ev = _layer_timeline(degree=1, alpha=0.05, overlap=False)
    sizes = next((a, b) for k, n, a, b in ev if k == "comm" and "split sizes" in n)
    pack = next((a, b) for k, n, a, b in ev if k == "compute" and n.endswith(" pack"))
    assert pack[0] >= sizes[1]


def _train_step(pipelined: bool, degree: int = 3, alpha: float = 0.05, backward_degree: int | None = None):
    """One rank, the chunked layer (shared expert included) forward + backward through the delayed
    transport -> (gradients of x, routing weights, w_in, w_out and the shared expert's w_in; the
    backward's timeline events)."""
    from moecc.distributed import overlap
    from moecc.distributed.layout import LayerPlacement
    from moecc.spec import MoESpec, RouterSpec

    E, K, H, F, T = 4, 2, 8, 16, 24
    g = torch.Generator().manual_seed(5)
    spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation="swiglu", router=RouterSpec(top_k=K), shared_ffn=F)
    leaves = [t.requires_grad_(True) for t in (
        torch.randn(T, H, generator=g), torch.rand(T, K, generator=g), torch.randn(E, 2 * F, H, generator=g),
        torch.randn(E, H, F, generator=g), torch.randn(2 * F, H, generator=g))]
    shared = (leaves[4], torch.randn(H, F, generator=g), None)
    ids = torch.topk(torch.rand(T, E, generator=g), K, 1).indices
    tl = Timeline(0)
    with _delayed(alpha, tl, pipelined):
        y = overlap.moe_layer(leaves[0], ids, leaves[1], leaves[2], leaves[3], spec,
                              LayerPlacement.contiguous("m", E, 1), degree=degree, shared=shared,
                              tokens=torch.arange(T).numpy(), timeline=tl, backward_degree=backward_degree)
        start = time.perf_counter()
        (y * torch.randn(T, H, generator=g)).sum().backward()
    return [t.grad for t in leaves], [e for e in tl.events if e[2] >= start]


def test_backward_pipelines_the_chunks_exchanges(one_rank_group):
    """Training through the chunked layer: every chunk's combine backward is in flight at once and the
    first chunk's expert backward computes while the others' are still flying (autograd alone waits
    for every combine backward before any expert backward). The gradients are the same bits."""
    grads, ev = _train_step(True)
    plain, _ = _train_step(False)
    for a, b in zip(grads, plain):
        assert torch.equal(a, b)
    comb = {n: (a, b) for k, n, a, b in ev if k == "comm" and "combine backward" in n}
    first = next((a, b) for k, n, a, b in ev if k == "compute" and n.endswith("experts backward[2]"))
    assert len(comb) == 3
    assert first[0] < comb["layer m [0]: combine backward"][1], (first, comb)
    disp = [a for k, n, a, b in ev if k == "comm" and "dispatch backward" in n]
    assert len(disp) == 3 and min(disp) >= min(a for a, _ in comb.values())


def test_pipelined_backward_twice_with_retain_graph(one_rank_group):
    """retain_graph=True: a second backward through the pipelined layer gives the same gradients again
    (the saved expert inputs live as long as the graph, as autograd's own)."""
    from moecc.distributed import overlap
    from moecc.distributed.layout import LayerPlacement
    from moecc.spec import MoESpec, RouterSpec

    E, K, H, F, T = 4, 2, 8, 16, 12
    g = torch.Generator().manual_seed(7)
    spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation="swiglu", router=RouterSpec(top_k=K))
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w_in, w_out = torch.randn(E, 2 * F, H, generator=g), torch.randn(E, H, F, generator=g)
    ids = torch.topk(torch.rand(T, E, generator=g), K, 1).indices
    y = overlap.moe_layer(x, ids, torch.rand(T, K, generator=g), w_in, w_out, spec,
                          LayerPlacement.contiguous("m", E, 1), degree=2, tokens=torch.arange(T).numpy())
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    y.sum().backward()
    assert torch.equal(x.grad, first)


def test_backward_degree_merges_forward_chunks(one_rank_group):
    """d = 4 forward chunks, backward degree 2: two combine-backward exchanges (chunks 0..1, 2..3),
    both in flight at once; chunks 3 and 2 (the first group) compute their expert backward while the
    second group's exchange flies; two gradient exchanges back. Same bits as backward degree 4."""
    grads, ev = _train_step(True, degree=4, backward_degree=2)
    full, ev4 = _train_step(True, degree=4)
    for a, b in zip(grads, full):
        assert torch.equal(a, b)
    comb = {n: (a, b) for k, n, a, b in ev if k == "comm" and "combine backward" in n}
    assert sorted(comb) == ["layer m [0..1]: combine backward", "layer m [2..3]: combine backward"]
    assert len([n for k, n, a, b in ev4 if k == "comm" and "combine backward" in n]) == 4
    first = next((a, b) for k, n, a, b in ev if k == "compute" and n.endswith("experts backward[3]"))
    assert first[0] < comb["layer m [0..1]: combine backward"][1], (first, comb)
    back = [n for k, n, a, b in ev if k == "comm" and "dispatch backward" in n]
    assert sorted(back) == ["layer m [0..1]: dispatch backward", "layer m [2..3]: dispatch backward"]


def test_shared_expert_backward_fills_the_combine_backward_wait(one_rank_group):
    """The pipelined backward runs the shared expert's backward in its forward's row blocks while the
    first combine backward is in flight (not before every exchange is issued, as autograd would)."""
    grads, ev = _train_step(True)
    comb = sorted((a, b) for k, n, a, b in ev if k == "comm" and "combine backward" in n)
    shared = [(a, b) for k, n, a, b in ev if k == "compute" and "shared backward" in n]
    assert len(shared) == 6                         # 2d row blocks at d = 3
    assert shared[0][0] >= comb[0][0] and shared[0][0] < comb[0][1], (shared, comb)
    assert grads[4] is not None and torch.isfinite(grads[4]).all()


def test_pipelined_backward_with_only_the_shared_expert_trainable(one_rank_group):
    """Frozen routed experts, x and routing weights, a trainable shared expert: the chunked layer's
    backward computes the shared weights' gradients (the same bits as autograd's path) and sends no
    gradients back to the experts' senders (nothing there needs one)."""
    from moecc.distributed import overlap
    from moecc.distributed.layout import LayerPlacement
    from moecc.spec import MoESpec, RouterSpec

    E, K, H, F, T = 4, 2, 8, 16, 12
    spec = MoESpec(num_experts=E, hidden=H, ffn=F, activation="swiglu", router=RouterSpec(top_k=K), shared_ffn=F)
    out = {}
    for pipelined in (True, False):
        g = torch.Generator().manual_seed(3)
        shared = (torch.randn(2 * F, H, generator=g).requires_grad_(), torch.randn(H, F, generator=g).requires_grad_(),
                  None)
        x, wts = torch.randn(T, H, generator=g), torch.rand(T, K, generator=g)
        w_in, w_out = torch.randn(E, 2 * F, H, generator=g), torch.randn(E, H, F, generator=g)
        ids = torch.topk(torch.rand(T, E, generator=g), K, 1).indices
        with _delayed(pipelined=pipelined) as tr:
            y = overlap.moe_layer(x, ids, wts, w_in, w_out, spec, LayerPlacement.contiguous("m", E, 1), degree=2,
                                  shared=shared, tokens=torch.arange(T).numpy())
            before = tr.calls
            y.square().sum().backward()
            out[pipelined] = [t.grad for t in shared[:2]], tr.calls - before
    (grads, calls), (plain, _) = out[True], out[False]
    assert all(a is not None and torch.equal(a, b) for a, b in zip(grads, plain))
    assert calls == 2                                    # the two chunks' combine backward, nothing back
