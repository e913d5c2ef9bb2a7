"""Load `path/to/file.py:factory` or `package.module:factory`; the factory returns (model, example_inputs)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import MoeccError


def load_factory(ref: str):
    if ":" not in ref:
        raise MoeccError(f"MODEL {ref!r} must look like path/to/file.py:factory or package.module:factory")
    where, name = ref.rsplit(":", 1)
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.exists():
            raise MoeccError(f"model file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"moecc_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise MoeccError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise MoeccError(f"cannot import module {where!r}: {type(e).__name__}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise MoeccError(f"{where} has no callable {name!r}")
    return factory


def tokenizer_of(factory) -> object:
    """The `tokenize(lines) -> example inputs` defined beside a factory (for text calibration), or None."""
    return getattr(factory, "__globals__", {}).get("tokenize")


def tokenizer_for(ref: str):
    return tokenizer_of(load_factory(ref))


def load_model(ref: str, with_tokenizer: bool = False):
    """(model, example_inputs) from the factory, checked; `with_tokenizer`: (model, inputs, tokenize)."""
    import torch
    factory = load_factory(ref)
    try:
        result = factory()
    except Exception as e:
        raise MoeccError(f"factory {ref} raised {type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise MoeccError(f"factory {ref} must return (model: nn.Module, example_inputs: tuple), "
                         f"got {type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise MoeccError(f"factory {ref} must return (model, example_inputs) with example_inputs a tensor or a "
                         f"non-empty tuple of tensors, got {type(inputs).__name__}")
    if with_tokenizer:
        return model, tuple(inputs), tokenizer_of(factory)
    return model, tuple(inputs)
