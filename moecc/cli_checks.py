"""The CLI's early checks: every flag a command can judge without the model, judged before capture.

    check_compile(args)             numbers, router, kernel, layer lists, calibration path, --out
    check_out_path(path, force, what)  an output file or directory that can be written, and is not
                                       silently overwritten (bench, trace, plan, compile)

Each failure is one MoeccError line (exit 2) naming the flag and what to do; nothing has started yet.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import MoeccError

BACKEND_KERNELS = {"torch": "moecc.backends.torch.kernels", "onnx": "moecc.backends.onnx.kernels",
                   "tvm": "moecc.backends.tvm.kernels"}


def check_writable(path: Path, flag: str = "--out") -> None:
    """`path` can be created: no ancestor is a file, the nearest existing ancestor is a writable dir."""
    path = Path(path)
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    for p in [path.absolute(), *path.absolute().parents]:
        if p.exists() and not p.is_dir() and p != path.absolute():
            raise MoeccError(f"{flag} {path}: {p} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoeccError(f"{flag} {path}: cannot write in {parent} (permission denied); choose another place")


def check_out_dir(path: Path, force: bool, flag: str = "--out") -> None:
    """An output directory: writable, not a file, existing only with --force."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MoeccError(f"{flag} {path} is a file, not a directory; remove it or choose another {flag}")
    if path.exists() and not force:
        raise MoeccError(f"{flag} {path} already exists; pass --force to replace it")
    check_writable(path, flag)


def check_out_file(path: Path, force: bool, flag: str = "--out") -> None:
    """An output file: writable, not a directory, existing only with --force."""
    path = Path(path)
    if path.is_dir():
        raise MoeccError(f"{flag} {path} is a directory; give a file name")
    if path.exists() and not force:
        raise MoeccError(f"{flag} {path} already exists; pass --force to replace it")
    check_writable(path, flag)


def positive(value, flag: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise MoeccError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_layers(text: str | None, flag: str, names_allowed: bool = False) -> None:
    """The syntax of a layer list (all | every-N | 0,2,5); the model's count is checked by the pass."""
    if text is None or text.strip() == "all":
        return
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if names_allowed and not text.startswith("every-") and not all(p.isdigit() for p in parts):
        return                        # layer names: the route pass matches them against the model
    from .passes.moe_rewrite import select_layers
    try:
        select_layers(text, 1 << 30)
    except MoeccError as e:
        raise MoeccError(str(e).replace("--layers", flag, 1)) from None
    if not parts:
        raise MoeccError(f"{flag} {text!r}: use all, every-N, or a list like 0,2,5")


def check_kernel(kernel: str | None, backend: str) -> None:
    if not kernel:
        return
    import importlib
    names = list(importlib.import_module(BACKEND_KERNELS[backend]).KERNELS)
    if backend == "torch":
        names.append("torch.auto")
    if kernel not in names:
        raise MoeccError(f"--kernel {kernel!r} is not a {backend} kernel; choose one of {', '.join(names)}")


def check_router(router: str | None) -> None:
    if router is None:
        return
    from .routing import ROUTER_HELP, kind_of
    if kind_of(str(router)).replace("_", "-") not in ROUTER_HELP:
        raise MoeccError(f"--router {router!r} is unknown; choose one of {', '.join(ROUTER_HELP)} "
                         "(moecc inspect --routers)")


def check_calibration(source: str | None) -> None:
    """A calibration file must exist and be readable; `corpus:NAME` is resolved by the moefy pass."""
    if source is None or source.startswith("corpus:"):
        return
    path = Path(source)
    if not path.exists():
        raise MoeccError(f"--calibration {source}: no such file")
    if path.is_dir() or not os.access(path, os.R_OK):
        raise MoeccError(f"--calibration {source}: not a readable file")


def check_compile(a) -> None:
    """Everything `moecc compile` can check before loading the model."""
    from .backends import NAMES
    if a.backend not in NAMES:
        raise MoeccError(f"unknown backend {a.backend!r}; choose one of {', '.join(NAMES)}")
    if a.upcycle is not None and a.moefy is not None:
        raise MoeccError("choose one of --upcycle and --moefy")
    if a.heal:
        from .passes.moefy_heal import check_steps
        check_steps(a.heal)
        if a.moefy is None:
            raise MoeccError("--heal trains a MoEfied model towards the dense one: use it with --moefy E")
    if a.ep and a.backend != "torch":
        raise MoeccError(f"--ep runs on torch.distributed: use --to torch (not {a.backend})")
    if a.ep is not None and a.ep < 1:
        raise MoeccError(f"--ep must be >= 1 ranks, got {a.ep}")
    if a.placement is not None and not a.ep:
        raise MoeccError("--placement needs --ep N (the number of ranks)")
    if a.overlap_degree is not None and not a.ep:
        raise MoeccError("--overlap-degree needs --ep N (the number of ranks)")
    experts = a.upcycle if a.upcycle is not None else a.moefy
    if experts is not None:
        from .passes.upcycle import check_experts
        check_experts(experts, 2 if a.top_k is None else a.top_k)
    elif a.top_k is not None and a.top_k < 1:
        raise MoeccError(f"--top-k must be >= 1, got {a.top_k}")
    positive(a.capacity_factor, "--capacity-factor")
    positive(a.tolerance, "--tolerance")
    positive(a.shared, "--shared", allow_zero=True)
    for flag, value in (("--n-groups", a.n_groups), ("--topk-groups", a.topk_groups)):
        if value is not None and value < 1:
            raise MoeccError(f"{flag} must be >= 1, got {value}")
    if a.n_groups and a.topk_groups and a.topk_groups > a.n_groups:
        raise MoeccError(f"--topk-groups {a.topk_groups} exceeds --n-groups {a.n_groups}")
    if a.method not in ("cluster", "coactivation"):
        raise MoeccError(f"--method {a.method!r}: choose cluster or coactivation")
    check_router(a.router)
    check_kernel(a.kernel, a.backend)
    check_layers(a.layers, "--layers")
    check_layers(a.route_layers, "--route-layers", names_allowed=True)
    if a.moefy is not None or a.calibration is not None:
        check_calibration(a.calibration)
    if a.autotune and a.backend != "torch":
        raise MoeccError(f"--autotune measures the torch kernels only; --to {a.backend} chooses its kernels "
                         "by cost model (drop --autotune)")
    trials = getattr(a, "tune_trials", None)
    if trials is not None and a.backend != "tvm":
        raise MoeccError(f"--tune-trials tunes the TVM expert GEMMs only; --to {a.backend} has no TVM kernels "
                         "(drop --tune-trials or compile with --to tvm)")
    if trials is not None and trials < 0:
        raise MoeccError(f"--tune-trials must be >= 0, got {trials}")
    if a.autotune and a.kernel:
        raise MoeccError("--autotune and --kernel contradict each other: --kernel forces one kernel")
    if a.passes:
        from .passes import REGISTRY
        unknown = [n.strip() for n in a.passes.split(",") if n.strip() and n.strip() not in REGISTRY]
        if unknown:
            raise MoeccError(f"--passes: unknown pass {unknown[0]!r}; available: {', '.join(REGISTRY)}")
    from .artifact import check_out_dir as check_artifact_dir
    check_out_dir(a.out, True, "--out")           # a file, unwritable place, file ancestor
    check_artifact_dir(a.out, a.force)            # existing / not an artifact (--force rules)
