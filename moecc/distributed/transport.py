"""A test transport: torch.distributed's all-to-all (gloo on 127.0.0.1) delayed to an α–β model, so
overlap can be measured on a machine whose cores cannot show it with real sockets.

    tr = DelayedTransport(alpha=2e-3, beta=1 / 200e6, group=None, timeline=tl)
    pending = tr.all_to_all_async(t, send, recv, where="layer0 dispatch[1]")   # returns at once
    ... compute ...
    y = pending.wait()
    tr.all_to_all(t, send, recv)                                                # = async + wait

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

import torch.distributed as dist
from torch import Tensor

from moecc.distributed.timeline import Timeline


class DelayedPending:
    """An all-to-all queued or in flight; wait() -> the received tensor (re-raises its error)."""

    def __init__(self, future: Future, where: str):
        self._f, self.where = future, where

    def wait(self) -> Tensor:
        return self._f.result()


class DelayedTransport:
    def __init__(self, alpha: float, beta: float, group=None, timeline: Timeline | None = None):
        if not (alpha >= 0 and beta >= 0):
            raise ValueError(f"delayed transport: alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.group = float(alpha), float(beta), group
        self.timeline = timeline
        self.calls = 0
        self.late = 0                       # calls whose real exchange outlasted the model
        self._q: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="moecc-delayed-a2a", daemon=True)
        self._worker.start()

    def model_time(self, nbytes: float) -> float:
        return self.alpha + self.beta * nbytes

    def all_to_all_async(self, t: Tensor, send: list[int], recv: list[int], group=None,
                         where: str = "all_to_all") -> DelayedPending:
        """t [sum(send), ...] -> [sum(recv), ...] in rank order, delivered at wait()."""
        group = self.group if group is None else group
        rank = dist.get_rank(group)
        row = t.element_size() * math.prod(t.shape[1:])                       # bytes per row
        nbytes = max(sum(send) - send[rank], sum(recv) - recv[rank]) * row
        f: Future = Future()
        self._q.put((f, t.contiguous(), list(send), list(recv), group, where, self.model_time(nbytes)))
        return DelayedPending(f, where)

    def all_to_all(self, t: Tensor, send: list[int], recv: list[int], group=None,
                   where: str = "all_to_all") -> Tensor:
        return self.all_to_all_async(t, send, recv, group, where).wait()

    def close(self) -> None:
        self._q.put(None)
        self._worker.join(timeout=5)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            f, t, send, recv, group, where, model = item
            t0 = time.perf_counter()
            try:
                out = t.new_empty((sum(recv), *t.shape[1:]))
                dist.all_to_all_single(out, t, recv, send, group=group)
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
