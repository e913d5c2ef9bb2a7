"""A test transport: torch.distributed's all-to-all (gloo on 127.0.0.1) delayed to an α–β model, so
overlap can be measured on a machine whose cores cannot show it with real sockets.

    tr = DelayedTransport(alpha=2e-3, beta=1 / 200e6, timeline=tl)
    moecc.distributed.comm.use_transport(tr)      # the EP runtime's collectives now go through tr
    p = tr.all_to_all(t, send, recv, group, "layer0 dispatch[1]", async_op=True)   # returns at once
    ... compute ...
    y = p.wait()

The modelled channel: one FIFO link per rank. A call issued at time t starts on it at
max(t, the end of the previous call) and ends alpha + beta * bytes later, bytes = max(bytes this
rank sends to other ranks, bytes it receives from them) (its own rows cost nothing, as in
moecc.distributed.costmodel); its result is delivered at that end (a sleep, not CPU work). The real
gloo exchanges run back to back on a background thread as soon as they are issued, so their own
latency hides behind the modelled channel; one that is not done by its modelled end delivers when
it is (counted in `late`: the model then under-states that call). Since the real exchange needs every
peer, a rank still waits for a slower rank, as on a real network. Compute on the calling thread
proceeds meanwhile, as beside an accelerator's communication stream. Every collective of the group
must go through the transport while it is in use (one thread issues them all, in the same order on
every rank). Each call is recorded as a "comm" interval [start, delivery] on the timeline. The EP
runtime's backward all-to-alls go through comm.all_to_all too, so training steps are delayed alike.

Waiting: a sleeping wait (the default) gives the core away. Where ranks share cores (4 ranks on this
2-core machine) a rank whose core partner waits then computes up to twice as fast, unlike a device per
rank. `spin=True` keeps a waiting rank's core busy (small torch ops with the GIL released, so the
transport's threads still run): every rank then gets the same share of the machine, busy or waiting,
as with one device per rank (samples/results/overlap_notes.md has the measurements).
"""
from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future

import torch
import torch.distributed as dist
from torch import Tensor

from moecc.distributed.timeline import Timeline


class DelayedPending:
    """A collective queued or in flight; wait() -> the received tensor (re-raises its error).
    With `spin`, wait() keeps the core busy until delivery (small torch ops, the GIL released)."""

    def __init__(self, future: Future, where: str, spin: bool = False):
        self._f, self.where, self._spin = future, where, spin

    def done(self) -> bool:
        return self._f.done()

    def wait(self) -> Tensor:
        if self._spin and not self._f.done():
            a, out = torch.full((64, 64), 1e-3), torch.empty(64, 64)
            while not self._f.done():       # torch ops release the GIL: the delivery thread runs
                torch.mm(a, a, out=out)     # (no RNG draws: the caller's random streams stay put)
        return self._f.result()


class DelayedTransport:
    """Install with moecc.distributed.comm.use_transport(tr): the EP runtime's every collective
    (all_to_all and the all_gather of split sizes) then runs here, delayed, in issue order."""

    def __init__(self, alpha: float, beta: float, timeline: Timeline | None = None,
                 spin: bool = False):
        if not (alpha >= 0 and beta >= 0):
            raise ValueError(f"delayed transport: alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.timeline = timeline
        self.spin = bool(spin)
        self.calls = 0
        self.late = 0                       # calls whose real exchange outlasted the model
        self.late_s = 0.0                   # ... and by how much, in all (s)
        self._q: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="moecc-delayed-a2a", daemon=True)
        self._deliver = threading.Thread(target=self._delivery, name="moecc-delayed-a2a-out", daemon=True)
        self._worker.start()
        self._deliver.start()

    def model_time(self, nbytes: float) -> float:
        return self.alpha + self.beta * nbytes

    def all_to_all(self, t: Tensor, send: list[int], recv: list[int], group, where: str,
                   async_op: bool = False) -> DelayedPending:
        """t [sum(send), ...] -> [sum(recv), ...] in rank order, delivered at wait() (async_op) or
        before returning."""
        rank = dist.get_rank(group)
        row = t.element_size() * math.prod(t.shape[1:])                      # bytes per row
        nbytes = max(sum(send) - send[rank], sum(recv) - recv[rank]) * row
        send, recv, t = list(send), list(recv), t.contiguous()

        def run():
            out = t.new_empty((sum(recv), *t.shape[1:]))
            dist.all_to_all_single(out, t, recv, send, group=group)
            return out
        p = self._submit(run, self.model_time(nbytes), group, where)
        if not async_op:
            p.wait()
        return p

    def all_gather(self, vec: Tensor, group, where: str, async_op: bool = False):
        """vec [n] -> [W, n] (async_op: a DelayedPending whose wait() returns it); bytes: what the
        other ranks send this one."""
        W = dist.get_world_size(group)
        vec = vec.contiguous()

        def run():
            out = [torch.empty_like(vec) for _ in range(W)]
            dist.all_gather(out, vec, group=group)
            return torch.stack(out)
        p = self._submit(run, self.model_time((W - 1) * vec.numel() * vec.element_size()), group, where)
        return p if async_op else p.wait()

    def close(self) -> None:
        self._q.put(None)
        self._worker.join(timeout=5)
        self._deliver.join(timeout=5)

    def _submit(self, run, model: float, group, where: str) -> DelayedPending:
        f: Future = Future()
        self._q.put((f, run, model, group, where, time.perf_counter()))
        return DelayedPending(f, where, self.spin)

    def _loop(self) -> None:
        """Real exchanges, back to back in issue order; each then waits for its modelled end."""
        from moecc.distributed.comm import _run            # errors name the rank and the layer
        free = 0.0                                         # when the modelled channel is free
        while True:
            item = self._q.get()
            if item is None:
                self._out.put(None)
                return
            f, run, model, group, where, issued = item
            start = max(issued, free)
            free = start + model
            try:
                out = _run(where, group, run)
            except BaseException as e:      # noqa: BLE001  (delivered to the waiting thread)
                self._out.put((f, e, start, free, where))
                continue
            self._out.put((f, out, start, free, where))

    def _delivery(self) -> None:
        while True:
            item = self._out.get()
            if item is None:
                return
            f, out, start, end, where = item
            if isinstance(out, BaseException):
                f.set_exception(out)
                continue
            left = end - time.perf_counter()
            if left > 0:
                time.sleep(left)
            else:
                self.late += 1
                self.late_s -= left
            self.calls += 1
            if self.timeline is not None:
                self.timeline.add("comm", where, start, max(end, time.perf_counter()))
            f.set_result(out)
