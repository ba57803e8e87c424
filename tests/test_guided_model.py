"""The guidance-distilled twin of the shipped shapes model (`shapes-guided`): it loads offline by name, is small,
samples with one pass per step (its guidance scale is an input), and `--speed fast` on `shapes` samples with it."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_shipped_folder, draw_single_objects

from omnidit.checkpoint import shipped_model_dir
from omnidit.pipeline import guided, load_pipeline
from omnidit.quantize import apply_speed, has_int8_layers

MAX_SHIPPED_BYTES = 12 * 1024 * 1024


@pytest.fixture(scope="module")
def twin():
    return load_pipeline("shapes-guided", device="cpu")


def test_shipped_twin_is_small_float16_and_samples_with_one_pass_per_step(twin):
    assert_shipped_folder("shapes-guided", "guided_model", MAX_SHIPPED_BYTES)
    teacher = load_pipeline("shapes", device="cpu")
    settings = twin.sampling_settings()
    assert twin.config.distill.method == "guidance" and twin.config.distill.teacher == "shapes"
    assert twin.model.config.guidance_embed and not guided(settings, guidance_input=True)
    assert settings["steps"] == teacher.config.sample.steps and settings["cfg"] == teacher.config.sample.cfg
    assert settings["candidates"] == 1 and not settings["skip_scale"]
    assert twin.config.text == teacher.config.text


def test_it_draws_single_objects_right_in_one_pass_per_step(twin):
    calls, right = draw_single_objects(twin, steps=12)
    assert len(calls) == 12 and set(calls) == {4}  # one pass per step, no CFG row
    assert right >= 3, right

def test_the_fast_presets_of_shapes_sample_with_it():
    pipe = load_pipeline("shapes", device="cpu")
    candidates = pipe.config.sample.candidates
    apply_speed(pipe, "fast")
    assert pipe.model_dir == shipped_model_dir("shapes-guided") and pipe.model.config.guidance_embed
    assert has_int8_layers(pipe.model) and pipe.config.sample.candidates == candidates
    sample = pipe.config.sample
    assert not sample.skip_scale  # best of N, one pass a step
    assert (sample.cache, sample.cache_threshold, sample.cache_forecast) == ("first_block", 0.2, "taylor")
    cache = lambda **kw: {k: v for k, v in pipe.sampling_settings(**kw).items() if k.startswith("cache")}  # noqa: E731
    assert cache()["cache_threshold"] == cache(cache="first_block")["cache_threshold"] == 0.2
    # Another method asked for explicitly takes its own defaults, not the preset's threshold and forecast.
    assert (cache(cache="magcache")["cache_threshold"], cache(cache="magcache")["cache_forecast"]) == (0.05, "copy")
    assert cache(cache="teacache", cache_threshold=0.3)["cache_threshold"] == 0.3
    image = pipe.generate(["a red circle"], seed=0, steps=2)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_generate_at_fast_names_the_twin_in_the_png(tmp_path, capsys):
    from PIL import Image
    from test_cli import run_main

    target = tmp_path / "fast.png"
    code, _, err = run_main(capsys, "generate", "a red circle", "--speed", "fast", "--steps", "2", "-o", target,
                            "--no-progress")
    assert code == 0, err
    info = Image.open(target).info
    assert info["speed"] == "fast" and info["twin"] == str(shipped_model_dir("shapes-guided"))
    assert info["ranked_by"] == str(shipped_model_dir("shapes"))  # the model itself ranks the twin's candidates
