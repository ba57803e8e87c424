"""omnidit.evaluate.video_suite and tracker: caption parsing, prompts, the judge on ground-truth clips
(>= 99% right) and on clips that are wrong on purpose, image-to-video, the report and the Fréchet
video distance."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch

from omnidit.data.shapes import COLOURS, DEFAULT_HELD_OUT, parse_held_out
from omnidit.data.shapes_video import (
    DIRECTIONS,
    ShapesVideoDataset,
    VideoObject,
    VideoScene,
    render_video,
    video_tensor,
)
from omnidit.errors import OmniditError
from omnidit.evaluate.detector import to_rgb_array
from omnidit.evaluate.frechet import fit_gaussian, frechet_distance
from omnidit.evaluate.tracker import clip_frames, initial_motion, link, max_step, name_direction
from omnidit.evaluate.video_suite import (
    CATEGORIES,
    MotionSpec,
    condition_frame,
    evaluate_clips,
    evaluate_video_model,
    frechet_distance_videos,
    judge_clip,
    judge_continuation,
    judge_prompt,
    parse_caption,
    reference_scene,
    scene_specs,
    suite_prompts,
    video_features,
)

HELD = parse_held_out(DEFAULT_HELD_OUT)
OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}


def opposite(direction: str) -> str:
    return " and to the ".join(OPPOSITE[w] for w in direction.replace(" and to the", "").split())


def moving(direction: str = "right", speed: float = 0.55, x: float = 0.3, y: float = 0.5, colour: str = "red",
           shape: str = "circle", size: str = "small", side: float = 0.27) -> VideoObject:
    u = DIRECTIONS[direction]
    return VideoObject(shape, colour, size, side, (x, y), (speed * u[0], speed * u[1]), direction,
                       "fast" if speed > 0.85 else "slow")


def clip_of(*objects: VideoObject, frames: int = 8, w: int = 32, h: int = 32, fps: float = 8.0) -> np.ndarray:
    return render_video(VideoScene(tuple(objects), "", "single" if len(objects) == 1 else "pair"), frames, w, h, fps)


# ---- captions and prompts -------------------------------------------------------------------------


def test_parse_caption_reads_back_every_training_caption():
    ds = ShapesVideoDataset(seed=5)
    with_speed = 0
    for i in range(1000):
        scene = ds.scene(i)
        parsed = parse_caption(scene.caption)
        truth = scene_specs(scene)
        assert len(parsed) == len(truth), scene.caption
        for p, t in zip(parsed, truth):
            assert (p.colour, p.shape, p.direction) == (t.colour, t.shape, t.direction), scene.caption
            assert p.speed in (None, t.speed) and p.size in (None, t.size), scene.caption
            with_speed += p.speed is not None
    assert with_speed > 750


def test_parse_caption_examples_and_errors():
    assert parse_caption("A blue square moves up quickly while a green triangle moves down") == (
        MotionSpec("blue", "square", "up", "fast"), MotionSpec("green", "triangle", "down"))
    assert parse_caption("a small yellow diamond drifting to the left") == (
        MotionSpec("yellow", "diamond", "left", "slow", "small"),)
    assert parse_caption("a fast red circle heading up and to the right")[0].direction == "up and to the right"
    for caption, message in [("a red circle", "no single direction"), ("hello", "no object"),
                             ("a red circle moves up and down", "no single direction"),
                             ("a red circle moves left slowly and quickly", "two speeds"),
                             ("a red circle moves up and a red circle moves down", "twice")]:
        with pytest.raises(OmniditError, match=message):
            parse_caption(caption)


def test_suite_prompts_are_deterministic_balanced_and_respect_held_out_pairs():
    prompts = suite_prompts(seed=0)
    assert prompts == suite_prompts(seed=0) and prompts != suite_prompts(seed=1)
    counts = {c: sum(p.category == c for p in prompts) for c in CATEGORIES}
    assert all(n == 32 for n in counts.values()), counts
    for p in prompts:
        assert p.objects == parse_caption(p.prompt)
        pairs = {(o.colour, o.shape) for o in p.objects}
        assert (pairs <= HELD) if p.category == "novel_compositions" else not pairs & HELD, p.prompt
        assert len(p.objects) == 2 if p.category == "two_objects" else True
        assert all(o.speed for o in p.objects) if p.category == "speed" else True
    for category in ("direction", "speed"):
        firsts = [p.objects[0] for p in prompts if p.category == category][:16]
        assert {o.direction for o in firsts} == set(DIRECTIONS)
    speeds = [p.objects[0].speed for p in prompts if p.category == "speed"]
    assert speeds.count("slow") == speeds.count("fast")
    short = suite_prompts(seed=0, per_category=4)
    assert short == [p for c in CATEGORIES for p in [q for q in prompts if q.category == c][:4]]
    assert not any(p.category == "novel_compositions" for p in suite_prompts(held_out=()))
    with pytest.raises(OmniditError):
        suite_prompts(per_category=0)


# ---- the judge on ground truth -------------------------------------------------------------------


def judge_own_clip(job: tuple[int, int, int, int]) -> tuple[str, bool, str]:
    """Render dataset clip i (seed 123, 8 fps) and judge it against its own scene, every fact."""
    w, h, frames, i = job
    scene = ShapesVideoDataset(w, h, frames, 8.0, seed=123, held_out=()).scene(i)
    return (scene.caption, *judge_clip(render_video(scene, frames, w, h, 8.0), scene_specs(scene), 8.0))


def test_ground_truth_clips_pass_at_least_99_percent():
    """500 dataset clips at 32x32, 16 frames, 8 fps, judged against their own scene (objects, size, direction,
    speed), plus 40 at 48x32 with 8 frames. The detector dominates (~1.4 ms a frame), so two processes
    share the clips where fork is available; the judge is numpy only (no torch threads in the children)."""
    jobs = [(32, 32, 16, i) for i in range(500)] + [(48, 32, 8, i) for i in range(40)]
    if "fork" in multiprocessing.get_all_start_methods():
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(judge_own_clip, jobs, chunksize=30))
    else:
        results = [judge_own_clip(job) for job in jobs]
    failures = [(caption, reason) for caption, passed, reason in results if not passed]
    assert len(results) == 540 and len(failures) <= 0.01 * len(results), failures


def test_reference_clips_pass_every_suite_prompt():
    for k, prompt in enumerate(suite_prompts(seed=0, per_category=5)):
        scene = reference_scene(prompt)
        assert [(o.colour, o.shape, o.direction) for o in scene.objects] == \
            [(o.colour, o.shape, o.direction) for o in prompt.objects]
        clip = render_video(scene, 16, 32, 32, 8.0)
        assert judge_prompt(prompt, clip) == (True, "ok"), prompt
        if k % 5 == 0:
            assert judge_prompt(prompt, video_tensor(clip)) == (True, "ok")  # the dataset's tensor format
            assert judge_clip(clip, prompt.prompt) == (True, "ok")  # the caption, parsed


# ---- clips that are wrong on purpose -------------------------------------------------------------


def test_reversed_motion_fails():
    for direction in DIRECTIONS:
        clip = clip_of(moving(direction, x=0.5, y=0.5))
        assert judge_clip(clip, [MotionSpec("red", "circle", direction)]) == (True, "ok")
        passed, reason = judge_clip(clip[::-1], [MotionSpec("red", "circle", direction)])
        assert not passed and f"first moves {opposite(direction)}" in reason
    # Played backwards from the dataset: the first frames before any bounce, reversed.
    ds = ShapesVideoDataset(seed=9, kinds={"single": 1})
    for i in range(30):
        scene = ds.scene(i)
        clip = render_video(scene, 4, 32, 32, 16.0)  # 3/16 s: straight for every object
        passed, reason = judge_clip(clip[::-1], scene_specs(scene), 16.0)
        assert not passed and "first moves" in reason, (scene.caption, reason)


def test_colour_change_mid_clip_fails():
    clip = clip_of(moving(), frames=16)
    red = np.all(clip == COLOURS["red"], axis=-1)
    clip[8:][red[8:]] = COLOURS["blue"]
    passed, reason = judge_clip(clip, "a red circle moving to the right", 8.0)
    assert not passed and reason == "red circle missing in frames 8-15"


def test_vanishing_object_fails_even_for_one_frame():
    a, b = moving(y=0.25), moving("left", 1.3, x=0.7, y=0.75, colour="blue", shape="square")
    caption = "a red circle moves right while a blue square moves left quickly"
    clip = clip_of(a, b, frames=16)
    assert judge_clip(clip, caption) == (True, "ok")
    for lost in ([5, 6, 7, 8], [3]):
        broken = clip.copy()
        blue = np.all(broken == COLOURS["blue"], axis=-1)
        broken[lost] = np.where(blue[lost][..., None], 255, broken[lost])
        passed, reason = judge_clip(broken, caption)
        assert not passed and reason.startswith("blue square missing in frame"), reason


def test_wrong_speed_class_fails():
    slow, fast = clip_of(moving(speed=0.55)), clip_of(moving(speed=1.3, x=0.2))
    assert judge_clip(slow, "a red circle moves right slowly") == (True, "ok")
    assert judge_clip(fast, "a red circle moves right quickly") == (True, "ok")
    passed, reason = judge_clip(slow, "a red circle moves right quickly")
    assert not passed and "moves slow" in reason
    passed, reason = judge_clip(fast, "a slow red circle moving to the right")
    assert not passed and "moves fast" in reason
    # The same motion sampled at 16 fps is the same speed; judged as 8 fps it would look half as fast.
    fast16 = clip_of(moving(speed=1.3, x=0.2), frames=16, fps=16.0)
    assert judge_clip(fast16, "a red circle moves right quickly", fps=16.0) == (True, "ok")
    assert not judge_clip(fast16, "a red circle moves right quickly", fps=8.0)[0]


def test_extra_objects_shape_changes_and_standing_still_fail():
    two = clip_of(moving(y=0.25), moving("left", x=0.7, y=0.75, colour="blue", shape="square"))
    passed, reason = judge_clip(two, "a red circle moving to the right")
    assert not passed and reason.startswith("extra object: blue square")
    one = clip_of(moving(), frames=16)
    morph = one.copy()
    morph[4:10] = clip_of(moving(shape="square"), frames=16)[4:10]
    passed, reason = judge_clip(morph, "a red circle moving to the right")
    assert not passed and "turns square in frames 4-9" in reason
    still = np.repeat(one[:1], 16, axis=0)
    passed, reason = judge_clip(still, "a red circle moving to the right")
    assert not passed and reason == "the red circle does not move"
    assert judge_clip(still, "a red circle moving to the right", facts=()) == (True, "ok")  # presence only
    passed, reason = judge_clip(np.full_like(one, 255), "a red circle moving to the right")
    assert not passed and reason == "no red circle in any frame"


def test_image_to_video_continuation():
    prompt = next(p for p in suite_prompts(seed=0) if p.category == "image_to_video" and len(p.objects) == 2)
    first = condition_frame(prompt)
    truth = render_video(reference_scene(prompt), 16, 32, 32, 8.0)
    assert np.array_equal(first, truth[0])
    assert judge_continuation(first, truth, prompt.prompt) == (True, "ok")
    assert judge_prompt(prompt, truth) == (True, "ok")
    # The same motion from elsewhere: another layout of the same prompt.
    elsewhere = render_video(reference_scene(replace(prompt, seed=prompt.seed + 1)), 16, 32, 32, 8.0)
    passed, reason = judge_continuation(first, elsewhere, prompt.prompt)
    assert not passed and "from where the given frame has it" in reason
    assert not judge_prompt(prompt, elsewhere)[0]
    # A given frame with other objects than the clip's.
    (a, b) = prompt.objects
    other = clip_of(moving(colour="green" if a.colour != "green" else "pink", shape=a.shape))
    passed, reason = judge_continuation(other[0], truth, prompt.prompt)
    assert not passed and reason.startswith("the first frame holds")
    # A clip that starts right but moves the wrong way.
    passed, reason = judge_continuation(first, truth[::-1], prompt.prompt)
    assert not passed


# ---- tracker ---------------------------------------------------------------------------------------


def test_tracker_pieces():
    assert name_direction([3.0, 0.2]) == "right" and name_direction([2.0, -2.1]) == "up and to the right"
    centres = np.array([[10.0, 10.0], [12.0, 10.0], [14.0, 10.0], [16.0, 10.0], [18.0, 10.0]])
    direction, speed = initial_motion(centres, 8.0, 32)
    assert direction == "right" and speed == pytest.approx(6 / 3 * 8 / 32)  # 4.8 px reached at frame 3
    assert initial_motion(np.zeros((5, 2)), 8.0, 32)[0] is None
    assert max_step(8.0, 32) == pytest.approx(1.5 * 1.4 * 4 + 2)
    assert link([[], []], 10.0) == []
    clip = torch.rand(3, 4, 16, 16) * 2.2 - 1.1
    clip[0, 0, 0, :3] = torch.tensor([0.5, 1.5, 2.5]) / 127.5 - 1  # half-way values round to even
    assert all(np.array_equal(frame, to_rgb_array(clip[:, t])) for t, frame in enumerate(clip_frames(clip)))
    assert all(np.array_equal(a, b) for a, b in zip(clip_frames(clip), clip_frames(clip_frames(clip))))
    for bad in (torch.zeros(4, 2, 16, 16), np.zeros((2, 16, 16)), "clip", torch.zeros(3, 2, 16, 16, dtype=torch.uint8)):
        with pytest.raises(OmniditError):
            clip_frames(bad)


# ---- report, model runner, Fréchet ------------------------------------------------------------------


def test_evaluate_clips_report_and_grid():
    prompts = suite_prompts(seed=0, per_category=2)
    clips = [render_video(reference_scene(p), 16, 32, 32, 8.0) for p in prompts]
    clips[0] = clips[0][::-1].copy()  # a single_object clip: still passes (direction not judged there)
    clips[2] = np.repeat(clips[2][:1], 16, axis=0)  # a direction clip that stands still
    report = evaluate_clips(prompts, clips, seeds=list(range(len(prompts))))
    data = report.to_json()
    assert data["suite"] == "video" and set(data["categories"]) == set(CATEGORIES)
    assert data["categories"]["direction"] == 0.5 and data["categories"]["single_object"] == 1.0
    assert data["overall"] == pytest.approx(np.mean(list(data["categories"].values())))
    assert len(data["failures"]) == 1
    failure = data["failures"][0]
    assert failure == {"category": "direction", "prompt": prompts[2].prompt, "seed": 2,
                       "reason": f"the {prompts[2].objects[0].describe()} does not move"}
    grid = report.grid()
    assert grid.size[0] > 3 * 64 and grid.size[1] >= len(CATEGORIES) * 64
    with pytest.raises(OmniditError, match="prompts but"):
        evaluate_clips(prompts, clips[:-1])


def test_evaluate_video_model_with_a_perfect_and_a_blank_model():
    prompts = suite_prompts(seed=0, per_category=2)
    calls = []

    def perfect(texts, seeds, firsts):
        start = sum(len(c[0]) for c in calls)
        calls.append((texts, seeds, firsts))
        assert texts == [p.prompt for p in prompts[start:start + len(texts)]]
        batch = prompts[start:start + len(texts)]
        assert (firsts is not None) == (batch[0].category == "image_to_video")
        return torch.stack([video_tensor(render_video(reference_scene(p), 16, 32, 32, 8.0)) for p in batch])

    report = evaluate_video_model(perfect, limit=2, batch_size=5, frechet=False)
    assert report.overall == 1.0 and report.n_images == len(prompts)
    assert all(len(texts) <= 5 for texts, _, _ in calls)
    firsts = torch.cat([f for _, _, f in calls if f is not None])
    assert firsts.shape == (2, 3, 32, 32)

    def blank(texts, seeds, firsts):
        return torch.ones(len(texts), 3, 16, 32, 32)

    report = evaluate_video_model(blank, limit=1, frechet=False)
    assert report.overall == 0.0 and all("no " in f["reason"] for f in report.to_json()["failures"])


@pytest.fixture
def one_thread():
    """Small float64 convolutions and 512x512 eigendecompositions: a second thread (torch's OpenMP, or
    scipy's OpenBLAS) gains little and, on a busy shared machine, stalls every call (1 s becomes 30 s).
    threadpoolctl comes with scikit-learn."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


def test_frechet_video_distance_sees_motion(one_thread):
    ds_a, ds_b = ShapesVideoDataset(seed=1, frames=3), ShapesVideoDataset(seed=2, frames=3)
    real_a = torch.stack([ds_a[i]["video"] for i in range(24)])
    real_b = torch.stack([ds_b[i]["video"] for i in range(24)])
    frozen = real_b[:, :, :1].expand_as(real_b).contiguous()  # the same first frames, nothing moves
    features = video_features(real_a)
    assert features.shape == (24, 512) and features.dtype == torch.float64
    assert torch.equal(features[:4], video_features(real_a[:4]))  # per clip, whatever the batch
    stats = {name: fit_gaussian(video_features(x)) for name, x in (("b", real_b), ("frozen", frozen))}
    a = fit_gaussian(features)
    assert frechet_distance(*a, *a) < 1e-6
    assert frechet_distance(*a, *stats["frozen"]) > 2 * frechet_distance(*a, *stats["b"])
    assert frechet_distance_videos(real_a[:8], real_a[:8]) < 1e-6
    with pytest.raises(OmniditError):
        video_features(real_a[:, :, 0])
