"""The few-step student shipped in the package (`shapes-turbo`): it loads offline by name, is small, samples with
one pass per step and no guidance pass in the steps its config names, and draws simple scenes right."""

from __future__ import annotations

import pytest
from helpers import assert_shipped_folder
from test_cli import run_main

from omnidit.pipeline import guided, load_pipeline

MAX_SHIPPED_BYTES = 12 * 1024 * 1024


@pytest.fixture(scope="module")
def turbo():
    return load_pipeline("shapes-turbo", device="cpu")


def test_shipped_student_is_small_float16_and_samples_in_a_few_single_passes(turbo):
    assert_shipped_folder("shapes-turbo", "turbo_model", MAX_SHIPPED_BYTES)
    settings = turbo.sampling_settings()
    assert settings["steps"] <= 4 and settings["candidates"] == 1 and not settings["skip_scale"]
    assert turbo.model.config.guidance_embed and not guided(settings, guidance_input=True)
    assert turbo.config.distill.method in ("progressive", "dmd")


def test_it_draws_single_objects_right_in_its_few_steps(turbo):
    from omnidit.evaluate.detector import detect_objects as detect

    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow diamond"]
    calls = []
    original = turbo.model.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    turbo.model.forward = counting
    try:
        images = turbo.generate(prompts, seed=[0, 1, 2, 3])
    finally:
        del turbo.model.forward
    assert len(calls) == turbo.config.sample.steps and set(calls) == {len(prompts)}  # one pass per step, no CFG row
    right = 0
    for prompt, image in zip(prompts, images):
        found = detect(image)
        colour, shape = prompt.split()[1:]
        right += len(found) == 1 and found[0].colour == colour and found[0].shape == shape
    assert right >= 3, right


def test_info_and_generate_by_name(tmp_path, capsys):
    code, out, err = run_main(capsys, "info", "shapes-turbo")
    assert code == 0, err
    assert "distillation" in out and "guidance_embed=True" in out
    target = tmp_path / "t.png"
    code, out, err = run_main(capsys, "generate", "two red circles", "--model", "shapes-turbo", "-o", target,
                              "--no-progress")
    assert code == 0, err
    assert target.is_file()
