"""scripts/: small diagnostics that ship with the repository (run on a tiny model here)."""

from __future__ import annotations

import importlib.util
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
                 "swapped": "a large blue square to the left of a red circle", "empty": ""}
    for kind in ("flipped", "swapped"):  # each change undoes itself
        assert rs.caption_variants(v[kind])[kind] == v["true"]
    assert rs.caption_variants("a cyan diamond above a pink circle")["flipped"] == "a cyan diamond below a pink circle"
    with pytest.raises(ValueError):
        rs.caption_variants("a red circle and a blue square")


def test_relation_sensitivity_runs_and_is_deterministic(tiny_run):
    rs = load_script("relation_sensitivity")
    first = rs.relation_sensitivity(str(tiny_run), scenes=4)
    assert list(first) == list(rs.TIMES)
    assert all(set(r) == {"true", "flipped", "swapped", "empty"} for r in first.values())
    assert all(math.isfinite(x) and x > 0 for r in first.values() for x in r.values())
    assert rs.relation_sensitivity(str(tiny_run), scenes=4) == first
