"""omnidit.data.shapes_video: determinism, motion (bounces, fps invariance, straight first stretch),
layout rules, captions, held-out pairs, input errors and speed."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from omnidit.data.shapes import BORDER, COLOURS, DEFAULT_HELD_OUT, GAP, SHAPES, SIZE_RANGE, parse_held_out, render_scene
from omnidit.data.shapes_video import (
    DIRECTION_PHRASES,
    DIRECTION_WINDOW,
    DIRECTIONS,
    SPEED_WORDS,
    SPEEDS,
    ShapesVideoDataset,
    VideoObject,
    VideoScene,
    make_video_scene,
    object_masks,
    positions,
    render_video,
    snapshot,
    trajectory,
)
from omnidit.errors import OmniditError


@pytest.fixture(scope="module")
def scenes() -> list[VideoScene]:
    ds = ShapesVideoDataset(seed=7)
    return [ds.scene(i) for i in range(2000)]


def mover(x: float, y: float, velocity: tuple[float, float], shape: str = "circle", colour: str = "red",
          side: float = 0.26) -> VideoObject:
    speed = "fast" if math.hypot(*velocity) > 0.9 else "slow"
    return VideoObject(shape, colour, "small", side, (x, y), velocity, "right", speed)


def dense_positions(scene: VideoScene, seconds: float = 15 / 8, w: int = 32, h: int = 32) -> np.ndarray:
    return positions(scene, np.linspace(0, seconds, 600), w, h)  # (N, 600, 2)


# ---- dataset -------------------------------------------------------------------------------------


def test_items_are_deterministic_in_seed_and_index():
    a, b = ShapesVideoDataset(seed=3), ShapesVideoDataset(seed=3)
    assert a.scene(5) == b.scene(5)
    assert torch.equal(a[5]["video"], b[5]["video"]) and a[5]["caption"] == b[5]["caption"]
    b[9], b[2]  # access order does not matter
    assert torch.equal(a[2]["video"], b[2]["video"])
    assert a.scene(5) != ShapesVideoDataset(seed=4).scene(5)
    assert a.scene(5) != a.scene(6)


def test_items_shapes_ranges_and_attributes():
    ds = ShapesVideoDataset(width=48, height=32, frames=8, fps=12.0, seed=1)
    item = ds[0]
    assert set(item) == {"video", "caption", "label"} and item["label"] == -1
    video = item["video"]
    assert video.shape == (3, 8, 32, 48) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() == 1  # white background
    assert (ds.channels, ds.height, ds.width, ds.frames, ds.fps) == (3, 32, 48, 8, 12.0)
    assert ds.num_classes == 0 and ds.num_samples is None
    uint8 = render_video(ds.scene(0), 8, 48, 32, 12.0)
    assert uint8.shape == (8, 32, 48, 3) and uint8.dtype == np.uint8
    assert torch.equal(video, torch.from_numpy(uint8).permute(3, 0, 1, 2).float() / 127.5 - 1)


def test_frames_are_the_shapes_renderer_at_each_instant(scenes):
    for scene in scenes[:40]:
        video = render_video(scene, 16, 32, 32, 8.0)
        for k in (0, 7, 15):
            still = render_scene(snapshot(scene, k / 8, 32, 32), 32, 32)
            assert (video[k] != still).any(axis=-1).sum() <= 1  # float round-trip through boxes may flip an edge pixel


def test_object_masks_are_the_painted_pixels_of_each_frame():
    """ShapesVideoDataset.object_mask (train.object_loss_weight on clips): per frame, the pixels that are not
    background, or those of the objects of the named shapes; the loss weights grow each frame's mask, never
    across frames."""
    from omnidit.data.shapes import BACKGROUND
    from omnidit.train_batches import object_loss_weights

    ds = ShapesVideoDataset(frames=8, seed=7)
    pairs = [i for i in range(40) if ds.scene(i).kind == "pair"][:3]
    assert len(pairs) == 3
    for index in [0, 1, *pairs]:
        scene = ds.scene(index)
        video = torch.from_numpy(render_video(scene, 8, 32, 32, 8.0))  # (T, H, W, 3)
        mask = ds.object_mask(index)
        assert mask.shape == (8, 32, 32) and mask.any(dim=(1, 2)).all()
        assert torch.equal(mask, (video != torch.tensor(BACKGROUND, dtype=torch.uint8)).any(-1))
        each = [torch.from_numpy(m) for m in object_masks(scene, 8, 32, 32, 8.0)]
        for obj, own in zip(scene.objects, each):  # an object's mask is painted in its colour
            assert (video[own] == torch.tensor(COLOURS[obj.colour], dtype=torch.uint8)).all()
        shape = scene.objects[0].shape
        of_shape = torch.stack([m for o, m in zip(scene.objects, each) if o.shape == shape]).any(0)
        assert torch.equal(ds.object_mask(index, [shape]), of_shape)
        assert (of_shape.sum() < mask.sum()) == any(o.shape != shape for o in scene.objects)
        weights = object_loss_weights(ds, [index], 4.0)[0]  # (3, T, H, W)
        assert weights.shape == (3, 8, 32, 32)
        for k in range(8):
            near = torch.nn.functional.max_pool2d(mask[k][None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
            assert (weights[:, k][:, near] == 4).all() and (weights[:, k][:, ~near] == 1).all()


def test_the_same_scene_at_another_fps_is_the_same_motion(scenes):
    for scene in scenes[:200]:
        slow = trajectory(scene, 16, 8.0, 32, 32)  # t = 0, 1/8, ..., 15/8
        fast = trajectory(scene, 31, 16.0, 32, 32)  # t = 0, 1/16, ..., 30/16
        np.testing.assert_allclose(fast[:, ::2], slow, atol=1e-9)
    scene = scenes[0]
    assert np.array_equal(render_video(scene, 31, 32, 32, 16.0)[::2], render_video(scene, 16, 32, 32, 8.0))


def test_objects_stay_inside_bounce_and_never_overlap(scenes):
    for scene in scenes[:400]:
        centres = dense_positions(scene)
        for obj, path in zip(scene.objects, centres):
            margin = BORDER * 32 + obj.side * 32 / 2
            assert path.min() >= margin - 1e-6 and path.max() <= 32 - margin + 1e-6
        if scene.kind == "pair":
            a, b = scene.objects
            apart = np.abs(centres[0] - centres[1]) - (a.side + b.side) * 32 / 2  # (S, 2) px between boxes
            assert (apart.max(axis=1) >= GAP * 32 - 1e-6).all()


def test_wall_bounce_reflects_the_velocity_component_that_hits_it():
    # Centre x from 0.7 at 0.5 unit/s; the right wall stops the centre at 1 - BORDER - side / 2 = 0.84.
    scene = VideoScene((mover(0.7, 0.5, (0.5, 0.25)),), "", "single")
    hi = 1 - BORDER - 0.13
    t_wall = (hi - 0.7) / 0.5
    x, y = positions(scene, np.array([t_wall - 0.1, t_wall, t_wall + 0.1]), 100, 100)[0].T / 100
    np.testing.assert_allclose(x, [hi - 0.05, hi, hi - 0.05], atol=1e-9)  # x reflects
    np.testing.assert_allclose(np.diff(y), [0.025, 0.025], atol=1e-9)  # y keeps going


def test_two_objects_bounce_off_each_other_and_keep_their_speeds():
    a, b = mover(0.25, 0.5, (0.5, 0.0)), mover(0.75, 0.5, (-1.25, 0.0), colour="blue")
    scene = VideoScene((a, b), "", "pair")
    times = np.linspace(0, 0.6, 601)
    path = positions(scene, times, 32, 32)  # (2, 601, 2)
    apart = np.abs(path[0, :, 0] - path[1, :, 0]) - 0.26 * 32
    assert apart.min() >= GAP * 32 - 1e-6
    step = np.diff(path[..., 0], axis=1) / np.diff(times) / 32  # units per second
    turn = int(np.argmax(np.sign(step[0]) < 0))
    assert 0 < turn < 600 and np.sign(step[1, turn + 1]) > 0  # both turned at the meeting
    assert np.allclose(np.abs(step[0, [0, -1]]), 0.5) and np.allclose(np.abs(step[1, [0, -1]]), 1.25)


def test_objects_move_straight_over_the_first_stretch_and_speeds_are_in_range(scenes):
    for scene in scenes[:400]:
        path = trajectory(scene, 16, 8.0, 32, 32)
        for obj, centres in zip(scene.objects, path):
            speed = math.hypot(*obj.velocity)
            assert SPEEDS[obj.speed][0] <= speed <= SPEEDS[obj.speed][1]
            assert speed * 32 / 8 >= 2.0  # at least 2 px per frame at 32 px, 8 fps
            np.testing.assert_allclose(np.array(obj.velocity) / speed, DIRECTIONS[obj.direction], atol=1e-12)
            # Straight for DIRECTION_WINDOW plus one frame: every frame up to there is on the start ray.
            seconds = (DIRECTION_WINDOW + speed / 8) / speed
            frames = np.arange(16)[np.arange(16) / 8 <= seconds]
            expected = centres[0] + np.outer(frames / 8, np.array(obj.velocity) * 32)
            np.testing.assert_allclose(centres[frames], expected, atol=1e-6)


def test_layout_rules(scenes):
    kinds = {s.kind for s in scenes}
    assert kinds == {"single", "pair"}
    for scene in scenes:
        assert len(scene.objects) == (1 if scene.kind == "single" else 2)
        assert [o.size for o in scene.objects].count("large") <= 1
        if scene.kind == "pair":
            a, b = scene.objects
            assert (a.colour, a.shape) != (b.colour, b.shape)
        for obj in scene.objects:
            assert SIZE_RANGE[obj.size][0] <= obj.side <= SIZE_RANGE[obj.size][1]
    directions = [o.direction for s in scenes for o in s.objects]
    assert set(directions) == set(DIRECTIONS)  # and roughly uniform: layouts never drop a direction
    assert min(directions.count(d) for d in DIRECTIONS) > 0.6 * len(directions) / 8
    assert ShapesVideoDataset(kinds={"pair": 1}).scene(0).kind == "pair"
    assert {ShapesVideoDataset(kinds={"single": 1}).scene(i).kind for i in range(20)} == {"single"}


def test_held_out_pairs_are_never_drawn(scenes):
    held = parse_held_out(DEFAULT_HELD_OUT)
    assert not {(o.colour, o.shape) for s in scenes for o in s.objects} & held
    ds = ShapesVideoDataset(seed=7, held_out="red circle")
    assert all((o.colour, o.shape) != ("red", "circle") for i in range(300) for o in ds.scene(i).objects)


def test_captions_name_what_is_drawn(scenes):
    speed_named = 0
    for scene in scenes:
        caption = scene.caption
        words = set(caption.split())
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in caption
            assert any(phrase in caption for phrase in DIRECTION_PHRASES[obj.direction]), caption
        named = {speed for speed, vocabulary in SPEED_WORDS.items() if words & vocabulary}
        assert named <= {o.speed for o in scene.objects}, caption
        speed_named += bool(named)
    assert 0.6 < speed_named / len(scenes) < 0.98  # most captions name a speed, not all
    assert any(" while " in s.caption for s in scenes) and any("drifting" in s.caption for s in scenes)


def test_input_errors_are_one_line():
    cases = [
        (dict(frames=1), "at least 2 frames"),
        (dict(fps=0), "fps must be a finite number > 0"),
        (dict(fps=float("nan")), "fps must be a finite number > 0"),
        (dict(fps=float("inf")), "fps must be a finite number > 0"),
        (dict(width=15), "at least 16x16"),
        (dict(held_out=["red banana"]), "bad held-out pair"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(kinds={"relation": 1}), "unknown kind"),
        (dict(kinds={"single": 0}), "positive sum"),
    ]
    for kwargs, message in cases:
        with pytest.raises(OmniditError, match=message) as err:
            ShapesVideoDataset(**kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(OmniditError, match="fewer than two"):
        ShapesVideoDataset(held_out=[f"{c} {s}" for c in COLOURS for s in SHAPES][1:])


def test_scenes_at_other_sizes_and_rates():
    for w, h, frames, fps in ((16, 16, 2, 8.0), (48, 32, 8, 8.0), (32, 64, 16, 3.0), (32, 32, 16, 30.0)):
        rng = np.random.default_rng(0)
        allowed = [(c, s) for c in COLOURS for s in SHAPES]
        for _ in range(20):
            scene = make_video_scene(rng, w, h, frames, fps, allowed)
            video = render_video(scene, frames, w, h, fps)
            assert video.shape == (frames, h, w, 3)
            assert (video != 255).any(axis=-1).any(axis=(1, 2)).all()  # every frame shows something


def test_a_training_batch_renders_well_under_a_second():
    ds = ShapesVideoDataset(seed=11)
    ds[0]
    start = time.process_time()  # CPU time: other processes on a shared machine do not count
    batch = torch.stack([ds[i]["video"] for i in range(1, 33)])
    assert batch.shape == (32, 3, 16, 32, 32)
    assert time.process_time() - start < 0.5  # ~0.05 s on a 2-core CPU


def test_replacing_a_velocity_changes_the_motion_only():
    scene = ShapesVideoDataset(seed=2, kinds={"single": 1}).scene(0)
    obj = scene.objects[0]
    still = replace(scene, objects=(replace(obj, velocity=(0.0, 0.0)),))
    path = trajectory(still, 16, 8.0, 32, 32)[0]
    assert np.allclose(path, path[0])


def test_a_counterfactual_clip_changes_the_direction_only_and_moves_the_new_way():
    from omnidit.data.shapes_video import counterfactual_video_scene
    from omnidit.evaluate.tracker import initial_motion

    ds = ShapesVideoDataset(32, 32, 8, 8.0, seed=3)
    directions, partners = set(), 0
    for i in range(80):
        scene, item = ds.scene(i), ds.counterfactual(i)
        if scene.kind == "pair":
            assert item is None  # only single-object clips have a partner
            continue
        rng = np.random.default_rng([3, i, 7])
        partner = counterfactual_video_scene(scene, rng, 32, 32, 8.0)
        if partner is None:
            assert item is None
            continue
        partners += 1
        (before,), (after,) = scene.objects, partner.objects
        assert after.direction != before.direction and item["caption"] == partner.caption
        assert replace(after, velocity=before.velocity, direction=before.direction) == before  # nothing else moved
        assert math.hypot(*after.velocity) == pytest.approx(math.hypot(*before.velocity))
        # the caption trades the direction phrase for the new one's in the same wording
        form = next(k for k in (0, 1) if DIRECTION_PHRASES[after.direction][k] in partner.caption
                    and partner.caption.replace(DIRECTION_PHRASES[after.direction][k],
                                                DIRECTION_PHRASES[before.direction][k], 1) == scene.caption)
        assert DIRECTION_PHRASES[after.direction][form] in partner.caption
        # the judge's tracker reads the new direction from the partner's motion, as it reads the data's
        centres = trajectory(partner, 8, 8.0, 32, 32)[0]
        assert initial_motion(centres, 8.0, 32)[0] == after.direction, (i, partner.caption)
        assert item["video"].shape == (3, 8, 32, 32)
        directions.add(after.direction)
        last, last_item = i, item
    assert partners >= 30 and len(directions) == 8
    again = ShapesVideoDataset(32, 32, 8, 8.0, seed=3).counterfactual(last)  # a function of (seed, index)
    assert again["caption"] == last_item["caption"] and torch.equal(again["video"], last_item["video"])


@pytest.mark.parametrize("part", ["vertical", "horizontal", "either"])
def test_a_counterfactual_clip_may_change_only_one_part_of_the_direction(part):
    from omnidit.data.shapes_video import DIRECTIONS, counterfactual_video_scene

    ds = ShapesVideoDataset(32, 32, 8, 8.0, seed=3, counterfactual_directions=part)
    pairs, parts_changed = set(), set()
    for i in range(120):
        scene, item = ds.scene(i), ds.counterfactual(i)
        partner = counterfactual_video_scene(scene, np.random.default_rng([3, i, 7]), 32, 32, 8.0, part)
        assert (item is None) == (partner is None) and (item is None or item["caption"] == partner.caption)
        if partner is None:
            continue
        before, after = DIRECTIONS[scene.objects[0].direction], DIRECTIONS[partner.objects[0].direction]
        differs = [np.sign(round(after[k], 9)) != np.sign(round(before[k], 9)) for k in (0, 1)]  # (x, y)
        assert sum(differs) == 1  # exactly one part of the direction changes
        parts_changed.add("horizontal" if differs[0] else "vertical")
        pairs.add((scene.objects[0].direction, partner.objects[0].direction))
    assert parts_changed == ({"vertical", "horizontal"} if part == "either" else {part})
    if part == "vertical":  # up against down and right against up or down and to the right, for example
        assert {("up", "down"), ("down", "up")} & pairs and any(a == "right" for a, _ in pairs)
    assert len(pairs) >= 6


def test_counterfactual_directions_are_checked():
    with pytest.raises(OmniditError, match="unknown counterfactual directions 'diagonal'"):
        ShapesVideoDataset(32, 32, 8, 8.0, counterfactual_directions="diagonal")
