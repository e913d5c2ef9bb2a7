"""Calibration data for data-driven passes (`moefy`): load it, split the shipped corpus, collect activations.

    --calibration FILE.txt      one example per line → the model's own `tokenize(lines)` → input batches
    --calibration FILE.pt|.npz  tensors (a tensor, a tuple/list, or a dict in insertion order) → one batch
    --calibration corpus:calibration   the shipped corpus's calibration part (corpus:held-out: the rest)
    (GraphModule, batches)      → fx.Interpreter → the input of each matched FFN, x [T, H] (all tokens)

Text lines are grouped by token count and run in batches without padding, so every collected token is
a real one. The shipped corpus (moecc/data/corpus.txt, sentences written for this project) is split
deterministically: a line is held out iff the first 8 hex digits of its sha256, as an integer, are
divisible by HELD_OUT_EVERY; equal lines therefore always land on the same side (no overlap).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import fx

from .errors import MoeccError

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
HELD_OUT_EVERY = 4                     # ≈ 1 line in 4 is held out
MIN_TOKENS_PER_EXPERT = 32             # a router fit needs this many calibration tokens per expert
BATCH_TOKENS = 4096                    # tokens per forward pass while collecting
SHIPPED = ("corpus:calibration", "corpus:held-out")   # --calibration names for the shipped split


@dataclass(frozen=True)
class Calibration:
    batches: tuple                     # tuple of input tuples, each runnable by the model
    examples: int                      # lines (text) or rows of the first tensor
    tokens: int                        # tokens in all batches (text) or elements of the token dims
    sha256: str                        # of the file's bytes (or of the tensors' bytes)
    source: str

    def facts(self) -> dict:
        return {"source": self.source, "examples": self.examples, "tokens": self.tokens,
                "sha256": self.sha256}


def corpus_lines(path: Path = CORPUS) -> list[str]:
    return [s for s in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()) if s]


def is_held_out(line: str) -> bool:
    return int(hashlib.sha256(line.encode("utf-8")).hexdigest()[:8], 16) % HELD_OUT_EVERY == 0


def split_corpus(lines: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(calibration, held_out) lines of the corpus, disjoint, in file order."""
    lines = corpus_lines() if lines is None else list(lines)
    return [s for s in lines if not is_held_out(s)], [s for s in lines if is_held_out(s)]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def from_lines(lines: Sequence[str], tokenize: Callable, source: str = "lines") -> Calibration:
    """Tokenize each line, group equal token counts, batch up to BATCH_TOKENS tokens (no padding)."""
    lines = [s.strip() for s in lines if s.strip()]
    if not lines:
        raise MoeccError(f"calibration {source}: no examples (the file has no non-empty line)")
    by_len: dict[int, list[str]] = {}
    for s in lines:
        ids = tokenize([s])[0]
        by_len.setdefault(int(ids.shape[-1]), []).append(s)
    batches, tokens = [], 0
    for n, group in sorted(by_len.items()):
        step = max(1, BATCH_TOKENS // n)
        for i in range(0, len(group), step):
            batches.append(tuple(tokenize(group[i:i + step])))
            tokens += n * len(group[i:i + step])
    return Calibration(tuple(batches), len(lines), tokens,
                       _digest("\n".join(lines).encode("utf-8")), source)


def from_tensors(tensors, source: str = "tensors") -> Calibration:
    """One batch of inputs given as tensors (the model's positional inputs, in order)."""
    if isinstance(tensors, dict):
        tensors = list(tensors.values())
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = tuple(torch.as_tensor(t) for t in tensors)
    if not tensors or tensors[0].numel() == 0:
        raise MoeccError(f"calibration {source}: no examples (empty tensor)")
    first = tensors[0]
    # token dims: all but the hidden dim of a float input; all dims of token ids
    tokens = first.numel() if not first.is_floating_point() else first.numel() // max(first.shape[-1], 1)
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().cpu().numpy().tobytes())
    return Calibration((tensors,), int(first.shape[0]), int(tokens), h.hexdigest(), source)


def load(source, tokenize: Callable | None = None) -> Calibration:
    """A path (.txt: lines; .pt / .npz: tensors), a list of lines, or tensors -> Calibration."""
    if isinstance(source, Calibration):
        return source
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, str) for s in source):
        return from_lines(source, _need_tokenizer(tokenize, "a list of sentences"), "lines")
    if isinstance(source, (torch.Tensor, tuple, list, dict)):
        return from_tensors(source)
    if isinstance(source, str) and source in SHIPPED:
        lines = split_corpus()[SHIPPED.index(source)]
        return from_lines(lines, _need_tokenizer(tokenize, source), source)
    path = Path(source)
    if not path.is_file():
        raise MoeccError(f"calibration file {path} not found")
    if path.stat().st_size == 0:
        raise MoeccError(f"calibration file {path} is empty")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        try:
            data = torch.load(path, weights_only=True)
        except Exception as e:
            raise MoeccError(f"calibration file {path}: not a torch tensor file ({type(e).__name__})") from None
        cal = from_tensors(data, str(path))
    elif suffix == ".npz":
        from .npz import load_npz
        cal = from_tensors([torch.from_numpy(a) for a in load_npz(path, "calibration file").values()], str(path))
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        cal = from_lines(text.splitlines(), _need_tokenizer(tokenize, str(path)), str(path))
    return Calibration(cal.batches, cal.examples, cal.tokens, _digest(path.read_bytes()), str(path))


def _need_tokenizer(tokenize, what: str) -> Callable:
    if tokenize is None:
        raise MoeccError(f"calibration {what} is text, but the model has no tokenizer: define "
                         "tokenize(lines) -> example inputs beside the model factory, or pass a .pt/.npz "
                         "file of input tensors")
    return tokenize


def require_tokens(cal: Calibration, num_experts: int, what: str = "moefy") -> None:
    need = MIN_TOKENS_PER_EXPERT * num_experts
    if cal.tokens < need:
        raise MoeccError(f"calibration {cal.source} has {cal.tokens} tokens; {what} with E={num_experts} "
                         f"needs at least {need} ({MIN_TOKENS_PER_EXPERT} per expert): add more lines")


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: dict[fx.Node, int], out: list[list]):
        super().__init__(gm)
        self.wanted, self.out = wanted, out

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.wanted:
            self.out[self.wanted[n]].append(value.detach().reshape(-1, value.shape[-1]))
        return value


@torch.no_grad()
def collect(gm: fx.GraphModule, nodes: Sequence[fx.Node], cal: Calibration) -> list[torch.Tensor]:
    """Run every calibration batch through `gm`; the values of `nodes` as [T, last dim] each."""
    wanted = {n: i for i, n in enumerate(nodes)}
    out: list[list] = [[] for _ in nodes]
    for batch in cal.batches:
        try:
            _Recorder(gm, wanted, out).run(*batch)
        except Exception as e:
            raise MoeccError(f"calibration {cal.source}: the model failed on a calibration batch "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                             "the calibration inputs must match the model's inputs") from None
    return [torch.cat(v) for v in out]
