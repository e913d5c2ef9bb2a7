"""Issue 15 item 15: placement flags that used to be accepted silently are refused in one line."""
import numpy as np
import pytest

from moecc.cli import main
from moecc.passes.placement import save_trace
from moecc.passes.placement.synthetic import synthetic_trace


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "trace.npz"
    save_trace(synthetic_trace(layers=2, experts=32, top_k=4, tokens=200, windows=2, topics=8, affinity=4.0,
                               seed=0), path)
    return path


def _fails(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moecc: error:") and msg in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("args,msg", [
    (["--method", "eplb", "--topology", "2x4:slots=10", "--replicas", "16", "--local-replicas", "4"],
     "--local-replicas applies to --method graph only"),
    (["--method", "graph", "--topology", "4x4:slots=10", "--replicas", "16", "--local-replicas", "2"],
     "too small for one node-local expert"),
    (["--method", "graph", "--topology", "1x8:slots=10", "--replicas", "16", "--local-replicas", "4"],
     "needs a topology of 2 or more nodes"),
])
def test_placement_flags_refused(args, msg, trace_file, tmp_path, capsys):
    _fails(["plan", "--trace", str(trace_file), *args, "--out", str(tmp_path / "p.json")], msg, capsys)
    assert not (tmp_path / "p.json").exists()


def test_non_zip_npz_is_named_as_such(tmp_path, capsys):
    bad = tmp_path / "trace.npz"
    bad.write_text("expert_ids,weights\n1,2\n")
    _fails(["plan", "--trace", str(bad), "--topology", "2x4:slots=10", "--replicas", "16",
            "--out", str(tmp_path / "p.json")], "is not an .npz archive (not a zip file)", capsys)
    np.save(tmp_path / "arr.npy", np.zeros(3))
    (tmp_path / "arr.npy").rename(tmp_path / "arr.npz")
    _fails(["plan", "--trace", str(tmp_path / "arr.npz"), "--topology", "2x4:slots=10", "--replicas", "16",
            "--out", str(tmp_path / "p.json")], "is not an .npz archive", capsys)
