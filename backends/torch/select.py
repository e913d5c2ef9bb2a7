"""MoE-aware kernel selection for the PyTorch backend: cost model, autotuning, run-time dispatch.

    choose(spec, tokens, candidates) -> KernelChoice      checker → cost model (or a tuned table)
    autotune(spec, candidates) -> layer table             measure each candidate once per bucket
    install(tables) / install_file(path) ; dispatch(spec, tokens) -> kernel   what "torch.auto" runs
    run_experts(kernel, xt, ids, weights, w_in, w_out, b_in, b_out, spec)    an experts node's kernel
    run(kernel, x, logits, ..., token_ids, spec)         a moe node: route, run_experts, shared expert

`moecc.ops` calls run_experts / run for a kernel named by string (the IR never imports a backend).

An artifact wires it as: lower → `save({spec_key(s): autotune(s)}, dir / "kernels.json")` and the
layers' kernel "torch.auto" (`choose(spec, 0)`); runtime → `install_file(dir / "kernels.json")`.

Token counts fall in buckets (decode … prefill): T ≤ 1, ≤ 8, ≤ 64, ≤ 512, > 512, measured at
T = 1, 8, 64, 512, 2048. A layer table is JSON ({"spec", "buckets": [{"max_tokens", "tokens",
"kernel", "times_ms"}]}); `save`/`load` write and read a file of them keyed by `spec_key` (what an
artifact carries), and autotuning also caches them under ~/.cache/moecc/autotune.json.
"""
from __future__ import annotations

import functools
import hashlib
from contextlib import nullcontext
import json
import os
import pathlib
import torch

from moecc.backends.base import KernelChoice
from moecc.errors import MoeccError
from moecc.ops import route_tokens
from moecc.routing import expected_load, logits_width, route
from moecc.spec import MoESpec

from . import machine, parallel
from .kernels import KERNELS, WORKERS, shared

AUTO = "torch.auto"                        # per call: the kernel chosen for the token-count bucket
BUCKETS = (1, 8, 64, 512, None)            # upper bounds; None = no bound
BUCKET_TOKENS = (1, 8, 64, 512, 2048)      # where each bucket is measured / costed
_installed: dict[str, dict] = {}           # spec_key -> layer table (torch.auto reads these)


def bucket_of(tokens: int) -> int:
    return next(i for i, b in enumerate(BUCKETS) if b is None or tokens <= b)


def spec_key(spec: MoESpec) -> str:
    """Layers with the same math share a table (the layer's name does not matter)."""
    return hashlib.sha1(spec.replace(name="").to_json().encode()).hexdigest()[:16]


def _candidates(candidates) -> list[str]:
    names = list(KERNELS) if candidates is None else [c for c in candidates if c != AUTO]
    unknown = [c for c in names if c not in KERNELS]
    if unknown:
        raise MoeccError(f"unknown torch kernel(s) {unknown}; choose from {', '.join(KERNELS)}")
    return names


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def choose(spec: MoESpec, tokens: int, candidates=None, table: dict | None = None) -> KernelChoice:
    """The kernel for `tokens` tokens: a tuned table's measurement if it has this bucket, else the
    cost model's minimum among the candidates whose checker accepts; losers are listed with why.
    No token count (None or 0: it varies at run time) → "torch.auto", dispatching per bucket."""
    if not tokens:
        return _choose_auto(spec, candidates, table)
    names = _candidates(candidates)
    rejected: dict[str, str] = {}
    ok = []
    for name in names:
        verdict = KERNELS[name].checker(spec, tokens)
        if verdict is True:
            ok.append(name)
        else:
            rejected[name] = str(verdict)
    if not ok:
        raise MoeccError(f"MoE layer {spec.name or '?'}: no torch kernel fits T={tokens}: {rejected}")
    layer = spec.name or spec_key(spec)
    entry = _table_entry(table, tokens)
    if entry is not None and any(n in entry["times_ms"] for n in ok):
        times = {n: entry["times_ms"][n] for n in ok if n in entry["times_ms"]}
        best = min(times, key=times.get)
        for n in ok:
            if n != best:
                rejected[n] = (f"measured {times[n]:.3g} ms ({times[n] / times[best]:.2f}x)"
                               if n in times else "not measured in the tuned table")
        return KernelChoice(layer, best, f"autotuned (bucket T<={BUCKETS[bucket_of(tokens)] or 'inf'}): "
                            f"{times[best]:.3g} ms, fastest of {len(times)} measured", rejected)
    costs = {n: KERNELS[n].cost(spec, tokens) for n in ok}
    best = min(costs, key=costs.get)
    for n in ok:
        if n != best:
            rejected[n] = f"cost model {_ms(costs[n])} ({costs[n] / costs[best]:.2f}x)"
    hit, m = expected_load(spec, tokens)
    return KernelChoice(layer, best, f"cost model: {_ms(costs[best])} at T={tokens} "
                        f"(~{hit:.1f} experts hit, ~{m:.1f} tokens each)", rejected)


