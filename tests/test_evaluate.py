"""The evaluation runner, `omnidit eval` / `omnidit eval-prompts`, and evaluation during training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from omnidit.cli import main
from omnidit.data.shapes import render_scene
from omnidit.evaluate.runner import evaluate_model
from omnidit.evaluate.shapes_suite import CATEGORIES, read_manifest, reference_scene
from omnidit.pipeline import load_pipeline


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_scores_are_identical_across_runs_and_batch_sizes(tiny_run):
    pipe = load_pipeline(tiny_run, device="cpu")
    kwargs = dict(n_per_prompt=2, seed=3, limit=1, progress=False)
    a = evaluate_model(pipe, "shapes", batch_size=64, **kwargs)
    assert a.to_json() == evaluate_model(pipe, "shapes", batch_size=64, **kwargs).to_json()
    assert a.n_images == 2 * len(CATEGORIES) and set(a.categories) == set(CATEGORIES)
    # per-image seeds: an image does not depend on its batch (up to float summation order)
    b = evaluate_model(pipe, "shapes", batch_size=5, **kwargs)
    assert all(np.allclose(x.image.numpy(), y.image.numpy(), atol=1e-4) for x, y in zip(a.judged, b.judged))
    c = evaluate_model(pipe, "shapes", batch_size=64, **{**kwargs, "seed": 4})
    assert any(not np.array_equal(x.image.numpy(), y.image.numpy()) for x, y in zip(a.judged, c.judged))
    # the report lists every failed image with the noise seed that draws it again on its own
    failures = a.to_json()["failures"]
    assert len(failures) == sum(not j.passed for j in a.judged) > 0
    judged = next(j for j in a.judged if not j.passed)
    assert failures[0] == {"category": judged.category, "prompt": judged.prompt, "reason": judged.reason,
                           "seed": judged.seed}
    again = pipe.generate([judged.prompt], seed=judged.seed)[0]
    assert np.allclose(again.numpy(), judged.image.numpy(), atol=1e-4)


def test_cli_eval_model_writes_table_json_and_grid(tiny_run, tmp_path, capsys):
    out = tmp_path / "scores.json"
    code, stdout, err = run_cli(capsys, "eval", tiny_run, "--suite", "shapes", "--limit", "1", "--n-per-prompt", "2",
                                "--json", out, "--no-progress", "--steps", "3", "--shift", "2.5")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["suite"] == "shapes" and result["n_images"] == 2 * len(CATEGORIES)
    assert result["settings"]["shift"] == 2.5 and result["settings"]["sampler"] == "euler"
    assert set(result["categories"]) == set(CATEGORIES)
    assert abs(result["overall"] - sum(result["categories"].values()) / len(CATEGORIES)) < 1e-9
    assert result["settings"]["steps"] == 3 and result["frechet_distance"] > 0
    assert "overall" in stdout and "colour_attribution" in stdout
    grid = Image.open(tmp_path / "eval_shapes.png")
    assert grid.height == len(CATEGORIES) * (16 * 4 + 8)  # a row per category, 16 px tiles upscaled 4x


def test_cli_eval_digits_model(digits_run, tmp_path, capsys):
    out = tmp_path / "d.json"
    code, _, err = run_cli(capsys, "eval", digits_run, "--n-per-prompt", "2", "--json", out, "--no-progress")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["suite"] == "digits" and result["n_images"] == 20
    assert list(result["categories"]) == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                          "nine"]
    assert "relation_accuracy" not in result  # a shapes-suite figure only


def test_foreign_images_are_scored_from_the_manifest(tmp_path, capsys):
    folder = tmp_path / "foreign"
    code, _, err = run_cli(capsys, "eval-prompts", folder, "--limit", "2", "--n-per-prompt", "2")
    assert code == 0, err
    prompts = (folder / "prompts.txt").read_text().splitlines()
    entries = read_manifest(folder / "manifest.json")
    assert len(entries) == 2 * len(prompts) == 2 * 2 * len(CATEGORIES)
    # a perfect system: render the right scene for every prompt (at 64x48, another size than training)
    for i, (name, spec) in enumerate(entries):
        Image.fromarray(render_scene(reference_scene(spec, 64, 48, seed=i), 64, 48)).save(folder / name)
    out = tmp_path / "foreign.json"
    code, stdout, err = run_cli(capsys, "eval", folder, "--json", out, "--no-progress")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["overall"] == 1.0 and all(v == 1.0 for v in result["categories"].values()), result
    assert result["failures"] == []
    n_position = sum(spec.category == "position" for _, spec in entries)
    assert result["relation_accuracy"] == {"rate": 1.0, "axis_rate": 1.0, "images": n_position}
    assert f"relation accuracy 1.000, axis accuracy 1.000 over the {n_position} position images" in stdout
    # the right pair placed right, reversed (right axis, wrong direction), on the other axis, right again
    other = {"left of": ("right of", "above"), "right of": ("left of", "below"), "above": ("below", "left of"),
             "below": ("above", "right of")}
    placements = []
    for i, (name, spec) in enumerate(entries):
        if spec.relation:
            k = len(placements) % 3
            placements.append(("right", "reversed", "off_axis")[k])
            drawn = spec.relation if k == 0 else other[spec.relation][k - 1]
            scene = reference_scene(dataclasses.replace(spec, relation=drawn), 64, 48, seed=i)
            Image.fromarray(render_scene(scene, 64, 48)).save(folder / name)
    code, _, err = run_cli(capsys, "eval", folder, "--json", out, "--no-progress", "--no-fd")
    result = json.loads(out.read_text())
    right, axis = placements.count("right"), placements.count("right") + placements.count("reversed")
    assert code == 0 and n_position == 4 and (right, axis) == (2, 3)
    assert result["categories"]["position"] == pytest.approx(right / n_position)
    assert result["relation_accuracy"] == {"rate": right / n_position, "axis_rate": axis / n_position,
                                           "images": n_position}
    assert result["overall"] == pytest.approx(1 - (1 - right / n_position) / len(CATEGORIES))
    # a system that draws nothing fails everything, and no image qualifies for the relation accuracy
    for name, _ in entries:
        Image.new("RGB", (32, 32), "white").save(folder / name)
    code, stdout, err = run_cli(capsys, "eval", folder, "--json", out, "--no-progress", "--no-fd")
    result = json.loads(out.read_text())
    assert code == 0 and result["overall"] == 0.0
    assert [f["file"] for f in result["failures"]] == [name for name, _ in entries]
    assert result["failures"][0]["reason"].startswith("expected")
    assert result["relation_accuracy"] == {"rate": None, "axis_rate": None, "images": 0}
    assert "relation accuracy" not in stdout
    # a missing image is a one-line error
    (folder / entries[0][0]).unlink()
    code, _, err = run_cli(capsys, "eval", folder, "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "missing" in err


def test_eval_bad_input_is_one_line(digits_run, tmp_path, capsys):
    for args in (["eval", tmp_path / "nope"], ["eval", digits_run, "--suite", "shapes", "--limit", "1"],
                 ["eval", digits_run, "--n-per-prompt", "0"], ["eval-prompts", tmp_path, "--limit", "0"]):
        code, _, err = run_cli(capsys, *args, "--no-progress") if args[0] == "eval" else run_cli(capsys, *args)
        assert code == 2 and err.startswith("omnidit: error:") and err.count("\n") == 1, (args, err)


def test_training_runs_evaluations_and_plots_curves(make_tiny_config, tmp_path):
    from omnidit.train import train

    config = make_tiny_config(tmp_path / "run", train={"eval_every": 10, "eval_limit": 1, "eval_n_per_prompt": 1,
                                                       "sample_every": 20})
    train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(set(r["eval"]["categories"]) == set(CATEGORIES) for r in evals)
    assert all(set(r["eval"]["relation_accuracy"]) == {"rate", "axis_rate", "images"} for r in evals)
    assert (tmp_path / "run" / "eval" / "step_0000010.png").is_file()
    samples = Image.open(tmp_path / "run" / "samples" / "step_0000020.png")
    assert samples.size == (4 * 16 + 5 * 2, 2 * 16 + 3 * 2) and "prompts" in samples.text  # 8 samples, 4 columns
    curves = Image.open(tmp_path / "run" / "curves.png")
    assert curves.size == (480, 600)  # loss panel + shapes-suite panel
    pixels = np.asarray(curves.convert("RGB"))
    assert (np.abs(pixels.astype(int) - [31, 119, 180]).sum(-1) < 30).sum() > 20  # the loss line is drawn


def test_a_failing_in_training_evaluation_loses_no_checkpoint(make_tiny_config, tmp_path, monkeypatch):
    """The checkpoint due at an evaluation step is written before the evaluation runs."""
    from omnidit.checkpoint import list_checkpoints
    from omnidit.train import Trainer, train

    def broken_evaluation(self, log):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(Trainer, "evaluate", broken_evaluation)
    config = make_tiny_config(tmp_path / "run", train={"steps": 10, "eval_every": 10})
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train(config, progress=False)
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["checkpoint-0000010"]
