"""`omnidit generate` with a video model: MP4 / GIF / strip outputs, image-to-video, extension, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import build, tiny_config
from PIL import Image
from test_cli import assert_one_line_error, run_main

from omnidit.checkpoint import save_checkpoint
from omnidit.config import Config
from omnidit.video_io import load_video, save_video

GEN = ["--steps", "2", "--no-progress", "--cfg", "2"]


def _video_checkpoint(folder, temporal_patch: int = 1):
    cfg = tiny_config(context_dim=384, pooled_dim=384, temporal_patch=temporal_patch, rope_time_scale=8.0)
    config = Config()
    config.model = cfg
    config.data.name, config.data.width, config.data.height = "shapes_video", 16, 16
    config.data.frames, config.data.fps = 4, 8.0
    state = build(cfg).state_dict()
    return save_checkpoint(folder, config, state, state)


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    return _video_checkpoint(tmp_path_factory.mktemp("video") / "model")


@pytest.fixture(scope="module")
def tubelet_model(tmp_path_factory):
    return _video_checkpoint(tmp_path_factory.mktemp("video2") / "model", temporal_patch=2)


def test_generate_writes_a_playable_mp4_with_its_settings(tmp_path, capsys, video_model):
    out = tmp_path / "clip.mp4"
    code, stdout, err = run_main(capsys, "generate", "a red circle moving to the right", "--model", video_model,
                                 "--frames", "6", "--fps", "12", "--seed", "3", "-o", out, *GEN)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    frames, fps, meta = load_video(out)
    assert frames.shape == (3, 6, 16, 16) and fps == pytest.approx(12.0)
    assert meta["prompt"] == "a red circle moving to the right" and meta["seed"] == 3 and meta["frames"] == 6
    # a GIF of the same clip; the same seed gives the same frames (a PNG strip is lossless)
    gif = tmp_path / "clip.gif"
    assert run_main(capsys, "generate", "a red circle moving to the right", "--model", video_model, "--frames", "6",
                    "--fps", "12", "--seed", "3", "-o", gif, *GEN)[0] == 0
    assert load_video(gif)[0].shape == (3, 6, 16, 16)
    strips = []
    for name in ("a.png", "b.png"):
        assert run_main(capsys, "generate", "a red circle", "--model", video_model, "-n", "2", "--scale", "2",
                        "-o", tmp_path / name, *GEN)[0] == 0
        with Image.open(tmp_path / name) as im:
            strips.append(np.asarray(im.convert("RGB")))
    assert np.array_equal(*strips)
    assert strips[0].shape[0] > 32 and strips[0].shape[1] > 4 * 32  # 4 frames of a 2-clip grid at 2x


def test_image_to_video_starts_from_the_given_image(tmp_path, capsys, video_model):
    first = np.zeros((16, 16, 3), dtype=np.uint8)
    first[4:12, 2:10] = (255, 0, 0)
    Image.fromarray(first).save(tmp_path / "first.png")
    out = tmp_path / "i2v.gif"
    code, _, err = run_main(capsys, "generate", "a red square moving right", "--model", video_model, "--image",
                            tmp_path / "first.png", "-o", out, *GEN)
    assert code == 0, err
    frames, _, meta = load_video(out, as_uint8=True)
    assert frames.shape == (4, 16, 16, 3) and meta["image"].endswith("first.png")
    assert np.abs(frames[0].numpy().astype(int) - first).mean() < 4  # frame 0 is the given image, up to the GIF palette


def test_extend_appends_new_frames_after_the_clip(tmp_path, capsys, video_model):
    clip = torch.rand(3, 3, 16, 16) * 2 - 1
    save_video(clip, tmp_path / "start.gif", 8.0)
    out = tmp_path / "longer.gif"
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", video_model, "--extend",
                            tmp_path / "start.gif", "--frames", "5", "-o", out, *GEN)
    assert code == 0, err
    given, _, _ = load_video(tmp_path / "start.gif")
    frames, fps, _ = load_video(out)
    assert frames.shape[1] == 3 + 5 and fps == pytest.approx(8.0)
    assert (frames[:, :3] - given).abs().mean() < 0.05  # the clip itself comes first, unchanged


@pytest.mark.parametrize("args,fragments", [
    (["--frames", "5"], ["does not split into tubelets of 2 frames", "nearest is 4"]),
    (["--frames", "0"], ["--frames must be >= 1"]),
    (["--frames", "1000"], ["--frames must be >= 1 and <= 256", "--extend"]),
    (["--fps", "0"], ["--fps must be > 0"]),
    (["--fps", "nan"], ["--fps must be a finite number"]),
    (["--image", "missing.png"], ["cannot read the image"]),
    (["--extend", "missing.mp4"], ["missing.mp4"]),
    (["-o", "clip.avi"], ["cannot be written to"]),
    (["--image", "x.png", "--extend", "y.mp4"], ["--image and --extend"]),
])
def test_bad_video_input_is_one_line_and_writes_nothing(tmp_path, capsys, tubelet_model, monkeypatch, args,
                                                         fragments):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", tubelet_model, *args, *GEN)
    assert_one_line_error(code, err, *fragments)
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".mp4", ".avi", ".gif", ".png")]


def test_a_given_image_of_another_size_is_refused(tmp_path, capsys, video_model):
    Image.new("RGB", (24, 16), "white").save(tmp_path / "wide.png")
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", video_model, "--image",
                            tmp_path / "wide.png", "-o", tmp_path / "x.mp4", *GEN)
    assert_one_line_error(code, err, "is 24x16 but the clip is 16x16", "--size 24x16")
    assert not (tmp_path / "x.mp4").exists()
    # an image twice the clip's size in both sides (what generate --scale 2 writes) is averaged back down
    Image.new("RGB", (32, 32), "red").save(tmp_path / "scaled.png")
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", video_model, "--image",
                            tmp_path / "scaled.png", "-o", tmp_path / "y.mp4", *GEN)
    assert code == 0 and "is 32x32, 2 times the model's 16x16: averaged down by 2" in err, err
    # inpaint with a video model changes a clip, and a still image is not one
    code, _, err = run_main(capsys, "inpaint", tmp_path / "wide.png", "box:0,0,0.5,1", "a red circle", "--model",
                            video_model, "-o", tmp_path / "x.mp4", "--no-progress")
    assert_one_line_error(code, err, "is a PNG, and this video model changes clips", "--model shapes")
    assert not (tmp_path / "x.mp4").exists()


def test_image_models_refuse_video_flags_and_outputs(tmp_path, capsys):
    code, _, err = run_main(capsys, "generate", "a red circle", "--frames", "8", "-o", tmp_path / "x.png", *GEN)
    assert_one_line_error(code, err, "for video models")
    code, _, err = run_main(capsys, "generate", "a red circle", "-o", tmp_path / "x.mp4", *GEN)
    assert_one_line_error(code, err, "must end in .png")
    assert not list(tmp_path.iterdir())


def test_eval_video_suite_on_a_video_model_writes_its_report(tmp_path, capsys, video_model):
    report = tmp_path / "video.json"
    code, out, err = run_main(capsys, "eval", video_model, "--limit", "1", "--n-per-prompt", "1", "--steps", "2",
                              "--json", report, "--no-progress", "--no-fd")
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["suite"] == "video" and data["settings"]["frames"] == 4 and data["settings"]["steps"] == 2
    assert set(data["categories"]) >= {"direction", "image_to_video"}
    assert data["overall"] < 0.5 and data["failures"]  # random weights draw no tracked shapes
    assert (tmp_path / "eval_video.png").is_file() and "image_to_video" in out


def test_demo_with_a_video_model_draws_a_row_of_frames_per_prompt(tmp_path, capsys, video_model):
    from omnidit.demo import DEMO_VIDEO_PROMPTS

    out = tmp_path / "demo.png"
    code, stdout, err = run_main(capsys, "demo", "--model", video_model, "--steps", "2", "-o", out, "--no-progress")
    assert code == 0, err
    with Image.open(out) as im:
        assert im.height >= len(DEMO_VIDEO_PROMPTS) * 96 and im.width > 4 * 96  # 4 frames per row, enlarged
        assert "moving to the right" in im.text["prompts"]


def test_info_describes_the_clips(capsys, tubelet_model):
    code, out, err = run_main(capsys, "info", tubelet_model)
    assert code == 0, err
    assert "shapes_video 16x16, 4 frames at 8 fps (tubelets of 2 frames)" in out


@pytest.mark.parametrize("args,fragments", [
    (["--cfg", "nan"], ["--cfg must be a finite number"]),
    (["--cfg", "inf"], ["--cfg must be a finite number"]),
    (["--shift", "0"], ["--shift must be > 0"]),
    (["--seed", "-5"], ["--seed must be >= 0", "-1 draws a random seed"]),
    (["-o", "no/such/folder/x.png"], ["the folder no/such/folder does not exist", "mkdir -p"]),
])
def test_bad_numbers_and_paths_are_refused_before_any_work(tmp_path, capsys, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "generate", "a red circle", *GEN, *args)  # last flag wins: args after GEN
    assert_one_line_error(code, err, *fragments)
    assert not list(tmp_path.iterdir())  # no folder created, nothing written


def test_seed_minus_one_draws_a_random_seed_and_records_it(tmp_path, capsys):
    outs = []
    for name in ("a.png", "b.png"):
        code, stdout, err = run_main(capsys, "generate", "a red circle", "--seed", "-1", "-o", tmp_path / name, *GEN)
        assert code == 0, err
        seed = int(stdout.split("seed ")[1].split()[0])
        with Image.open(tmp_path / name) as im:
            assert im.text["seed"] == str(seed)
        outs.append(seed)
    assert outs[0] != outs[1] and all(0 <= s < 2**31 for s in outs)


def test_the_python_api_refuses_non_finite_guidance():
    from omnidit.errors import OmniditError
    from omnidit.pipeline import load_pipeline

    pipe = load_pipeline("shapes", device="cpu")
    with pytest.raises(OmniditError, match="cfg must be a finite number"):
        pipe.generate(["a red circle"], cfg=float("nan"), steps=1)
    with pytest.raises(OmniditError, match="steps must be >= 1"):
        pipe.generate(["a red circle"], steps=0)


def test_extend_gives_each_window_the_last_frames_made_so_far(monkeypatch):
    from omnidit.generate_command import extend_clip

    class Recorder:  # a stand-in pipeline: each window's new frames are the window's index
        config = Config()
        model = type("M", (), {"config": tiny_config(temporal_patch=2)})()
        calls: list = []

        def generate_video(self, prompts, frames, fps, seed, given, given_frames, **kw):
            self.calls.append((given.clone(), list(given_frames), seed))
            out = given.clone()
            out[:, :, len(given_frames):] = len(self.calls)
            return out

    pipe = Recorder()
    pipe.config.data.frames = 8
    clip = torch.arange(6.0).view(1, 6, 1, 1).expand(3, 6, 2, 2) / 10  # frame k holds k / 10
    out = extend_clip(pipe, ["p"], clip, 7, 8.0, seed=5)
    assert out.shape == (1, 3, 13, 2, 2) and torch.equal(out[0, :, :6], clip)
    (g1, f1, s1), (g2, f2, s2) = pipe.calls
    assert f1 == [0, 1, 2, 3] and torch.equal(g1[0, :, :4], clip[:, 2:6])  # the clip's last half window
    assert torch.equal(g2[0, :, :4], out[0, :, 6:10]) and (s1, s2) == (5, 9)  # then the frames it made
    assert (out[0, :, 6:10] == 1).all() and (out[0, :, 10:] == 2).all()


def test_image_to_video_holds_the_image_for_a_whole_tubelet(tmp_path, capsys, tubelet_model):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    out = tmp_path / "i2v.png"
    code, _, err = run_main(capsys, "generate", "a red square", "--model", tubelet_model, "--image",
                            tmp_path / "red.png", "-o", out, *GEN)
    assert code == 0, err
    with Image.open(out) as im:
        strip = np.asarray(im.convert("RGB"))
    assert (strip[2:18, 2:18] == (255, 0, 0)).all() and (strip[2:18, 20:36] == (255, 0, 0)).all()  # frames 0, 1
