"""scripts/: small diagnostics that ship with the repository (run on a tiny model here)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relation_caption_variants():
    rs = load_script("relation_sensitivity")
    v = rs.caption_variants("a red circle to the left of a large blue square")
    assert v == {"true": "a red circle to the left of a large blue square",
                 "flipped": "a red circle to the right of a large blue square",
                 "swapped": "a large blue square to the left of a red circle",
                 "axis": "a red circle above a large blue square", "empty": ""}
    for kind in ("flipped", "swapped"):  # each change undoes itself
        assert rs.caption_variants(v[kind])[kind] == v["true"]
    below = rs.caption_variants("a cyan diamond below a pink circle")
    assert below["flipped"] == "a cyan diamond above a pink circle"
    assert below["axis"] == "a cyan diamond to the right of a pink circle"
    with pytest.raises(ValueError):
        rs.caption_variants("a red circle and a blue square")


def test_relation_sensitivity_runs_and_is_deterministic(tiny_run, tmp_path, capsys):
    rs = load_script("relation_sensitivity")
    first = rs.relation_sensitivity(str(tiny_run), scenes=4)
    assert list(first) == list(rs.TIMES)
    assert all(set(r) == {"true", "flipped", "swapped", "axis", "empty"} for r in first.values())
    assert all(math.isfinite(x) and x > 0 for r in first.values() for x in r.values())
    assert all(r["empty"] != r["true"] for r in first.values())  # each variant is encoded from its own captions
    assert rs.relation_sensitivity(str(tiny_run), scenes=4) == first
    out = tmp_path / "r.json"
    assert rs.main([str(tiny_run), "--scenes", "4", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["loss"] == {str(t): r for t, r in first.items()} and saved["scenes"] == 4
    assert "flipped" in capsys.readouterr().out


def test_relation_sensitivity_bad_input_is_one_line(digits_run, tmp_path, capsys):
    rs = load_script("relation_sensitivity")
    for args in ([str(digits_run)], [str(tmp_path / "nope")]):
        assert rs.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("relation_sensitivity: error:") and err.count("\n") == 1, err
    assert rs.main(["--scenes", "0"]) == 2 and "--scenes must be >= 1" in capsys.readouterr().err
