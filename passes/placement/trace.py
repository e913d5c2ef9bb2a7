"""Routing traces: which k experts every token chose in every MoE layer, in time windows.

    Trace.expert_ids [L, T, k] int32   expert id chosen by token t in MoE layer l (slot j of its top-k);
                                       -1 = a choice dropped (expert over capacity): computed nowhere
    Trace.weights    [L, T, k] float32 the router weight of that choice
    Trace.window     [T]       int32   the time window token t belongs to (0, 1, ...; planning uses
                                       window i, scoring window i+1)

Token t is the same token in every layer (it passes all L MoE layers in order), which is what lets the
metrics count the moves of a token's hidden state between consecutive layers.

Files (documented in README.md): `.npz` with the arrays above plus `layers` [L] (str), `num_experts`
(scalar) and `format` = "moecc.trace/1"; `.json` with the same keys, arrays as nested lists.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moecc.errors import MoeccError
from moecc.npz import load_npz

FORMAT = "moecc.trace/1"


@dataclass(frozen=True, eq=False)
class Trace:
    """Per MoE layer, per token: the k chosen expert ids and their weights, with a window index."""

    expert_ids: np.ndarray          # [L, T, k] int32
    weights: np.ndarray             # [L, T, k] float32
    window: np.ndarray              # [T] int32
    num_experts: int
    layers: tuple[str, ...] = field(default=())

    def __post_init__(self):
        ids = np.ascontiguousarray(self.expert_ids, dtype=np.int32)
        if ids.ndim != 3:
            raise MoeccError(f"trace: expert_ids must be [layers, tokens, k], got shape {ids.shape}")
        L, T, k = ids.shape
        w = np.ascontiguousarray(self.weights, dtype=np.float32)
        if w.shape != ids.shape:
            raise MoeccError(f"trace: weights have shape {w.shape} but expert_ids {ids.shape}")
        win = np.ascontiguousarray(self.window, dtype=np.int32)
        if win.shape != (T,):
            raise MoeccError(f"trace: window has {win.size} entries but the trace has {T} tokens")
        E = int(self.num_experts)
        if E < 1:
            raise MoeccError(f"trace: num_experts must be >= 1, got {E}")
        if ids.size and (ids.min() < -1 or ids.max() >= E):
            bad = int(ids.max()) if ids.max() >= E else int(ids.min())
            raise MoeccError(f"trace: expert id {bad} is outside 0..{E - 1} (num_experts={E}; -1 "
                             "marks a dropped choice)")
        if k > E:
            raise MoeccError(f"trace: top-k={k} exceeds num_experts={E}")
        if win.size and win.min() < 0:
            raise MoeccError(f"trace: window indices must be >= 0, got {int(win.min())}")
        names = tuple(str(n) for n in self.layers) or tuple(f"layer{i}" for i in range(L))
        if len(names) != L:
            raise MoeccError(f"trace: {len(names)} layer names for {L} layers of expert ids")
        for name, arr in (("expert_ids", ids), ("weights", w), ("window", win)):
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "num_experts", E)
        object.__setattr__(self, "layers", names)

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    def windows(self) -> list[int]:
        """The window indices present, in order."""
        return [int(w) for w in np.unique(self.window)]

    def select(self, window: int) -> "Trace":
        """The tokens of one window (same layers and experts)."""
        keep = self.window == window
        if not keep.any():
            raise MoeccError(f"trace: no tokens in window {window} (windows present: {self.windows()})")
        return Trace(self.expert_ids[:, keep], self.weights[:, keep], self.window[keep],
                     self.num_experts, self.layers)

    def load(self) -> np.ndarray:
        """[L, E] tokens routed to each expert (one per (token, expert) pair)."""
        L, E = self.num_layers, self.num_experts
        ids = self.expert_ids.reshape(L, -1)
        flat = np.where(ids >= 0, ids + (np.arange(L, dtype=np.int64) * E)[:, None], L * E)
        return np.bincount(flat.ravel(), minlength=L * E + 1)[:-1].reshape(L, E).astype(np.float64)


def check_against_model(trace: Trace, num_layers: int | None, num_experts: int | None) -> None:
    """Raise if the trace and the model disagree on the number of MoE layers or experts."""
    if num_experts is not None and num_experts != trace.num_experts:
        raise MoeccError(f"trace has E={trace.num_experts} experts per layer but the model has "
                         f"E={num_experts}")
    if num_layers is not None and num_layers != trace.num_layers:
        raise MoeccError(f"trace has {trace.num_layers} MoE layers but the model has {num_layers}")


def from_records(records: list[dict], num_experts: int, windows: int = 1) -> Trace:
    """Build a trace from `moecc.ops.record_routing()` records (one per executed MoE layer call).

    Calls of the same layer are concatenated in order; every layer must have seen the same tokens.
    The tokens are split into `windows` consecutive windows of (nearly) equal size.
    """
    if not records:
        raise MoeccError("trace: no MoE layer ran while recording (is the model an MoE model?)")
    per_layer: dict[str, list] = {}
    for r in records:
        per_layer.setdefault(str(r["layer"]), []).append(r)
    ids = [np.concatenate([_np(r["expert_ids"]).reshape(-1, _np(r["expert_ids"]).shape[-1])
                           for r in rs]) for rs in per_layer.values()]
    wts = [np.concatenate([_np(r["weights"]).reshape(-1, _np(r["weights"]).shape[-1])
                           for r in rs]) for rs in per_layer.values()]
    counts = {name: a.shape[0] for name, a in zip(per_layer, ids)}
    if len(set(counts.values())) != 1:
        raise MoeccError(f"trace: MoE layers saw different token counts {counts}; every token must "
                         "pass every MoE layer")
    T = ids[0].shape[0]
    if not 1 <= windows <= T:
        raise MoeccError(f"trace: windows={windows} must be between 1 and the {T} recorded tokens")
    window = (np.arange(T, dtype=np.int64) * windows // T).astype(np.int32)
    return Trace(np.stack(ids), np.stack(wts), window, num_experts, tuple(per_layer))


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write `.npz` (compressed) or `.json`, chosen by the suffix."""
    path = Path(path)
    if path.suffix == ".npz":
        np.savez_compressed(path, format=np.array(FORMAT), num_experts=np.array(trace.num_experts),
                            layers=np.array(trace.layers), expert_ids=trace.expert_ids,
                            weights=trace.weights, window=trace.window)
    elif path.suffix == ".json":
        doc = {"format": FORMAT, "num_experts": trace.num_experts, "layers": list(trace.layers),
               "window": trace.window.tolist(), "expert_ids": trace.expert_ids.tolist(),
               "weights": np.round(trace.weights.astype(np.float64), 6).tolist()}
        path.write_text(json.dumps(doc))
    else:
        raise MoeccError(f"trace: unknown file type {path.suffix!r} for {path} (use .npz or .json)")


