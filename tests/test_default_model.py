"""The shapes model shipped in the package: it loads offline, draws what it is asked, and the CLI uses it
when no model is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import build, tiny_config
from PIL import Image
from test_cli import assert_one_line_error, run_main

from omnidit import checkpoint
from omnidit.checkpoint import (
    DEFAULT_MODEL_DIR,
    default_model_dir,
    export_for_inference,
    load_model,
    read_safetensors,
    read_step,
    save_checkpoint,
)
from omnidit.config import Config, load_config
from omnidit.evaluate.detector import detect_objects
from omnidit.evaluate.shapes_suite import PromptSpec, check
from omnidit.pipeline import load_pipeline

MAX_SHIPPED_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def shipped():
    return load_pipeline(default_model_dir(), device="cpu")


def test_shipped_weights_are_small_float16_and_load(shipped):
    weights = DEFAULT_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= MAX_SHIPPED_BYTES
    assert {t.dtype for t in read_safetensors(weights).values()} == {torch.float16}
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["data"]["name"] == "shapes" and config["text"]["encoder"] == "minilm"
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in shipped.model.parameters())


def test_shipped_config_is_the_last_stage_of_the_recipe():
    """configs/recipes/shapes/README.md's recipe ends with configs/recipes/shapes/shapes_stage9.json: the shipped
    model was trained with it."""
    from omnidit.checkpoint import read_config

    recipe = load_config(Path(__file__).parents[1] / "configs/recipes/shapes/shapes_stage9.json").to_dict()
    shipped = read_config(DEFAULT_MODEL_DIR).to_dict()  # keys added since it was trained read as their defaults
    assert {section: shipped[section] for section in recipe} == recipe


def test_shipped_model_draws_objects_the_detector_parses(shipped):
    spec = PromptSpec("single_object", "a red circle", (("red", "circle", 1),))
    images = shipped.generate([spec.prompt] * 4, seed=0, progress=False)  # the default sampler settings
    assert images.shape == (4, 3, 32, 32)
    parsed = [detect_objects(img) for img in images]
    assert all(objects and all(o.shape != "unknown" for o in objects) for objects in parsed), parsed
    assert sum(check(spec, objects)[0] for objects in parsed) >= 3, parsed


def test_cli_generate_without_model_uses_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "red.png"
    code, stdout, err = run_main(capsys, "generate", "a red circle", "-o", out, "--steps", "8", "--no-progress")
    assert code == 0, err
    image = Image.open(out)
    assert image.size == (32, 32) and image.text["model"] == str(DEFAULT_MODEL_DIR.resolve())


def test_cli_demo_writes_a_labelled_grid(tmp_path, capsys):
    out = tmp_path / "demo.png"
    code, stdout, err = run_main(capsys, "demo", "-o", out, "-n", "2", "--steps", "4", "--no-progress")
    assert code == 0, err
    assert f"wrote {out}" in stdout
    image = Image.open(out)
    assert image.width > 2 * 96 and image.height >= 6 * 96  # six prompts, two 96-px tiles each, labels on the left
    sample = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["sample"]  # metadata: every setting
    assert image.text["steps"] == "4" and float(image.text["shift"]) == sample["shift"]
    assert image.text["sampler"] == sample["sampler"] and float(image.text["cfg"]) == sample["cfg"]
    assert int(image.text["candidates"]) == sample["candidates"] == 2  # best of 2 is the shipped default


def test_cli_eval_without_target_scores_the_shipped_model(tmp_path, capsys):
    report = tmp_path / "scores.json"
    code, stdout, err = run_main(capsys, "eval", "--suite", "shapes", "--limit", "1", "--n-per-prompt", "1",
                                 "--steps", "4", "--no-fd", "--no-progress", "--json", report)
    assert code == 0, err
    scores = json.loads(report.read_text())
    assert scores["suite"] == "shapes" and 0.0 <= scores["overall"] <= 1.0
    assert "novel_compositions" in stdout


def test_cli_info_without_model_describes_the_shipped_model(capsys):
    code, stdout, err = run_main(capsys, "info")
    assert code == 0, err
    assert str(DEFAULT_MODEL_DIR) in stdout and "exported as model.safetensors, float16" in stdout
    assert f"step          {read_step(DEFAULT_MODEL_DIR)}" in stdout


def test_missing_default_model_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL_DIR", tmp_path / "nothing")
    code, _, err = run_main(capsys, "generate", "a red circle", "-o", tmp_path / "x.png")
    assert_one_line_error(code, err, "default model is missing", "--model")


def test_export_for_inference_keeps_only_the_ema_weights_in_float16(tmp_path):
    cfg = tiny_config()
    raw, ema = build(cfg, seed=0).state_dict(), build(cfg, seed=1).state_dict()
    config = Config()
    config.model = cfg
    save_checkpoint(tmp_path / "run" / "checkpoint-0000010", config, raw, ema, {"x": torch.zeros(1)}, {"step": 10})
    out = export_for_inference(tmp_path / "run", tmp_path / "shipped")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "provenance.json"]
    assert read_step(out) == 10
    model, _ = load_model(out)
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, ema[name].half().float(), rtol=0, atol=0)
