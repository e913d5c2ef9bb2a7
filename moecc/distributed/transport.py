"""A test transport: torch.distributed's all-to-all (gloo on 127.0.0.1) delayed to an α–β model, so
overlap can be measured on a machine whose cores cannot show it with real sockets.

    tr = DelayedTransport(alpha=2e-3, beta=1 / 200e6, timeline=tl)
    moecc.distributed.comm.use_transport(tr)      # the EP runtime's collectives now go through tr
    p = tr.all_to_all(t, send, recv, group, "layer0 dispatch[1]", async_op=True)   # returns at once
    ... compute ...
    y = p.wait()

Each call takes  alpha + beta * bytes  of wall time, bytes = max(bytes this rank sends to other
ranks, bytes it receives from them) (its own rows cost nothing, as in moecc.distributed.costmodel):
the real exchange runs first, then the call sleeps until that time has passed since it started (a
sleep, not CPU work; a real exchange slower than the model is not shortened, and counts as `late`).
Calls run in issue order on one background thread, so compute on the calling thread proceeds while
they are in flight, as on an accelerator's communication stream; every collective of the group must
go through the transport while it is in use (one thread issues them all, in the same order on every
rank). Each call is recorded as a "comm" interval on the timeline. Forward only (no autograd).
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
    """A collective queued or in flight; wait() -> the received tensor (re-raises its error)."""

    def __init__(self, future: Future, where: str):
        self._f, self.where = future, where

    def wait(self) -> Tensor:
        return self._f.result()


class DelayedTransport:
    """Install with moecc.distributed.comm.use_transport(tr): the EP runtime's every collective
    (all_to_all and the all_gather of split sizes) then runs here, delayed, in issue order."""

    def __init__(self, alpha: float, beta: float, timeline: Timeline | None = None):
        if not (alpha >= 0 and beta >= 0):
            raise ValueError(f"delayed transport: alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.timeline = timeline
        self.calls = 0
        self.late = 0                       # calls whose real exchange outlasted the model
        self._q: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="moecc-delayed-a2a", daemon=True)
        self._worker.start()

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

    def all_gather(self, vec: Tensor, group, where: str) -> Tensor:
        """vec [n] -> [W, n], synchronous; bytes: what the other ranks send this one."""
        W = dist.get_world_size(group)
        vec = vec.contiguous()

        def run():
            out = [torch.empty_like(vec) for _ in range(W)]
            dist.all_gather(out, vec, group=group)
            return torch.stack(out)
        return self._submit(run, self.model_time((W - 1) * vec.numel() * vec.element_size()),
                            group, where).wait()

    def close(self) -> None:
        self._q.put(None)
        self._worker.join(timeout=5)

    def _submit(self, run, model: float, group, where: str) -> DelayedPending:
        f: Future = Future()
        self._q.put((f, run, model, group, where))
        return DelayedPending(f, where)

    def _loop(self) -> None:
        from moecc.distributed.comm import _run            # errors name the rank and the layer
        while True:
            item = self._q.get()
            if item is None:
                return
            f, run, model, group, where = item
            t0 = time.perf_counter()
            try:
                out = _run(where, group, run)
                left = model - (time.perf_counter() - t0)
                if left > 0:
                    time.sleep(left)
                else:
                    self.late += 1
            except BaseException as e:      # noqa: BLE001  (delivered to the waiting thread)
                f.set_exception(e)
                continue
            self.calls += 1
            if self.timeline is not None:
                self.timeline.add("comm", where, t0, time.perf_counter())
            f.set_result(out)
