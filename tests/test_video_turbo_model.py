"""The few-step video student shipped in the package (`shapes-video-turbo`, `shapes-video` distilled with
configs/recipes/video_turbo.json): it loads offline by name, is small, samples a clip in the few single passes
its config names (no guidance pass), and draws the captioned object through the clip."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_shipped_student
from test_cli import run_main

from omnidit.evaluate.video_suite import judge_clip
from omnidit.pipeline import load_pipeline

MAX_SHIPPED_BYTES = 12 * 1024 * 1024
# The clips below come out right in every frame for 8 of 8 (and for 8 of 8 at seeds 4-7, measured 2026-12-05;
# suite: single object 0.812); 6 leaves room for another CPU's rounding.
MIN_DRAWN = 6


@pytest.fixture(scope="module")
def turbo():
    return load_pipeline("shapes-video-turbo", device="cpu")


def test_shipped_video_student_is_small_float16_and_samples_in_a_few_single_passes(turbo):
    assert_shipped_student(turbo, "shapes-video-turbo", "video_turbo_model", MAX_SHIPPED_BYTES)
    assert turbo.config.distill.teacher == "shapes-video"
    assert turbo.config.data.frames == 8 and turbo.config.data.fps == 8.0


def test_it_draws_the_object_through_the_clip_in_one_pass_per_step(turbo):
    calls = []
    original = turbo.model.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    prompts = ["a red circle moving to the right"] * 4 + ["a green triangle moving up"] * 4
    turbo.model.forward = counting
    try:
        clips = turbo.generate_video(prompts, seed=[0, 1, 2, 3] * 2)
    finally:
        del turbo.model.forward
    assert calls == [len(prompts)] * turbo.config.sample.steps  # one pass per step, no unconditional row
    drawn = [judge_clip(c, p, fps=8.0, facts=()) for c, p in zip(clips, prompts)]
    assert sum(ok for ok, _ in drawn) >= MIN_DRAWN, drawn  # the object, its colour and shape, in every frame


def test_image_to_video_keeps_the_given_frame(turbo):
    first = turbo.generate(["a green triangle"], seed=0)  # one frame: the student's own still image
    clip = turbo.generate_video(["a green triangle moving to the left"], first_frame=first, seed=0)
    assert torch.equal(clip[0, :, 0], first[0])  # given tokens stay exactly as given
    assert not torch.equal(clip[0, :, 1], first[0])  # and the frames after it are generated


def test_info_and_generate_by_name(tmp_path, capsys):
    code, out, err = run_main(capsys, "info", "shapes-video-turbo")
    assert code == 0 and "8 frames at 8 fps" in out and "distillation" in out, err
    code, out, err = run_main(capsys, "generate", "a red circle moving to the right", "--model",
                              "shapes-video-turbo", "-o", tmp_path / "c.mp4", "--no-progress")
    assert code == 0 and (tmp_path / "c.mp4").stat().st_size > 0, err


# The shipped student was distilled from `shapes-video` as it was from 2026-12-05 to 2026-12-07 (`git archive
# 7f64f9e src/omnidit/video_model`); the fine-tuning at shift 6 that replaced it changed only these settings.
TEACHER_THEN = ["data.seed=13", "data.counterfactual_directions=vertical", "train.t_shift=2.0", "sample.shift=2.0"]


def test_the_recipe_gives_the_shipped_config(monkeypatch):
    """`omnidit distill shapes-video runs/video_turbo --recipe configs/recipes/video_turbo.json` trains the
    student with the config that ships (its last stage's run folder), from the teacher it was distilled from."""
    from pathlib import Path

    from omnidit import checkpoint
    from omnidit.config import apply_overrides, config_from_dict
    from omnidit.distill_train import read_recipe, student_config

    teacher_dir, read_config = checkpoint.shipped_model_dir("shapes-video"), checkpoint.read_config
    today = read_config(teacher_dir).to_dict()
    then = apply_overrides(today, TEACHER_THEN)
    assert all(then[s] != today[s] for s in ("data", "train", "sample"))  # today's teacher differs in each
    monkeypatch.setattr(checkpoint, "read_config", lambda directory: config_from_dict(then)
                        if Path(directory) == teacher_dir else read_config(directory))
    recipe = Path(__file__).parents[1] / "configs/recipes/video_turbo.json"
    folder, method, teacher, overrides = read_recipe(recipe, "shapes-video", "runs/video_turbo")[-1]
    assert folder == "runs/video_turbo/progressive"
    built = student_config(teacher, folder, method, overrides).to_dict()
    assert built == read_config(checkpoint.shipped_model_dir("shapes-video-turbo")).to_dict()
