"""Model inputs: which dims are dynamic, their names and dtypes, and fresh inputs of another size."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.export import Dim


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: list           # ints; dynamic dims by name ("batch", "seq"; one name per symbol)

    def to_dict(self) -> dict:
        return asdict(self)


def dynamic_shapes(example_inputs: tuple, dynamic: bool = True):
    """Batch and sequence dims dynamic: every dim of integer inputs (token ids, masks) and every dim
    but the last (hidden) of float inputs; export decides (Dim.AUTO) which stay dynamic."""
    if not dynamic:
        return None
    spec = []
    for t in example_inputs:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            spec.append(None)
        elif t.is_floating_point():
            spec.append({d: Dim.AUTO for d in range(max(t.dim() - 1, 1))})
        else:
            spec.append({d: Dim.AUTO for d in range(t.dim())})
    return tuple(spec)


DIM_NAMES = ("batch", "seq")


def _user_values(program: torch.export.ExportedProgram) -> list[tuple[str, torch.Tensor]]:
    user = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [(name, nodes[name].meta.get("val")) for name in user
            if isinstance(nodes[name].meta.get("val"), torch.Tensor)]


def _static(d) -> int | None:
    """A dim's size when export fixed it (an int, or a SymInt export specialized to a constant)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int
    return int(d) if is_concrete_int(d) else None


def dim_names(program: torch.export.ExportedProgram) -> dict[str, str]:
    """Export symbol ("s52") -> a name by its first position in the user inputs: dim 0 "batch",
    dim 1 "seq", then "dim<i>" (a suffix when another symbol took the name)."""
    names: dict[str, str] = {}
    for _, val in _user_values(program):
        for i, d in enumerate(val.shape):
            if _static(d) is None and str(d) not in names:
                base = DIM_NAMES[i] if i < len(DIM_NAMES) else f"dim{i}"
                taken = set(names.values())
                names[str(d)] = next(n for n in [base] + [f"{base}{k}" for k in range(2, 99)] + [str(d)]
                                     if n not in taken)
    return names


def describe_inputs(program: torch.export.ExportedProgram) -> list[InputSpec]:
    """The user inputs, dynamic dims by name (`dim_names`): inputs sharing a symbol share the name."""
    names = dim_names(program)
    return [InputSpec(name, str(val.dtype).replace("torch.", ""),
                      [_static(d) if _static(d) is not None else names.get(str(d), str(d)) for d in val.shape])
            for name, val in _user_values(program)]


def fresh_inputs(example_inputs: tuple, specs: list[InputSpec], grow: int = 3, seed: int = 1) -> tuple:
    """Inputs like the examples with every dynamic dim changed (+grow on the last dynamic dim,
    +1 on the others), so the token count differs from the example's."""
    g = torch.Generator().manual_seed(seed)
    out, sizes = [], {}
    for t, s in zip(example_inputs, specs):
        dyn = [i for i, d in enumerate(s.shape) if isinstance(d, str)]
        shape = list(t.shape)
        for i in dyn:
            sym = s.shape[i]
            if sym not in sizes:
                sizes[sym] = shape[i] + (grow if i == dyn[-1] else 1)
            shape[i] = sizes[sym]
        if t.is_floating_point():
            out.append((torch.randn(shape, generator=g) * t.std().clamp(min=1e-3) + t.mean()).to(t.dtype))
        elif t.dtype == torch.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        else:
            lo, hi = int(t.min()), int(t.max())
            out.append(torch.randint(lo, hi + 1, shape, generator=g, dtype=t.dtype))
    return tuple(out) + tuple(example_inputs[len(specs):])