def load_trace(path: str | Path) -> Trace:
    """Read a trace written by `save_trace` (or by hand, following README.md)."""
    path = Path(path)
    if not path.exists():
        raise MoeccError(f"trace: no such file {path}")
    try:
        if path.suffix == ".npz":
            doc = load_npz(path, "trace")
        elif path.suffix == ".json":
            doc = json.loads(path.read_text())
        else:
            raise MoeccError(f"trace: unknown file type {path.suffix!r} for {path} (use .npz or .json)")
    except (ValueError, OSError) as e:
        raise MoeccError(f"trace: cannot read {path}: {e}") from None
    missing = [key for key in ("num_experts", "expert_ids", "weights", "window") if key not in doc]
    if missing:
        raise MoeccError(f"trace: {path} lacks {', '.join(missing)} (see the trace format in "
                         "passes/placement/README.md)")
    fmt = str(np.asarray(doc.get("format", FORMAT)))
    if fmt != FORMAT:
        raise MoeccError(f"trace: {path} has format {fmt!r}, expected {FORMAT!r}")
    try:
        ids = np.asarray(doc["expert_ids"], dtype=np.int64)
        weights = np.asarray(doc["weights"], dtype=np.float32)
        window = np.asarray(doc["window"], dtype=np.int64)
    except ValueError as e:
        raise MoeccError(f"trace: {path} has ragged or non-numeric arrays: {e}") from None
    if ids.ndim == 3 and ids.size and ids.max() > np.iinfo(np.int32).max:
        raise MoeccError(f"trace: expert id {int(ids.max())} is too large")
    layers = tuple(str(n) for n in np.asarray(doc.get("layers", []), dtype=str).tolist())
    return Trace(ids, weights, window, int(np.asarray(doc["num_experts"])), layers)
