"""scripts/: small diagnostics that ship with the repository (run on a tiny model here)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

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


def test_guidance_variants_combine():
    gv = load_script("guidance_variants")
    g = torch.Generator().manual_seed(0)
    x, v_cond, v_uncond = (torch.randn(3, 5, 4, generator=g) for _ in range(3))
    t, scale = 0.7, 4.0
    plain = v_uncond + scale * (v_cond - v_uncond)
    assert torch.equal(gv.combine("plain", 0.0, x, t, v_cond, v_uncond, scale), plain)
    assert torch.allclose(gv.combine("rescale", 0.0, x, t, v_cond, v_uncond, scale), plain)
    rescaled = gv.combine("rescale", 1.0, x, t, v_cond, v_uncond, scale)
    assert torch.allclose(rescaled.flatten(1).std(1), v_cond.flatten(1).std(1), rtol=1e-5)
    assert torch.allclose(gv.combine("apg", 1.0, x, t, v_cond, v_uncond, scale), plain, atol=1e-5)
    # with the parallel part dropped, the guidance is the full orthogonal part of x0_cond - x0_uncond
    x0_cond, x0_uncond = x - t * v_cond, x - t * v_uncond
    x0 = x - t * gv.combine("apg", 0.0, x, t, v_cond, v_uncond, scale)
    assert torch.allclose(((x0 - x0_cond) * x0_cond).flatten(1).sum(1), torch.zeros(3), atol=1e-4)
    diff = x0_cond - x0_uncond
    unit = x0_cond / x0_cond.flatten(1).norm(dim=1).view(-1, 1, 1)
    orthogonal = diff - (diff * unit).flatten(1).sum(1).view(-1, 1, 1) * unit
    assert torch.allclose(x0 - x0_cond, (scale - 1) * orthogonal, atol=1e-4)
    # CFG-Zero* guides from s * v_uncond, the least-squares fit of v_uncond to v_cond: the residual of the
    # fit is orthogonal to v_uncond
    zero = gv.combine("cfg_zero", 0.0, x, t, v_cond, v_uncond, scale)
    fitted = (zero - scale * v_cond) / (1 - scale)
    s = (fitted * v_uncond).flatten(1).sum(1) / (v_uncond * v_uncond).flatten(1).sum(1)
    assert torch.allclose(fitted, s.view(-1, 1, 1) * v_uncond, atol=1e-5)
    assert torch.allclose(((v_cond - fitted) * v_uncond).flatten(1).sum(1), torch.zeros(3), atol=1e-4)
    # early: its own scale from t_from up to pure noise, the model's below
    high = v_uncond + 8.0 * (v_cond - v_uncond)
    assert torch.equal(gv.combine("early", 8.0, x, 0.7, v_cond, v_uncond, scale), high)
    assert torch.equal(gv.combine("early", 8.0, x, 0.69, v_cond, v_uncond, scale), plain)
    assert torch.equal(gv.combine("early", 8.0, x, 0.5, v_cond, v_uncond, scale, t_from=0.4), high)


def test_guidance_variants_plain_reproduces_eval(tiny_run, tmp_path, capsys):
    from omnidit.evaluate.runner import evaluate_model
    from omnidit.pipeline import load_pipeline

    gv = load_script("guidance_variants")
    skip = {"skip_scale": 1.0, "skip_blocks": [0], "skip_interval": [0.5, 1.0]}  # the branch the default uses
    ours = gv.run(str(tiny_run), "plain", 0.0, seed=1, n_per_prompt=1, limit=1, progress=False, **skip)
    theirs = evaluate_model(load_pipeline(str(tiny_run), device="cpu"), "shapes", n_per_prompt=1, seed=1, limit=1,
                            progress=False, frechet=False, **skip)
    assert len(ours.judged) == len(theirs.judged) > 0 and ours.settings["skip_scale"] == 1.0
    assert all(torch.equal(a.image, b.image) for a, b in zip(ours.judged, theirs.judged))
    unskipped = gv.run(str(tiny_run), "plain", 0.0, seed=1, n_per_prompt=1, limit=1, progress=False)
    assert any(not torch.equal(a.image, b.image) for a, b in zip(unskipped.judged, theirs.judged))
    assert ours.overall == theirs.overall and ours.settings["guidance"] == {"variant": "plain", "arg": 0.0}
    other = gv.run(str(tiny_run), "cfg_zero", 0.0, seed=1, n_per_prompt=1, limit=1, progress=False)
    assert any(not torch.equal(a.image, b.image) for a, b in zip(other.judged, theirs.judged))
    out = tmp_path / "g.json"
    assert gv.main(["rescale", "--arg", "0.7", "--model", str(tiny_run), "--limit", "1", "--json", str(out),
                    "--skip-scale", "1", "--skip-blocks", "0", "--skip-interval", "0.5", "1"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["guidance"] == {"variant": "rescale", "arg": 0.7}
    assert (settings["skip_scale"], settings["skip_blocks"], settings["skip_interval"]) == (1.0, [0], [0.5, 1.0])
    assert "overall" in capsys.readouterr().out
    assert gv.main(["plain", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("guidance_variants: error:") and err.count("\n") == 1, err
    assert gv.main(["early", "--model", str(tiny_run), "--t-from", "1.5", "--arg", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("guidance_variants: error:") and err.count("\n") == 1, err


def test_guidance_variants_run_the_video_suite(tmp_path):
    from test_video_cli import _video_checkpoint

    gv = load_script("guidance_variants")
    model = str(_video_checkpoint(tmp_path / "model"))
    common = {"seed": 1, "n_per_prompt": 1, "limit": 1, "progress": False, "suite": "video", "steps": 3}
    early, plain = gv.run(model, "early", 8.0, **common), gv.run(model, "plain", 0.0, **common)
    assert early.settings["guidance"] == {"variant": "early", "arg": 8.0, "t_from": 0.7}
    assert early.suite == "video" and len(early.judged) == len(plain.judged) == 6  # one clip per category
    assert any(not torch.equal(a.image, b.image) for a, b in zip(early.judged, plain.judged))
    everywhere = gv.run(model, "early", 8.0, t_from=0.0, **common)  # every step: plain guidance at 8
    assert all(torch.equal(a.image, b.image) for a, b in zip(everywhere.judged,
                                                             gv.run(model, "plain", 0.0, cfg=8.0, **common).judged))
    assert any(not torch.equal(a.image, b.image) for a, b in zip(everywhere.judged, early.judged))


def test_self_verifiers_reports_each_rule_between_its_bounds(tiny_run, tmp_path, capsys):
    from omnidit.evaluate.runner import evaluate_model
    from omnidit.pipeline import load_pipeline

    sv = load_script("self_verifiers")
    out = tmp_path / "v.json"
    args = ["--model", str(tiny_run), "--seeds", "1", "2", "--n", "2", "--limit", "1", "--n-per-prompt", "2"]
    assert sv.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    plain = evaluate_model(load_pipeline(str(tiny_run), device="cpu"), "shapes", n_per_prompt=2, seed=1, limit=1,
                           progress=False, frechet=False)
    assert rows["one candidate (mean over seeds)"][0] == plain.overall  # the same images, judged the same
    for rule in sv.RULES:  # a kept image is one of the candidates: never above the oracle
        assert rows["oracle, best of 2"][0] >= rows[f"{rule}, best of 2"][0] >= 0
    assert "cond, best of 2" in capsys.readouterr().out
    # the rules pick by the model's own scores: the conditional rule keeps the lower conditional error
    runs = [sv.judge_and_score(load_pipeline(str(tiny_run), device="cpu"), s, 1, 2) for s in (1, 2)]
    kept = sv.best_of(runs, [0, 1], "cond")
    lower = runs[0]["cond"] <= runs[1]["cond"]
    assert torch.equal(kept, torch.where(lower, runs[0]["passed"], runs[1]["passed"]))
    assert sv.main([*args[:2], "--seeds", "1", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("self_verifiers: error:") and err.count("\n") == 1, err


def test_direction_probe_reads_the_first_direction_of_ground_truth_clips():
    from omnidit.data.shapes_video import ShapesVideoDataset

    probe = load_script("direction_probe")
    data = ShapesVideoDataset(32, 32, 8, 8.0, seed=0, kinds={"single": 1.0})
    read = [(probe.first_direction(data[i]["video"], 8.0), data.scene(i).objects[0].direction) for i in range(24)]
    assert all(got == want for got, want in read), read


def test_clip_edits_recolours_ground_truth_clips_and_judges_them(tmp_path):
    ce = load_script("clip_edits")
    cases = ce.recolour_cases(2, 1234, 32, 32, 8, 8.0)
    assert all(c["specs"][0].colour in c["target"] and c["specs"][0].colour not in c["source"] for c in cases)
    report = ce.main(["--cases", "1", "--steps", "2", "--json", str(tmp_path / "r.json")])
    assert report["cases"] == 1 and report["given_right"] == 1  # the ground truth passes the judge
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["target"] == cases[0]["target"]


def test_inpaint_validation_draws_other_seeds_cases_and_counts_them(tiny_run, tmp_path, capsys):
    from omnidit.evaluate.edit_suite import edit_cases, move_cases

    iv = load_script("inpaint_validation")
    out = tmp_path / "v.json"
    assert iv.main([str(tiny_run), "--data-seed", "1", "--limit", "1", "--moves", "--prompt", "object",
                    "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    categories = ["inpaint_recolour", "inpaint_replace", "inpaint_restore", "move"]
    assert report["cases"] == dict.fromkeys(categories, 1) and list(report["passed"]) == ["1"]
    assert sum(report["total"].values()) + len(report["failures"]) == 4
    asked = {f["category"]: f["prompt"] for f in report["failures"]}
    assert asked and all((" and " in p or " of " in p or " above " in p or " below " in p) == (c == "move")
                         for c, p in asked.items())  # objects asked by name, moves by the scene
    assert "total" in capsys.readouterr().out
    held = ["red triangle"]
    assert [c["prompt"] for c in edit_cases(32, 32, held, 2, data_seed=1)] != [
        c["prompt"] for c in edit_cases(32, 32, held, 2)]  # other scenes than the suite's
    assert [c["prompt"] for c in move_cases(32, 32, held, 2, data_seed=1)] != [
        c["prompt"] for c in move_cases(32, 32, held, 2)]


def test_inpaint_validation_bad_input_is_one_line(av_run, capsys):
    iv = load_script("inpaint_validation")
    for args in ([str(av_run)], ["shapes", "--limit", "0"], ["shapes", "--data-seed", "1", "7777"]):
        assert iv.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("inpaint_validation: error:") and err.count("\n") == 1, err


def test_serve_overhead_times_a_request_along_each_path(tiny_run, capsys):
    so = load_script("serve_overhead")
    for path in so.PATHS:  # the pipeline, the server's batcher, and HTTP through the server's app
        times = so.time_requests(path, str(tiny_run), requests=2, steps=1)
        assert len(times) == 2 and all(0 < t < 60 for t in times), (path, times)
    with pytest.raises(SystemExit, match="unknown path"):
        so.time_requests("ftp", str(tiny_run), requests=1)
    assert so.main(["--requests", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("serve_overhead: error:") and "at least 1" in err and err.count("\n") == 1, err
