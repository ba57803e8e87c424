"""Inpainting and outpainting (omnidit.inpaint, omnidit inpaint): the kept pixels come back bit for bit in both
modes, the blend mode's given tokens travel exactly their noised path, the mask rounds up to whole tokens, and
the command's mistakes are one-line errors with nothing written. The edit suite's judge passes perfect edits and
no unedited input. Inversion and prompt editing: tests/test_editing.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import record_results, video_clip_file
from PIL import Image
from test_cli import assert_one_line_error, run_main

from omnidit.errors import OmniditError
from omnidit.inpaint import move_region, pad_for_outpainting, resolve_mode, token_mask
from omnidit.sampling import sample


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_blend_moves_given_tokens_along_their_exact_noised_path(sampler):
    """What the model sees of a given token at time t is (1 - t) x0 + t noise, and the result ends exactly at x0."""
    gen = torch.Generator().manual_seed(0)
    noise, clean = torch.randn(2, 6, 3, generator=gen), torch.randn(2, 6, 3, generator=gen)
    given = torch.tensor([[True, False, True, False, False, True]])
    seen = []

    def velocity(x, t):
        seen.append((x.clone(), t.clone()))
        return torch.sin(x) + t  # anything: the generated tokens follow it

    out = sample(velocity, noise, 5, sampler, shift=2.0, given=given, given_tokens=clean, given_noised=True)
    for x, t in seen:
        path = (1 - t) * clean + t * noise
        torch.testing.assert_close(x[given.expand(2, -1)], path[given.expand(2, -1)], atol=1e-5, rtol=0)
    assert torch.equal(out[given.expand(2, -1)], clean[given.expand(2, -1)])
    assert not torch.allclose(out[~given.expand(2, -1)], clean[~given.expand(2, -1)])


def test_token_mask_rounds_up_to_whole_tokens():
    mask = torch.zeros(8, 12, dtype=torch.bool)
    mask[0, 0] = mask[5, 11] = True
    tokens = token_mask(mask, 4)  # a 2 x 3 grid of 4-pixel tokens
    assert tokens.tolist() == [True, False, False, False, False, True]


def test_token_mask_of_a_clip_marks_whole_tubelets():
    mask = torch.zeros(4, 8, 8, dtype=torch.bool)
    mask[1, 0, 0] = mask[2, 7, 7] = True  # frame 1 is in tubelet 0, frame 2 in tubelet 1 (temporal patch 2)
    tokens = token_mask(mask, 4, 2).view(2, 2, 2)
    assert tokens.sum() == 2 and tokens[0, 0, 0] and tokens[1, 1, 1]
    assert torch.equal(token_mask(mask[1], 4), token_mask(mask[1:2], 4, 1))  # one frame is an image


def test_a_video_model_inpaints_a_clip_and_keeps_every_other_pixel_of_every_frame():
    from omnidit.pipeline import load_pipeline

    video = load_pipeline("shapes-video", device="cpu")
    clip = video.generate_video(["a red circle moving right"], seed=1, steps=2)  # (1, 3, 8, 32, 32)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:16] = True
    out = video.inpaint(["a blue square moving right"], clip, mask, seed=3, steps=2, candidates=1)
    assert out.shape == clip.shape and torch.equal(out[..., 16:, :], clip[..., 16:, :])
    assert (out[..., :16, :] - clip[..., :16, :]).abs().mean() > 0.01
    late = torch.zeros(8, 32, 32, dtype=torch.bool)
    late[4:] = True  # the last four frames, whole: extension by inpainting
    extended = video.inpaint(["a red circle moving right"], clip, late, seed=3, steps=2, candidates=1)
    assert torch.equal(extended[:, :, :4], clip[:, :, :4]) and not torch.equal(extended[:, :, 4:], clip[:, :, 4:])
    with pytest.raises(OmniditError, match="mask is"):
        video.inpaint(["x"], clip, torch.ones(3, 32, 32, dtype=torch.bool), steps=2)


def test_outpainting_canvas_keeps_the_image_inside_and_marks_the_border():
    image = torch.rand(1, 3, 4, 8) * 2 - 1
    canvas, mask = pad_for_outpainting(image, None, (4, 0, 0, 4))
    assert canvas.shape == (1, 3, 8, 12) and torch.equal(canvas[:, :, :4, 4:], image)
    assert int(mask.sum()) == 8 * 12 - 4 * 8 and not mask[:4, 4:].any()
    inner = torch.zeros(4, 8, dtype=torch.bool)
    inner[0, 0] = True
    assert pad_for_outpainting(image, inner, (4, 0, 0, 4))[1][0, 4]


@pytest.fixture(scope="module")
def tiny_pipe(tiny_run):
    from omnidit.pipeline import load_pipeline

    return load_pipeline(tiny_run, device="cpu")


@pytest.mark.parametrize("mode", ["tokens", "blend"])
def test_inpainting_keeps_every_unmasked_pixel_and_fills_the_mask(tiny_pipe, mode):
    image = tiny_pipe.generate(["a red circle"], seed=1)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:7, 3:13] = True  # not token-aligned: rounded up for sampling, pasted back by pixel
    out = tiny_pipe.inpaint(["a green square", "a blue circle"], image, mask, mode=mode, seed=[5, 6])
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out[:, :, ~mask], image.expand(2, -1, -1, -1)[:, :, ~mask])
    assert (out[:, :, mask] - image[:, :, mask]).abs().mean() > 0.01
    again = tiny_pipe.inpaint(["a blue circle"], image, mask, mode=mode, seed=6)
    torch.testing.assert_close(again[0], out[1], atol=1e-5, rtol=0)  # a seed gives the same result in any batch


@pytest.mark.parametrize("mode", ["tokens", "blend"])
def test_best_of_n_inpainting_keeps_one_of_its_candidates(tiny_pipe, mode):
    from omnidit.selection import candidate_seeds

    image = tiny_pipe.generate(["a red circle"], seed=1)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:8] = True
    best = tiny_pipe.inpaint(["a green square", "a blue circle"], image, mask, mode=mode, seed=[5, 6], candidates=3)
    assert torch.equal(best[:, :, ~mask], image.expand(2, -1, -1, -1)[:, :, ~mask])
    for row, seed in zip(best, (5, 6)):
        alone = [tiny_pipe.inpaint(["a green square" if seed == 5 else "a blue circle"], image, mask, mode=mode,
                                   seed=k, candidates=1)[0] for k in candidate_seeds(seed, 3)]
        assert sum(torch.allclose(row, a, atol=1e-5, rtol=0) for a in alone) == 1


def test_the_modes_differ_and_auto_follows_training(tiny_pipe, av_run):
    from omnidit.pipeline import load_pipeline

    image = tiny_pipe.generate(["a red circle"], seed=1)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:8] = True
    tokens, blend = (tiny_pipe.inpaint(["a red circle"], image, mask, mode=m, seed=0) for m in ("tokens", "blend"))
    assert not torch.allclose(tokens, blend)
    assert resolve_mode("auto", tiny_pipe.config) == "blend"
    assert resolve_mode("auto", load_pipeline(av_run, device="cpu").config) == "tokens"


@pytest.mark.parametrize("bad, message", [
    (dict(mask=torch.zeros(16, 16, dtype=torch.bool)), "selects no pixels"),
    (dict(mask=torch.ones(8, 16, dtype=torch.bool)), "mask is 16x8"),
    (dict(image=torch.zeros(1, 3, 15, 15), mask=torch.ones(15, 15, dtype=torch.bool)), "tokens do not divide"),
    (dict(mode="paint"), "unknown inpainting mode"),
])
def test_bad_inpainting_inputs_are_clear_errors(tiny_pipe, bad, message):
    args = {"image": torch.zeros(1, 3, 16, 16), "mask": torch.ones(16, 16, dtype=torch.bool), **bad}
    with pytest.raises(OmniditError, match=message):
        tiny_pipe.inpaint(["a red circle"], **args)


def _png(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_inpaint_command_keeps_pixels_outside_the_box_and_outpaints(tmp_path, tiny_run, capsys):
    rng = np.random.default_rng(0)
    source = _png(tmp_path / "in.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out = tmp_path / "out.png"
    code, _, err = run_main(capsys, "inpaint", source, "box:0.25,0,0.75,0.5", "a red circle", "--model", tiny_run,
                            "-o", out, "--no-progress", "--seed", "3")
    assert code == 0, err
    before, after = np.asarray(Image.open(source)), np.asarray(Image.open(out))
    keep = np.ones((16, 16), dtype=bool)
    keep[0:8, 4:12] = False
    assert np.array_equal(before[keep], after[keep]) and not np.array_equal(before[~keep], after[~keep])
    with Image.open(out) as im:
        assert im.info["mode"] == "blend" and im.info["mask"] == "box:0.25,0,0.75,0.5" and im.info["seed"] == "3"
    grown = tmp_path / "grown.png"
    code, _, err = run_main(capsys, "inpaint", source, "none", "a red circle", "--model", tiny_run, "--outpaint", 0,
                            8, 0, 0, "-o", grown, "--no-progress")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(grown))[8:], before)


def test_move_region_pastes_the_pixels_exactly_and_leaves_the_hole_to_generate():
    image = torch.rand(2, 3, 8, 12) * 2 - 1
    mask = torch.zeros(8, 12, dtype=torch.bool)
    mask[1:4, 2:6] = True
    canvas, hole = move_region(image, mask, (3, 2))  # 3 right, 2 down: the new place overlaps the old one
    assert torch.equal(canvas[:, :, 3:6, 5:9], image[:, :, 1:4, 2:6])
    moved = torch.zeros_like(mask)
    moved[3:6, 5:9] = True
    assert torch.equal(hole, mask & ~moved) and int(hole.sum()) == 12 - 1  # they share one pixel
    assert torch.equal(canvas[:, :, ~moved], image[:, :, ~moved])  # everything else as it was, the hole included
    for shift, message in (((0, 0), "changes nothing"), ((7, 0), "leaves the 12x8 image"), ((0, -2), "leaves")):
        with pytest.raises(OmniditError, match=message):
            move_region(image, mask, shift)
    with pytest.raises(OmniditError, match="nothing to move"):
        move_region(image, torch.zeros(8, 12, dtype=torch.bool), (1, 0))


def test_inpaint_command_moves_what_the_mask_marks(tmp_path, tiny_run, capsys):
    rng = np.random.default_rng(0)
    before = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    source = _png(tmp_path / "in.png", before)
    out = tmp_path / "moved.png"
    code, _, err = run_main(capsys, "inpaint", source, "box:0,0,0.25,0.25", "a red circle", "--model", tiny_run,
                            "--move", 8, 4, "-o", out, "--no-progress")
    assert code == 0, err
    after = np.asarray(Image.open(out))
    assert np.array_equal(after[4:8, 8:12], before[0:4, 0:4])  # moved exactly
    untouched = np.ones((16, 16), dtype=bool)
    untouched[0:4, 0:4] = untouched[4:8, 8:12] = False  # the hole (generated) and the new place
    assert np.array_equal(after[untouched], before[untouched])
    assert not np.array_equal(after[0:4, 0:4], before[0:4, 0:4])
    with Image.open(out) as im:
        assert im.info["move"] == "[8, 4]"


@pytest.mark.parametrize("extra, message", [
    (["none"], "nothing to generate"),
    (["box:0,0,0.5,0.5", "--move", "12", "0"], "leaves the 16x16 image"),
    (["box:0,0,0.5,0.5", "--move", "2", "0", "--outpaint", "1", "1", "1", "1"], "do not go together"),
    (["box:0.5,0,0.2,1"], "is not inside the image"),
    (["box:a,b"], "cannot read the box"),
    (["MASK8"], "mask .* is 8x8 but the image is 16x16"),
    (["missing.png"], "cannot read the mask"),
    (["box:0,0,1,1", "--outpaint", "2", "0", "0", "-1"], "--outpaint"),
    (["box:0,0,1,1", "--mode", "paint"], "invalid choice"),
    (["box:0,0,1,1", "-o", "out.jpg"], "must end in .png"),
])
def test_inpaint_command_errors_are_one_line_and_write_nothing(tmp_path, tiny_run, capsys, extra, message):
    source = _png(tmp_path / "in.png", np.zeros((16, 16, 3), dtype=np.uint8))
    mask8 = _png(tmp_path / "m8.png", np.zeros((8, 8), dtype=np.uint8))
    extra = [mask8 if e == "MASK8" else e for e in extra]
    args = ["inpaint", source, extra[0], "a red circle", "--model", str(tiny_run), *extra[1:]]
    if "-o" not in extra:
        args += ["-o", str(tmp_path / "out.png")]
    code, _, err = run_main(capsys, *args)
    assert_one_line_error(code, err)
    assert re.search(message, err), err
    assert not (tmp_path / "out.png").exists()


def test_inpaint_command_refuses_a_model_with_sound(tmp_path, av_run, capsys):
    source = _png(tmp_path / "in.png", np.zeros((16, 16, 3), dtype=np.uint8))
    code, _, err = run_main(capsys, "inpaint", source, "box:0,0,1,1", "a red circle", "--model", av_run, "-o",
                            tmp_path / "out.png")
    assert_one_line_error(code, err, "images and silent clips")


def test_inpaint_command_inpaints_a_clip_with_a_video_model(tmp_path, capsys):
    from omnidit.video_io import load_video

    source = video_clip_file(tmp_path / "in.webp")
    out = tmp_path / "out.webp"
    code, stdout, err = run_main(capsys, "inpaint", source, "box:0,0,1,0.5", "a blue square moving right", "--model",
                                 "shapes-video", "--steps", "2", "-o", out, "--no-progress")
    assert code == 0, err
    frames, fps, metadata = load_video(out)
    assert frames.shape == (3, 8, 32, 32) and fps == 8.0 and metadata["prompt"] == "a blue square moving right"
    before = load_video(source)[0]
    kept, changed = ((frames[:, :, rows] - before[:, :, rows]).abs().mean() for rows in (slice(16, 32), slice(0, 16)))
    assert kept < 0.02 < changed  # kept, up to the lossy file's encoding (exactness: the API test above)
    for extra, message in ((["-n", "2"], "a clip is inpainted once"),
                           (["--outpaint", "0", "0", "4", "0"], "--outpaint"), (["-o", tmp_path / "clip.jpg"], ".mp4")):
        args = ["inpaint", source, "box:0,0,1,0.5", "x", "--model", "shapes-video", *extra]
        code, _, err = run_main(capsys, *(args if "-o" in extra else [*args, "-o", tmp_path / "bad.webp"]))
        assert_one_line_error(code, err)
        assert message in err, err
    assert not (tmp_path / "bad.webp").exists() and not (tmp_path / "clip.jpg").exists()


def test_the_edit_judge_passes_every_perfect_edit_and_no_unedited_input():
    from omnidit.evaluate.edit_suite import CATEGORIES, edit_cases, judge_edit

    cases = edit_cases(32, 32, ["red triangle", "blue circle", "green square", "yellow diamond"], 16)
    assert [c["category"] for c in cases] == [c for c in CATEGORIES for _ in range(16)]
    assert all(judge_edit(c, c["answer"])[0] for c in cases)
    assert not any(judge_edit(c, c["image"])[0] for c in cases)
    for c in cases:  # the masked pixels are where the answer differs from the input, and only there
        differs = (c["answer"] != c["image"]).any(dim=0)
        assert not differs[~c["mask"]].any() and differs[c["mask"]].any()
        assert "red triangle" not in c["prompt"] and "blue circle" not in c["prompt"]
        assert (c["source"] == c["prompt"]) == c["category"].endswith("restore")
        colour, shape = c["want"]
        assert c["object_prompt"] in (f"a {colour} {shape}", f"an {colour} {shape}")  # the filled object alone


def _edit_suite(tmp_path, run, capsys, *flags) -> tuple[dict, str]:
    """`omnidit eval RUN --suite edit --limit 1 FLAGS` -> (its JSON report, its stdout)."""
    out = tmp_path / "edit.json"
    code, stdout, err = run_main(capsys, "eval", run, "--suite", "edit", "--limit", "1", "--json", out,
                                 "--no-progress", *flags)
    assert code == 0, err
    return json.loads(out.read_text()), stdout


def test_edit_suite_runs_on_a_model_and_reports_exact_kept_pixels(tmp_path, tiny_run, capsys):
    report, stdout = _edit_suite(tmp_path, tiny_run, capsys, "--inpaint-mode", "tokens")
    assert report["suite"] == "edit" and report["n_images"] == 6 and report["kept_exact"] == 1.0
    assert set(report["categories"]) == {"inpaint_recolour", "inpaint_replace", "inpaint_restore", "edit_recolour",
                                         "edit_replace", "move"} and report["inpaint_mode"] == "tokens"
    assert report["reconstruction_psnr"] > 20 and report["inject_until"] == 0.9
    assert "pixels outside the mask exact in 1.000" in stdout and "PSNR" in stdout
    assert report["inpaint_prompt"] == "scene"  # auto, for a model not trained on objects' own captions


def test_edit_suite_can_ask_inpaints_for_the_object_alone(tmp_path, tiny_run, capsys):
    report, stdout = _edit_suite(tmp_path, tiny_run, capsys, "--inpaint-prompt", "object")
    assert report["inpaint_prompt"] == "object" and "prompts: object" in stdout
    asked = {f["category"]: f["prompt"] for f in report["failures"]}
    assert {"inpaint_recolour", "inpaint_replace", "edit_replace"} <= set(asked)  # the tiny model fails these
    assert all(re.fullmatch(r"an? \w+ \w+", asked[c]) for c in ("inpaint_recolour", "inpaint_replace"))
    assert len(asked["edit_replace"].split()) >= 5  # edits keep the scene's caption: two objects and their relation
    code, _, err = run_main(capsys, "eval", tiny_run, "--suite", "edit", "--inpaint-prompt", "objects")
    assert code == 2 and "invalid choice" in err


def test_the_edit_suite_needs_an_image_model(av_run, capsys):
    code, _, err = run_main(capsys, "eval", av_run, "--suite", "edit", "--limit", "1")
    assert_one_line_error(code, err, "edit suite needs an image model")


def test_mask_aware_training_draws_rectangles_to_generate_or_keep():
    from omnidit.flow import draw_given_regions, given_token_times

    given, on_box = draw_given_regions(4000, 2, 4, 6, 0.5, torch.Generator().manual_seed(0))  # 2 tubelets of 4x6
    assert not on_box.any()  # no boxes: no sample's region is one
    assert given.shape == (4000, 48)
    some = given.any(1)
    assert abs(some.float().mean() - 0.5) < 0.03
    frames = given[some].view(-1, 2, 4, 6)
    assert torch.equal(frames[:, 0], frames[:, 1])  # the same region in every frame
    generate = ~frames[:, 0]
    assert generate.any((1, 2)).all() and frames[:, 0].any((1, 2)).all()  # each keeps some of both
    def rectangle(region: torch.Tensor) -> bool:  # its bounding box, filled
        rows, cols = region.any(1).nonzero().flatten(), region.any(0).nonzero().flatten()
        return bool(region[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()) and region.sum() == len(rows) * len(cols)

    inside = torch.tensor([rectangle(r) for r in generate])  # inpainting: a rectangle to generate
    outside = torch.tensor([rectangle(~r) for r in generate])  # outpainting: a rectangle given
    assert (inside | outside).all()
    assert inside.float().mean() > 0.72 and outside.float().mean() > 0.22  # 3 : 1 (rows of the grid count twice)
    assert not draw_given_regions(50, 1, 1, 8, 1.0, torch.Generator().manual_seed(0))[0].any()  # one row: none
    t = given_token_times(torch.tensor([0.5, 0.75]), torch.tensor([[True, False], [False, False]]))
    assert t.tolist() == [[0.0, 0.5], [0.75, 0.75]]


def test_object_regions_generate_each_objects_grown_box_and_leave_other_draws_as_they_were():
    from omnidit.flow import draw_given_regions

    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [float("nan")] * 4, [0.0, 0.5, 0.3, 1.0]]).repeat(100, 1)
    given, on_box = draw_given_regions(300, 1, 8, 8, 1.0, torch.Generator().manual_seed(0), boxes, 0.5)
    grown = torch.zeros(2, 8, 8, dtype=torch.bool)
    grown[0, 1:5, 1:5] = True  # 2..4 tokens on each axis, half a token more, rounded out
    grown[1, 3:8, 0:3] = True  # clipped at the edges
    generate = ~given.view(100, 3, 8, 8)
    for row in (0, 2):
        hits = (generate[:, row] == grown[row // 2]).all((1, 2))
        assert 0.35 < hits.float().mean() < 0.65  # box_p of them; the others random rectangles
        assert (hits[on_box.view(100, 3)[:, row]]).all()  # the samples said to be on their box are
        assert on_box.view(100, 3)[:, row].sum() >= hits.sum() - 3  # (a random rectangle may hit the box too)
    assert not on_box.view(100, 3)[:, 1].any()
    assert generate[:, 1].any((1, 2)).all() and given.any(1).all()  # no box: a random region as before
    plain, _ = draw_given_regions(300, 1, 8, 8, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, draw_given_regions(300, 1, 8, 8, 1.0, torch.Generator().manual_seed(0), boxes, 0.0)[0])


def test_object_boxes_are_one_object_of_each_scene():
    from omnidit.data.shapes import ShapesDataset
    from omnidit.train_batches import object_boxes

    data = ShapesDataset(seed=5)
    boxes, captions, _ = object_boxes(data, range(40), torch.Generator().manual_seed(0))
    for i, (box, caption) in enumerate(zip(boxes, captions)):
        chosen = [o for o in data.scene(i).objects if torch.allclose(box, torch.tensor(o.box))]
        assert chosen and caption in {f"a {o.colour} {o.shape}" for o in chosen} | {
            f"an {o.colour} {o.shape}" for o in chosen}
    several = [i for i in range(40) if len(data.scene(i).objects) > 1]
    firsts = [torch.allclose(boxes[i], torch.tensor(data.scene(i).objects[0].box)) for i in several]
    assert 0 < sum(firsts) < len(several)  # not always the first object


def test_region_objects_needs_regions_of_shapes_data():
    from omnidit.config import Config, DataConfig, TrainConfig

    with pytest.raises(OmniditError, match="region_objects"):
        Config(train=TrainConfig(region_objects=0.5))
    with pytest.raises(OmniditError, match="region_objects"):
        Config(data=DataConfig(name="digits"), train=TrainConfig(region_p=0.5, region_objects=0.5))
    assert Config(train=TrainConfig(region_p=0.5, region_objects=0.5)).train.region_objects == 0.5


def test_region_p_gives_rectangles_at_t_0_and_leaves_other_draws_as_they_were(make_tiny_config, tmp_path):
    from omnidit.flow import sample_timesteps
    from omnidit.train_batches import image_draws

    off, on = (make_tiny_config(tmp_path, train={"region_p": p}) for p in (0.0, 1.0))
    t, noise, on_box = image_draws(off, 8, 16, (4, 4), torch.Generator().manual_seed(3))
    assert not on_box.any()
    g = torch.Generator().manual_seed(3)
    tc = off.train
    assert torch.equal(t, sample_timesteps(8, tc.timesteps, tc.t_mean, tc.t_std, tc.t_shift, generator=g))
    assert torch.equal(noise, torch.randn(noise.shape, generator=g))
    t_on, noise_on, _ = image_draws(on, 8, 16, (4, 4), torch.Generator().manual_seed(3))
    assert t_on.shape == (8, 16) and torch.equal(noise_on, noise)  # regions are drawn after the noise
    given = t_on == 0
    assert given.any(1).all() and (~given).any(1).all()
    assert torch.equal(t_on[~given], t[:, None].expand(-1, 16)[~given])


def test_a_region_trained_model_inpaints_with_given_tokens_by_default(tmp_path, make_tiny_config):
    from omnidit.pipeline import load_pipeline
    from omnidit.train import train

    final = train(make_tiny_config(tmp_path / "run", train={"steps": 2, "checkpoint_every": 2, "region_p": 1.0}),
                  progress=False)
    assert resolve_mode("auto", load_pipeline(final, device="cpu").config) == "tokens"


def _record_trained_conditions(monkeypatch, train_module) -> list:
    """Wrap the trainer's ``velocity_errors`` so that every call's condition is appended to the returned list."""
    real, conds = train_module.velocity_errors, []
    monkeypatch.setattr(train_module, "velocity_errors",
                        lambda v, x0, cond, *a: conds.append(cond) or real(v, x0, cond, *a))
    return conds


def test_region_caption_trains_object_regions_on_the_objects_own_captions(make_tiny_config, tmp_path, monkeypatch):
    import omnidit.train as train_module
    from omnidit.train import Trainer

    config = make_tiny_config(tmp_path / "run", train={"region_p": 1.0, "region_objects": 1.0, "region_caption": 1.0,
                                                       "cond_dropout": 0.0})
    trainer = Trainer(config, progress=False)
    captions = []
    encode = trainer.condition
    monkeypatch.setattr(trainer, "condition",
                        lambda texts, labels: captions.append(list(texts)) or encode(texts, labels))
    conds = _record_trained_conditions(monkeypatch, train_module)
    trainer.train_step()
    scenes, phrases = captions  # the scenes' captions, then every object region's own (all of them here)
    objects = [trainer.dataset.scene(i).objects for i in range(len(scenes))]
    assert all(any(p.endswith(f"{o.colour} {o.shape}") for o in objs) for p, objs in zip(phrases, objects))
    assert scenes != phrases and len(conds) == 1
    expected = encode(phrases, torch.zeros(len(phrases), dtype=torch.long))
    length = expected.txt.shape[1]
    assert torch.equal(conds[0].txt[:, :length], expected.txt)  # trained on the objects' captions


def test_region_caption_and_empty_need_object_regions():
    from omnidit.config import Config, TextConfig, TrainConfig

    for key in ("region_caption", "region_empty"):
        with pytest.raises(OmniditError, match=f"{key} .*region_objects is 0"):
            Config(train=TrainConfig(region_p=0.5, **{key: 0.5}))
        with pytest.raises(OmniditError, match=rf"{key} must lie in \[0, 1\]"):
            Config(train=TrainConfig(region_p=0.5, region_objects=0.5, **{key: -0.1}))
    with pytest.raises(OmniditError, match=r"region_caption must lie in \[0, 1\]"):
        Config(train=TrainConfig(region_p=0.5, region_objects=0.5, region_caption=1.5))
    assert Config(train=TrainConfig(region_p=0.5, region_objects=0.5, region_caption=0.5)).train.region_caption == 0.5
    objects = {"region_p": 0.5, "region_objects": 0.5, "region_caption": 0.5}
    with pytest.raises(OmniditError, match="needs a text encoder and no layout boxes"):
        Config(text=TextConfig(encoder="none"), train=TrainConfig(**objects))
    with pytest.raises(OmniditError, match="needs a text encoder and no layout boxes"):
        Config(train=TrainConfig(init_from="shapes", layout_boxes=8, **objects))


def test_empty_regions_are_object_sized_boxes_over_background_and_leave_other_draws_as_they_were():
    from omnidit.data.shapes import BACKGROUND, ShapesDataset, render_scene
    from omnidit.flow import box_token_span
    from omnidit.train_batches import object_boxes

    data, n = ShapesDataset(seed=5), 200
    plain = object_boxes(data, range(n), torch.Generator().manual_seed(0))
    off = object_boxes(data, range(n), torch.Generator().manual_seed(0), (8, 8), 0.0)
    assert torch.equal(plain[0], off[0]) and plain[1] == off[1] and not off[2].any()
    boxes, captions, empty = object_boxes(data, range(n), torch.Generator().manual_seed(0), (8, 8), 1.0)
    assert captions == plain[1] and 0.3 < empty.float().mean() < 0.7  # a crowded scene keeps its object's box
    assert torch.equal(boxes[~empty], plain[0][~empty])
    moved = empty.nonzero().flatten().tolist()
    assert len({tuple(boxes[i].tolist()) for i in moved}) == len(moved)  # placed anywhere free, not in one spot
    for i in moved:
        assert torch.allclose(boxes[i, 2:] - boxes[i, :2], plain[0][i, 2:] - plain[0][i, :2])  # the object's size
        assert boxes[i].min() >= 0 and boxes[i].max() <= 1
        (x0, x1), (y0, y1) = (box_token_span(boxes[i, a], boxes[i, a + 2], 8) for a in (0, 1))
        region = render_scene(data.scene(i), 32, 32)[int(y0) * 4:int(y1) * 4, int(x0) * 4:int(x1) * 4]
        assert (region == np.array(BACKGROUND, dtype=region.dtype)).all()  # nothing of any object in it


def test_empty_regions_keep_the_scenes_caption(make_tiny_config, tmp_path, monkeypatch):
    import omnidit.train as train_module
    from omnidit.train import Trainer

    config = make_tiny_config(tmp_path / "run", train={"region_p": 1.0, "region_objects": 1.0, "region_caption": 1.0,
                                                       "region_empty": 1.0, "cond_dropout": 0.0, "batch_size": 16})
    trainer = Trainer(config, progress=False)
    drawn = record_results(monkeypatch, train_module, "object_boxes")
    conds = _record_trained_conditions(monkeypatch, train_module)
    trainer.train_step()
    ((_, phrases, empty),) = drawn
    assert 0 < int(empty.sum()) < len(empty)
    scenes = [trainer.dataset.scene(i).caption for i in range(len(empty))]
    labels = torch.zeros(len(empty), dtype=torch.long)
    want = trainer.condition([s if e else p for s, p, e in zip(scenes, phrases, empty.tolist())], labels)
    length = max(want.txt.shape[1], conds[0].txt.shape[1])
    assert torch.equal(conds[0].pad_text(length).txt, want.pad_text(length).txt)


def test_region_caption_swaps_only_rows_whose_region_is_their_object(make_tiny_config, tmp_path, monkeypatch):
    import omnidit.train as train_module
    from omnidit.train import Trainer

    config = make_tiny_config(tmp_path / "run", train={"region_p": 1.0, "region_objects": 0.5, "region_caption": 1.0,
                                                       "cond_dropout": 0.0, "batch_size": 16})
    trainer = Trainer(config, progress=False)
    drawn = record_results(monkeypatch, train_module, "image_draws")
    conds = _record_trained_conditions(monkeypatch, train_module)
    boxes = record_results(monkeypatch, train_module, "object_boxes")
    trainer.train_step()
    phrases = [b[1] for b in boxes]
    on_box = drawn[0][2]
    assert 0 < int(on_box.sum()) < len(on_box)  # some rows on their object, the others random rectangles
    scenes = [trainer.dataset.scene(i).caption for i in range(len(on_box))]
    want = trainer.condition([p if b else s for s, p, b in zip(scenes, phrases[0], on_box.tolist())],
                             torch.zeros(len(on_box), dtype=torch.long))
    length = max(want.txt.shape[1], conds[0].txt.shape[1])
    assert torch.equal(conds[0].pad_text(length).txt, want.pad_text(length).txt)


def test_empty_places_follow_the_grid_axes_on_a_wide_image():
    from omnidit.data.shapes import BACKGROUND, ShapesDataset, render_scene
    from omnidit.flow import box_token_span
    from omnidit.train_batches import object_boxes

    data = ShapesDataset(width=64, height=32, seed=3)  # 4 x 8 tokens of 8 pixels: rows != columns
    boxes, _, empty = object_boxes(data, range(80), torch.Generator().manual_seed(1), (4, 8), 1.0)
    assert empty.sum() > 10
    for i in empty.nonzero().flatten().tolist():
        (x0, x1), (y0, y1) = box_token_span(boxes[i, 0], boxes[i, 2], 8), box_token_span(boxes[i, 1], boxes[i, 3], 4)
        region = render_scene(data.scene(i), 64, 32)[int(y0) * 8:int(y1) * 8, int(x0) * 8:int(x1) * 8]
        assert (region == np.array(BACKGROUND, dtype=region.dtype)).all()
    with pytest.raises(ValueError, match="token grid"):
        object_boxes(data, range(4), torch.Generator().manual_seed(1), None, 0.5)


def test_edit_suite_asks_a_model_trained_on_objects_captions_by_the_object(tiny_run):
    from omnidit.evaluate.edit_suite import evaluate_edit
    from omnidit.pipeline import load_pipeline

    pipe = load_pipeline(tiny_run / "checkpoint-0000020", device="cpu")
    with pytest.raises(OmniditError, match="unknown inpainting prompt"):
        evaluate_edit(pipe, limit=1, progress=False, inpaint_prompt="objects")
    pipe.config.train.region_caption = 0.5  # as a model trained with it says in its config
    report = evaluate_edit(pipe, limit=1, progress=False, steps=2)
    assert report.details["inpaint_prompt"] == "object"
    asked = {j.category: j.prompt for j in report.judged}
    assert all(re.fullmatch(r"an? \w+ \w+", asked[c]) for c in ("inpaint_replace", "inpaint_restore"))
