"""Collectives of the expert-parallel runtime, each bounded by the process group's timeout and turned
into one error naming the rank and the layer.

    init(backend, timeout_s, ...) -> group   init_process_group with a timeout (gloo on CPU, nccl on GPU)
    all_to_all(t, send, recv, group, where, async_op) -> Pending   .wait() -> the received rows
    all_to_all_grouped(parts, sends, recvs, ...) -> Grouped      several chunks' exchanges as ONE
                                             all-to-all; .wait() -> the received parts
    agree(vec, group, where) -> [W, n]       every rank's vector, gathered: the numbers that shape
                                             the next collectives, seen identically by all ranks
                                             (async_op=True: Gathered, .wait() -> [W, n])

A collective that fails (a peer died: connection closed; a peer stalls: gloo's timeout) raises
`EPError("rank R: layer L: <phase>: <cause>")`; the launcher prints that line and exits non-zero at
once (no teardown collective that could wait on the dead peer).
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch import Tensor

from moecc.errors import MoeccError

DEFAULT_TIMEOUT_S = 60.0
_TRANSPORT = None       # a test transport every collective goes through (use_transport)


class EPError(MoeccError):
    """An expert-parallel collective failed or the ranks disagree; names the rank and the layer."""


def rank_of(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def fail(where: str, message: str, group=None) -> EPError:
    return EPError(f"rank {rank_of(group)}: {where}: {message}")


def _run(where: str, group, fn):
    try:
        return fn()
    except EPError:
        raise
    except (RuntimeError, dist.DistError) as e:   # DistBackendError, gloo timeouts, closed sockets
        raise fail(where, f"collective failed ({_cause(e)})", group) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, rank: int | None = None,
         world_size: int | None = None, init_method: str | None = None,
         init_timeout_s: float | None = None):
    """init_process_group; returns the group to run the layers on (None = the default group), whose
    collectives each wait at most `timeout_s`. `init_timeout_s` (default timeout_s) bounds forming
    the group (ranks that start seconds apart need more than a collective does); when it differs, a
    second group with timeout_s is made. rank / world size / address default to torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    first = timeout_s if init_timeout_s is None else init_timeout_s
    store = _store(init_method, rank, world_size, first)
    try:
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=first))
        if first == timeout_s:
            return None
        return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, dist.DistError) as e:
        raise EPError(f"rank {rank}: process group of {world_size} ranks did not form within "
                      f"{first:g} s ({_cause(e)})") from None


def _store(init_method: str | None, rank: int, world_size: int, timeout_s: float):
    """The rendezvous store (tcp://HOST:PORT, or env:// = MASTER_ADDR/MASTER_PORT), after every rank
    has posted its world size and all agree: a rank started with another world size is named at
    once on the others (it waits out timeout_s for ranks that never come)."""
    method = init_method or "env://"
    if method.startswith("tcp://"):
        host, port = method[len("tcp://"):].rsplit(":", 1)
    elif method == "env://":
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
    else:
        raise EPError(f"rank {rank}: init method {method!r}: use tcp://HOST:PORT or env://")
    wait = datetime.timedelta(seconds=timeout_s)
    try:
        server = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"  # torchrun
        store = dist.TCPStore(host, int(port), None, server, wait, wait_for_workers=False)
        store.set(f"moecc/world/{rank}", str(world_size))
        keys = [f"moecc/world/{r}" for r in range(world_size)]
        store.wait(keys, wait)            # all posted first: the host rank outlives the others' reads
        for r, key in enumerate(keys):
            other = int(store.get(key))
            if other != world_size:
                raise EPError(f"rank {rank}: rank {r} was started with world size {other}, this rank "
                              f"with {world_size}: start every rank with the same world size")
    except (RuntimeError, ValueError, dist.DistError) as e:
        raise EPError(f"rank {rank}: not all {world_size} ranks joined within {timeout_s:g} s "
                      f"({_cause(e)}); check that every rank was started with the same world size") from None
    return store


def _cause(e: Exception) -> str:
    """The informative part of a gloo/nccl error, one short line."""
    text = " ".join(str(e).split())
    if "closed by peer" in text or "Connection reset" in text:
        return "a peer closed the connection: it died or gave up"
    if "Timed out" in text or "timeout" in text.lower():
        i = max(text.find("Timed out"), text.lower().find("timeout"))
        return text[i:i + 80]
    return (text or type(e).__name__)[:160]


