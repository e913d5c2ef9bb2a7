"""Issue 15 item 11: user model files load as Python modules do (dataclasses with postponed
annotations), leave sys.path as it was, and run once per process."""
import sys

from moecc.cli import main
from moecc.loader import load_factory, load_model

REF = "tests/user_dataclass_model.py:build"


def test_dataclass_with_postponed_annotations_loads(root, monkeypatch):
    monkeypatch.chdir(root)
    model, (x,) = load_model(REF)
    assert model(x).shape == x.shape


def test_sys_path_is_left_as_it_was(root, monkeypatch):
    monkeypatch.chdir(root)
    before = list(sys.path)
    load_model(REF)
    load_factory("samples/tiny_gpt.py:build")
    assert sys.path == before


def test_model_file_runs_once(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(root)
    log = tmp_path / "imports"
    monkeypatch.setenv("MOECC_TEST_IMPORT_LOG", str(log))
    for name in [k for k in sys.modules if k.startswith("moecc_user_user_dataclass_model")]:
        monkeypatch.delitem(sys.modules, name)
    load_factory(REF)
    load_model(REF)
    assert main(["inspect", REF]) == 0
    assert log.read_text().splitlines() == ["imported"]
