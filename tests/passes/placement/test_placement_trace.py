"""Trace format: round trips, validation with the conflicting numbers named, records, windows."""
import json

import numpy as np
import pytest
import torch

from moecc.errors import MoeccError
from moecc.passes.placement.trace import (Trace, check_against_model, from_records, load_trace,
                                          save_trace)
from moecc.passes.placement.synthetic import synthetic_trace


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_round_trip(tmp_path, suffix):
    t = synthetic_trace(layers=3, experts=8, top_k=2, tokens=16, windows=2, seed=3)
    save_trace(t, tmp_path / f"t{suffix}")
    back = load_trace(tmp_path / f"t{suffix}")
    assert back.layers == t.layers and back.num_experts == 8
    np.testing.assert_array_equal(back.expert_ids, t.expert_ids)
    np.testing.assert_array_equal(back.window, t.window)
    np.testing.assert_allclose(back.weights, t.weights, atol=1e-6)


def test_hand_written_json(tmp_path):
    doc = {"format": "moecc.trace/1", "num_experts": 4, "layers": ["a", "b"], "window": [0, 0, 1],
           "expert_ids": [[[0, 1], [2, 3], [0, 3]], [[1, 2], [1, 0], [3, 2]]],
           "weights": [[[0.6, 0.4]] * 3, [[0.5, 0.5]] * 3]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    t = load_trace(tmp_path / "t.json")
    assert (t.num_layers, t.num_tokens, t.top_k, t.windows()) == (2, 3, 2, [0, 1])
    np.testing.assert_array_equal(t.load(), [[2, 1, 1, 2], [1, 2, 2, 1]])
    assert t.select(1).num_tokens == 1


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(expert_ids=[[[0, 9]]]), "expert id 9 is outside 0..3"),
    (lambda d: d.update(window=[0, 1]), "window has 2 entries but the trace has 1 tokens"),
    (lambda d: d.update(weights=[[[1.0]]]), "weights have shape (1, 1, 1) but expert_ids (1, 1, 2)"),
    (lambda d: d.update(layers=["a", "b"]), "2 layer names for 1 layers"),
    (lambda d: d.pop("num_experts"), "lacks num_experts"),
    (lambda d: d.update(format="other/2"), "format 'other/2'"),
])
def test_bad_files_name_the_numbers(tmp_path, change, message):
    doc = {"format": "moecc.trace/1", "num_experts": 4, "window": [0],
           "expert_ids": [[[0, 1]]], "weights": [[[0.5, 0.5]]]}
    change(doc)
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(MoeccError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_trace(tmp_path / "t.json")


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(MoeccError, match="no such file"):
        load_trace(tmp_path / "nope.npz")
    t = synthetic_trace(layers=1, experts=4, top_k=1, tokens=4, windows=1)
    with pytest.raises(MoeccError, match="unknown file type '.csv'"):
        save_trace(t, tmp_path / "t.csv")


def test_model_disagreement_names_both_numbers():
    t = synthetic_trace(layers=3, experts=8, top_k=2, tokens=8, windows=1)
    check_against_model(t, 3, 8)
    with pytest.raises(MoeccError, match="trace has E=8 experts per layer but the model has E=16"):
        check_against_model(t, 3, 16)
    with pytest.raises(MoeccError, match="trace has 3 MoE layers but the model has 4"):
        check_against_model(t, 4, 8)


def test_from_records_concatenates_calls_and_splits_windows():
    rec = lambda name, ids: {"layer": name, "expert_ids": torch.tensor(ids),
                             "weights": torch.ones(len(ids), 2) / 2}
    records = [rec("l0", [[0, 1], [2, 3]]), rec("l1", [[1, 0], [3, 2]]),
               rec("l0", [[1, 2], [0, 3]]), rec("l1", [[2, 1], [3, 0]])]
    t = from_records(records, num_experts=4, windows=2)
    assert t.layers == ("l0", "l1") and t.num_tokens == 4
    np.testing.assert_array_equal(t.expert_ids[0], [[0, 1], [2, 3], [1, 2], [0, 3]])
    np.testing.assert_array_equal(t.window, [0, 0, 1, 1])
    with pytest.raises(MoeccError, match=r"different token counts \{'l0': 4, 'l1': 2\}"):
        from_records(records[:3], num_experts=4)


def test_dropped_choices_count_nowhere():
    t = Trace(np.array([[[0, -1], [1, 0]]]), np.ones((1, 2, 2)), np.zeros(2), 2)
    np.testing.assert_array_equal(t.load(), [[2, 1]])
    with pytest.raises(MoeccError, match="expert id -2"):
        Trace(np.array([[[0, -2]]]), np.ones((1, 1, 2)), np.zeros(1), 2)