def use_transport(transport):
    """Send every collective of this module through `transport` (all_to_all / all_gather with this
    module's signatures, e.g. moecc.distributed.transport.DelayedTransport); None: torch.distributed
    directly. Returns the previous one."""
    global _TRANSPORT
    prev, _TRANSPORT = _TRANSPORT, transport
    return prev


def agree(vec: Tensor, group, where: str, async_op: bool = False):
    """vec [n] int64 -> [W, n]: every rank's vector (all_gather), identical on all ranks. async_op:
    returns a Gathered in flight (the caller computes meanwhile), wait() -> [W, n]."""
    if _TRANSPORT is not None:
        return _TRANSPORT.all_gather(vec, group, where, async_op)
    W = dist.get_world_size(group)
    vec = vec.to(collective_device(group)).contiguous()
    out = [torch.empty_like(vec) for _ in range(W)]
    work = _run(where, group, lambda: dist.all_gather(out, vec, group=group, async_op=async_op))
    p = Gathered(out, work if async_op else None, group, where)
    return p if async_op else p.wait()


def collective_device(group=None) -> torch.device:
    """Where small control tensors must live for the group's backend (nccl: this rank's GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Pending:
    """An all-to-all in flight: wait() -> the received tensor (errors name rank and layer)."""

    def __init__(self, out: Tensor, work, group, where: str):
        self.out, self._work, self._group, self.where = out, work, group, where

    def done(self) -> bool:
        """Whether wait() would return at once."""
        return self._work is None or self._work.is_completed()

    def wait(self) -> Tensor:
        if self._work is not None:
            work, self._work = self._work, None
            _run(self.where, self._group, work.wait)
        return self.out


class Gathered(Pending):
    """An all_gather in flight: wait() -> [W, n] on the CPU (errors name rank and layer)."""

    def wait(self) -> Tensor:
        return torch.stack(super().wait()).cpu()


def all_to_all(t: Tensor, send: list[int], recv: list[int], group, where: str,
               async_op: bool = False) -> Pending:
    """t [sum(send), ...] -> [sum(recv), ...] (not differentiable: ep.py's autograd Functions wrap
    it): rows send[j] go to rank j, rows recv[j] come from rank j, in rank order. async_op: in
    flight until Pending.wait()."""
    t = t.detach().contiguous()
    if _TRANSPORT is not None:
        return _TRANSPORT.all_to_all(t, send, recv, group, where, async_op)
    out = t.new_empty((sum(recv), *t.shape[1:]))
    work = _run(where, group, lambda: dist.all_to_all_single(out, t, list(recv), list(send),
                                                            group=group, async_op=async_op))
    return Pending(out, work if async_op else None, group, where)


class Grouped:
    """Several parts' all-to-alls in flight as one (all_to_all_grouped): wait() -> the received parts."""

    def __init__(self, pending: Pending, recvs: list[list[int]]):
        self._pending, self._recvs = pending, recvs

    def done(self) -> bool:
        return self._pending.done()

    def wait(self) -> list[Tensor]:
        out = self._pending.wait()
        n, W = len(self._recvs), len(self._recvs[0])
        if n == 1:
            return [out]
        pieces = out.split([self._recvs[i][r] for r in range(W) for i in range(n)])
        return [torch.cat([pieces[r * n + i] for r in range(W)]) for i in range(n)]


def all_to_all_grouped(parts: list[Tensor], sends: list[list[int]], recvs: list[list[int]], group,
                       where: str, async_op: bool = False) -> Grouped:
    """parts[i] [sum(sends[i]), ...] -> [sum(recvs[i]), ...] for every i, in ONE all-to-all (one
    latency for all the parts): to each rank, the parts' rows for it in part order; the bytes are
    the same as the parts' own all-to-alls, and so are the received rows (bit for bit)."""
    W, n = len(sends[0]), len(parts)
    if n == 1:
        buf = parts[0]
    else:
        pieces = [p.detach().split(s) for p, s in zip(parts, sends)]
        buf = torch.cat([pieces[i][r] for r in range(W) for i in range(n)])
    send = [sum(s[r] for s in sends) for r in range(W)]
    recv = [sum(s[r] for s in recvs) for r in range(W)]
    return Grouped(all_to_all(buf, send, recv, group, where, async_op), recvs)