def _choose_auto(spec: MoESpec, candidates, table: dict | None) -> KernelChoice:
    per_bucket = [choose(spec, t, candidates, table).kernel for t in BUCKET_TOKENS]
    plan = ", ".join(f"T<={b or 'inf'}: {k}" for b, k in zip(BUCKETS, per_bucket))
    return KernelChoice(spec.name or spec_key(spec), AUTO, f"token count varies: dispatch by bucket ({plan})",
                        {})


def cost_table(spec: MoESpec, candidates=None) -> dict:
    """The cost model's layer table (as autotune's, with modelled times): carried in an artifact, so
    the run time dispatches without measuring this machine inside a forward."""
    names = _candidates(candidates)
    buckets = []
    for t in BUCKET_TOKENS:
        times = {n: round(KERNELS[n].cost(spec, t) * 1e3, 6) for n in names if KERNELS[n].checker(spec, t) is True}
        buckets.append({"bucket": bucket_of(t), "max_tokens": BUCKETS[bucket_of(t)], "tokens": t,
                        "kernel": min(times, key=times.get), "times_ms": times})
    return {"spec": spec.to_dict(), "machine": machine.machine_key(), "candidates": names,
            "source": "cost model", "buckets": buckets}


def warm(spec: MoESpec, kernel: str = AUTO) -> None:
    """Resolve every bucket's choice now (at load time) rather than inside the first forward."""
    for b in range(len(BUCKETS)):
        _bucket_choice(spec, b, kernel.partition("@")[2])


def _table_entry(table: dict | None, tokens: int) -> dict | None:
    if not table:
        return None
    i = bucket_of(tokens)
    return next((b for b in table.get("buckets", []) if b.get("bucket") == i), None)


# ---- autotuning ------------------------------------------------------------------------------

def _random_inputs(spec: MoESpec, tokens: int, gen: torch.Generator) -> list:
    """A layer's experts-level inputs (xt, ids, weights, w_in, w_out, b_in, b_out), routed by its router."""
    E, H, R, Fw = spec.num_experts, spec.hidden, spec.in_rows, spec.ffn

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    logits = rnd(tokens, logits_width(spec))
    bias = rnd(E, scale=0.1) if spec.router.kind == "sigmoid_topk" else None
    token_ids = torch.randint(0, 50000, (tokens,), generator=gen) if spec.router.kind == "hash" else None
    weights, ids = route(logits, spec, bias, token_ids)
    return [rnd(tokens, H), ids, weights, rnd(E, R, H, scale=H ** -0.5), rnd(E, H, Fw, scale=Fw ** -0.5),
            rnd(E, R) if spec.expert_bias else None, rnd(E, H) if spec.expert_bias else None]


def measure_kernel(name: str, spec: MoESpec, inputs: list, repeats: int = 3) -> float:
    """Seconds of one call: the fastest of `repeats` after a warm-up (machine.best_time)."""
    fn = KERNELS[name].fn
    with torch.inference_mode():
        return machine.best_time(lambda: fn(*inputs, spec=spec), repeats)


def autotune(spec: MoESpec, candidates=None, tokens=BUCKET_TOKENS, repeats: int = 3,
             cache: bool = True, seed: int = 0) -> dict:
    """Measure every applicable candidate at each bucket's token count; the layer table."""
    names = _candidates(candidates)
    key = spec_key(spec)
    path = machine.cache_dir() / "autotune.json"
    try:
        cached = load(path).get(key) if cache and path.exists() else None
    except MoeccError:
        cached = None                                    # a broken cache is re-measured
    if cached and cached.get("machine") == machine.machine_key() and set(cached.get("candidates", [])) >= set(names):
        return cached
    gen = torch.Generator().manual_seed(seed)
    buckets = []
    for t in tokens:
        inputs = _random_inputs(spec, t, gen)
        times = {n: round(measure_kernel(n, spec, inputs, repeats) * 1e3, 4) for n in names
                 if KERNELS[n].checker(spec, t) is True}
        buckets.append({"bucket": bucket_of(t), "max_tokens": BUCKETS[bucket_of(t)], "tokens": t,
                        "kernel": min(times, key=times.get), "times_ms": times})
    table = {"spec": spec.to_dict(), "machine": machine.machine_key(), "candidates": names,
             "buckets": buckets}
    if cache:
        save({key: table}, path, merge=True)
    return table


