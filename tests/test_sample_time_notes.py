"""The long MoEfication samples say how long they take before starting, and have a --quick mode
(the work itself is replaced here: only the arguments and the note are checked)."""
import pytest


@pytest.mark.parametrize("quick", [False, True])
def test_moefy_ceiling_says_its_time(quick, monkeypatch, tmp_path, capsys):
    import moefy_ceiling
    seen = {}
    monkeypatch.setattr(moefy_ceiling, "run", lambda fractions: seen.setdefault("f", fractions) and {"rows": []})
    monkeypatch.setattr(moefy_ceiling, "table", lambda result: "")
    moefy_ceiling.main(["--out", str(tmp_path / "c")] + (["--quick"] if quick else []))
    err = capsys.readouterr().err
    assert seen["f"] == ([0.25] if quick else [0.125, 0.25, 0.5])
    assert ("about 3 min" in err) and (("about 9 min" in err) != quick), err


@pytest.mark.parametrize("quick", [False, True])
def test_moefy_curve_says_its_time(quick, monkeypatch, tmp_path, capsys):
    import moefy_curve
    seen = {}
    monkeypatch.setattr(moefy_curve, "run", lambda args: seen.setdefault("E", args.experts) and {})
    for name in ("table", "plot"):
        monkeypatch.setattr(moefy_curve, name, lambda *a: "")
    moefy_curve.main(["--out", str(tmp_path / "c")] + (["--quick"] if quick else []))
    err = capsys.readouterr().err
    assert seen["E"] == ([4, 8] if quick else [4, 8, 16, 32])
    assert "about 10 min" in err and (("about 45 min" in err) != quick), err
