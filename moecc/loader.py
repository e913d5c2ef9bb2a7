"""Load `path/to/file.py:factory` or `package.module:factory`; the factory returns (model, example_inputs)."""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import MoeccError


@contextlib.contextmanager
def _on_sys_path(directory: Path):
    """The model file's directory on sys.path while its code runs (its own imports), then removed."""
    entry = str(directory)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"moecc_user_{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"


def _import_file(path: Path):
    """Import a model file once per process (registered in sys.modules, as dataclasses and pickling
    need); a file changed since is imported again."""
    path = path.resolve()
    name = _module_name(path)
    stamp = path.stat().st_mtime_ns
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__moecc_mtime__", None) == stamp:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__moecc_mtime__ = stamp
    sys.modules[name] = module
    try:
        with _on_sys_path(path.parent):
            spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, Exception):
            raise MoeccError(f"importing {path} failed: {type(e).__name__}: {e}") from e
        raise
    return module


def load_factory(ref: str):
    if ":" not in ref:
        raise MoeccError(f"MODEL {ref!r} must look like path/to/file.py:factory or package.module:factory")
    where, name = ref.rsplit(":", 1)
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.exists():
            raise MoeccError(f"model file {path} does not exist")
        if not path.is_file():
            raise MoeccError(f"model file {path} is not a file")
        module = _import_file(path)
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
    where = ref.rsplit(":", 1)[0]
    try:
        with _on_sys_path(Path(where).resolve().parent) if where.endswith(".py") or "/" in where \
                else contextlib.nullcontext():
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