def save(tables: dict, path, merge: bool = False) -> pathlib.Path:
    """Write {spec_key: layer table} as JSON (merged with what the file holds if `merge`)."""
    path = pathlib.Path(path)
    data = load(path) if merge and path.exists() else {}
    data.update(tables)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"version": 1, "tables": data}, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def load(path) -> dict:
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MoeccError(f"cannot read kernel table {path}: {e}") from None
    if data.get("version") != 1 or not isinstance(data.get("tables"), dict):
        raise MoeccError(f"{path} is not a moecc kernel table (version 1)")
    return data["tables"]


# ---- run-time dispatch ("torch.auto") --------------------------------------------------------

def table_id(table: dict) -> str:
    """Content address of a layer table: two artifacts' tables never share a key unless equal."""
    return hashlib.sha1(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]


def install(tables: dict) -> None:
    """Make torch.auto use these tuned tables, e.g. an artifact's file: {table_id: table}, read by
    the kernel "torch.auto@<table_id>" (per artifact), or legacy {spec_key: table}, read by plain
    "torch.auto" (process-wide, by shape)."""
    _installed.update(tables)
    _bucket_choice.cache_clear()


def install_layer(table: dict) -> str:
    """Install one layer table under its content address; the kernel name that dispatches with it."""
    key = table_id(table)
    install({key: table})
    return f"{AUTO}@{key}"


def install_file(path) -> bool:
    """Install an artifact's kernel tables (`kernels.json`) if it has one; whether it had."""
    path = pathlib.Path(path)
    if path.exists():
        install(load(path))
    return path.exists()


def uninstall() -> None:
    _installed.clear()
    _bucket_choice.cache_clear()


@functools.lru_cache(maxsize=1024)
def _bucket_choice(spec: MoESpec, bucket: int, table: str) -> str:
    """Keyed by the (frozen, hashable) spec itself: hashing it costs ~1 µs, spec.to_json() ~45 µs."""
    return choose(spec, BUCKET_TOKENS[bucket], table=_installed.get(table or spec_key(spec))).kernel


def dispatch(spec: MoESpec, tokens: int, kernel: str = AUTO) -> str:
    """The kernel `kernel` ("torch.auto" or "torch.auto@<table_id>") runs for this call: the
    table's choice for the token-count bucket, else the cost model's at the bucket's token count
    (cached per spec, bucket and table); a kernel whose checker refuses this exact count falls back
    to torch.grouped_gemm."""
    kernel = _bucket_choice(spec, bucket_of(tokens), kernel.partition("@")[2])
    return kernel if KERNELS[kernel].checker(spec, tokens) is True else "torch.grouped_gemm"


def _known(kernel: str, spec: MoESpec) -> str:
    if not kernel.startswith(AUTO) and kernel not in KERNELS:
        raise MoeccError(f"MoE layer {spec.name or '?'}: unknown torch kernel {kernel!r}; choose one of "
                         f"{', '.join([*KERNELS, AUTO])} or 'reference'")
    return kernel


def run_experts(kernel: str, xt, ids, weights, w_in, w_out, b_in, b_out, *, spec: MoESpec) -> torch.Tensor:
    """What `moecc.ops.run_experts_kernel` calls for a torch kernel name (AUTO: by token-count bucket)."""
    if _known(kernel, spec).startswith(AUTO):          # "torch.auto" or "torch.auto@<table_id>"
        kernel = dispatch(spec, xt.shape[0], kernel)
    if xt.numel() == 0:
        return torch.zeros_like(xt)
    with parallel.section() if kernel in WORKERS else nullcontext():
        return KERNELS[kernel].fn(xt, ids, weights, w_in, w_out, b_in, b_out, spec=spec)


def run(kernel: str, x, logits, w_in, w_out, b_in, b_out, router_bias, shared_w_in, shared_w_out,
        shared_gate, token_ids, *, spec: MoESpec) -> torch.Tensor:
    """A moe node with a torch kernel (what `moecc.ops.run_kernel` calls): route (recorded), the
    experts kernel, the shared expert added last; [..., H] -> [..., H]."""
    if _known(kernel, spec) and x.numel() == 0:
        return torch.zeros_like(x)
    if kernel.startswith(AUTO):
        kernel = dispatch(spec, x.numel() // x.shape[-1], kernel)
    with parallel.section() if kernel in WORKERS else nullcontext():    # routing at one thread too
        xt, weights, ids = route_tokens(x, logits, router_bias, token_ids, spec)   # [T, H], [T, S], [T, S]
        y = run_experts(kernel, xt, ids, weights, w_in, w_out, b_in, b_out, spec=spec)
        if shared_w_in is not None and xt.numel():
            shared(y, xt, shared_w_in, shared_w_out, shared_gate, spec)
    return y.reshape(x.shape)
