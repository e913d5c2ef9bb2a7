"""Calibration data: the shipped corpus and its split, loading text/tensor files, collecting FFN inputs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moecc import calibration as calib
from moecc.frontend import capture
from moecc.errors import MoeccError
from sample_loader import load_sample
from moecc.passes.canonicalize import canonicalize
from moecc.passes.ffn_match import find_ffns

ROOT = Path(__file__).resolve().parents[1]


_sample = load_sample


def _words(line: str) -> list[str]:
    return line.lower().split()


def toy_tokenize(lines):
    """A whitespace tokenizer for tests: (ids [B, S], mask [B, S]), padded to the longest."""
    rows = [[hash(w) % 500 + 1 for w in _words(s)] for s in lines]
    n = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    return ids, (ids > 0).long()


def test_corpus_is_large_varied_and_split_without_overlap():
    lines = calib.corpus_lines()
    assert len(lines) >= 600 and len(set(lines)) == len(lines)
    cal, held = calib.split_corpus()
    assert not set(cal) & set(held) and len(cal) + len(held) == len(lines)
    assert 0.15 < len(held) / len(lines) < 0.35
    assert calib.split_corpus() == (cal, held)                       # deterministic
    lengths = [len(_words(s)) for s in lines]
    assert min(lengths) <= 3 and max(lengths) >= 20                  # short and long lines
    assert sum(s.endswith("?") for s in lines) >= 20                 # questions among statements


def test_shipped_split_by_name():
    cal = calib.load("corpus:calibration", toy_tokenize)
    assert cal.examples == len(calib.split_corpus()[0]) and cal.source == "corpus:calibration"
    assert calib.load("corpus:held-out", toy_tokenize).examples == len(calib.split_corpus()[1])


def test_split_is_by_content_so_duplicates_stay_on_one_side():
    lines = ["alpha beta", "gamma", "alpha beta", "delta epsilon", "gamma"] * 3
    cal, held = calib.split_corpus(lines)
    assert not set(cal) & set(held)


def test_text_lines_are_batched_by_length_without_padding():
    lines = ["a b c", "d e", "f g h", "i", "j k"]
    cal = calib.load(lines, toy_tokenize)
    assert cal.examples == 5 and cal.tokens == 3 + 2 + 3 + 1 + 2
    for ids, mask in cal.batches:
        assert bool(mask.all())                                      # no padded token collected
    assert sum(int(ids.numel()) for ids, _ in cal.batches) == cal.tokens


def test_text_file_and_tensor_files(tmp_path):
    txt = tmp_path / "cal.txt"
    txt.write_text("one two three\n\nfour five\n")
    cal = calib.load(str(txt), toy_tokenize)
    assert (cal.examples, cal.tokens, cal.source) == (2, 5, str(txt)) and len(cal.sha256) == 64
    ids = torch.randint(0, 100, (4, 7))
    torch.save((ids, torch.ones_like(ids)), tmp_path / "cal.pt")
    np.savez(tmp_path / "cal.npz", ids.numpy(), np.ones((4, 7), dtype=np.int64))
    for name in ("cal.pt", "cal.npz"):
        cal = calib.load(tmp_path / name)
        assert cal.tokens == 28 and cal.examples == 4
        assert torch.equal(cal.batches[0][0], ids) and len(cal.batches[0]) == 2


def test_bad_calibration_input(tmp_path):
    with pytest.raises(MoeccError, match="not found"):
        calib.load(tmp_path / "nope.txt", toy_tokenize)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MoeccError, match="is empty"):
        calib.load(tmp_path / "empty.txt", toy_tokenize)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(MoeccError, match="no examples"):
        calib.load(tmp_path / "blank.txt", toy_tokenize)
    (tmp_path / "text.txt").write_text("some words\n")
    with pytest.raises(MoeccError, match="no tokenizer"):
        calib.load(tmp_path / "text.txt")
    (tmp_path / "bad.pt").write_text("not a tensor file")
    with pytest.raises(MoeccError, match="not a torch tensor file"):
        calib.load(tmp_path / "bad.pt")
    cal = calib.load(["a b c d"], toy_tokenize)
    with pytest.raises(MoeccError, match=r"has 4 tokens; moefy with E=4 needs at least 128"):
        calib.require_tokens(cal, 4)


def test_collect_gives_each_ffn_input_per_real_token():
    tiny_bert = _sample("tiny_bert")
    model, example = tiny_bert.build()
    c = capture(model, example)
    canonicalize(c.gm)
    matches, _ = find_ffns(c.gm)
    cal = calib.load(["a b c", "d e f", "g h"], lambda lines: toy_tokenize(lines))
    xs = calib.collect(c.gm, [m.x for m in matches], cal)
    assert len(xs) == 3 and all(x.shape == (8, 64) for x in xs)
    # layer 0's FFN input equals the eager module's attention output on the same tokens
    seen = []
    hook = model.layer[0].intermediate.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        for batch in cal.batches:
            model(*batch)
    hook.remove()
    torch.testing.assert_close(xs[0], torch.cat([s.reshape(-1, 64) for s in seen]))


def test_bad_batch_names_the_calibration():
    tiny_bert = _sample("tiny_bert")
    model, example = tiny_bert.build()
    c = capture(model, example)
    cal = calib.load(torch.randint(0, 100, (2, 5)))                   # one input; the model needs two
    with pytest.raises(MoeccError, match="calibration tensors: the model failed"):
        calib.collect(c.gm, [], cal)
