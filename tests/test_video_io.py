"""Saving and loading clips: MP4 (H.264), GIF, WebP round trips, PNG strips, metadata, and input errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from omnidit import video_io
from omnidit.errors import OmniditError
from omnidit.video_io import load_video, save_video

av = pytest.importorskip("av")

# Mean absolute error, in 8-bit levels, allowed after a lossy round trip of smooth content. Measured: MP4 (crf 12,
# yuv420p) ~1.5, GIF (256-colour palette) ~1.4, WebP (quality 90) ~1.9.
TOLERANCE = 3.0
METADATA = {"prompt": "a red circle — ✓", "seed": 7, "settings": {"steps": 4, "cfg": 3.5, "sampler": "euler"}}


def smooth_clip(frames: int = 12, height: int = 32, width: int = 32) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1]: slow colour waves drifting over time."""
    t = torch.arange(frames, dtype=torch.float32)[:, None, None]
    y = torch.arange(height, dtype=torch.float32)[None, :, None]
    x = torch.arange(width, dtype=torch.float32)[None, None, :]
    zero = torch.zeros(frames, height, width)
    return torch.stack([0.3 * torch.sin(x / 6 + t / 3) + zero, 0.3 * torch.cos(y / 5 - t / 4) + zero,
                        0.3 * torch.sin((x + y) / 8) + zero])


def mean_error_levels(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() * 127.5)


@pytest.mark.parametrize(("size", "fps"), [((32, 32), 8.0), ((17, 33), 12.5)])
def test_mp4_round_trip(tmp_path, size, fps):
    clip = smooth_clip(12, *size)
    path = save_video(clip, tmp_path / "clip.mp4", fps, METADATA)
    frames, got_fps, metadata = load_video(path)
    assert frames.shape == clip.shape and frames.dtype == torch.float32
    assert got_fps == fps and metadata == METADATA
    assert mean_error_levels(frames, clip) < TOLERANCE
    with av.open(str(path)) as container:  # a real, browser-playable H.264 stream at the right rate
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (size[1] + size[1] % 2, size[0] + size[0] % 2)
        assert float(stream.average_rate) == fps and stream.frames == 12
        assert json.loads(container.metadata["comment"])["prompt"] == METADATA["prompt"]
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left behind


def test_mp4_scale_and_uint8(tmp_path):
    clip = smooth_clip(3, 5, 7)
    rgb = ((clip + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)  # (T, H, W, 3)
    path = save_video(rgb, tmp_path / "big.mp4", 30000 / 1001, scale=4)
    frames, fps, metadata = load_video(path, as_uint8=True)
    assert frames.shape == (3, 20, 28, 3) and frames.dtype == torch.uint8
    assert fps == 30000 / 1001 and metadata == {}
    expected = rgb.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    assert (frames.float() - expected.float()).abs().mean() < TOLERANCE
    tiny, _, _ = load_video(save_video(clip[:, :1, :1, :1], tmp_path / "dot.mp4", 1))  # 1x1, padded to 2x2
    assert tiny.shape == (3, 1, 1, 1)


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animation_round_trip(tmp_path, suffix):
    clip = smooth_clip(10, 17, 33)
    path = save_video(clip, tmp_path / f"clip{suffix}", 8, METADATA)
    frames, fps, metadata = load_video(path)
    assert frames.shape == clip.shape and fps == 8.0 and metadata == METADATA
    assert mean_error_levels(frames, clip) < TOLERANCE
    with Image.open(path) as image:  # durations alternate 120/130 ms in GIF's 10 ms steps; the sum is exact
        durations = []
        for i in range(image.n_frames):
            image.seek(i)
            image.load()
            durations.append(image.info["duration"])
        assert image.n_frames == 10 and sum(durations) == 1250 and image.info.get("loop") == 0
        assert all(d in (120, 130) for d in durations) if suffix == ".gif" else set(durations) == {125}


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animation_keeps_repeated_frames(tmp_path, suffix):
    """Pillow and libwebp merge identical consecutive frames; load_video splits them again."""
    clip = smooth_clip(6, 16, 16)[:, [0, 0, 0, 3, 5, 5]]
    frames, fps, _ = load_video(save_video(clip, tmp_path / f"still{suffix}", 12.5))
    assert frames.shape == clip.shape and fps == 12.5
    assert mean_error_levels(frames, clip) < TOLERANCE
    still, _, _ = load_video(save_video(clip[:, :1].expand(3, 5, 16, 16), tmp_path / f"one{suffix}", 5))
    assert still.shape == (3, 5, 16, 16)


def test_foreign_gif_uses_its_durations(tmp_path):
    images = [Image.new("RGB", (8, 8), (c, 0, 0)) for c in (0, 100, 200, 250)]
    images[0].save(tmp_path / "other.gif", save_all=True, append_images=images[1:], duration=50, comment="hi")
    frames, fps, metadata = load_video(tmp_path / "other.gif")
    assert frames.shape == (3, 4, 8, 8) and fps == 20.0 and metadata == {"comment": "hi"}


def test_png_strip(tmp_path):
    clip = smooth_clip(40, 17, 33)
    path = save_video(clip, tmp_path / "strip.png", 8, METADATA, scale=2, max_strip_frames=16)
    shown = math.ceil(40 / 3)  # every 3rd frame: 0, 3, ..., 39
    with Image.open(path) as image:
        assert image.size == (shown * 66 + (shown + 1) * 2, 34 + 2 * 2)
        assert image.text["prompt"] == METADATA["prompt"] and image.text["seed"] == "7"
        assert json.loads(image.text["omnidit_video"]) == {"fps": 8.0, "frames": 40, "width": 66, "height": 34,
                                                           "scale": 2, "stride": 3}
        assert image.getpixel((2, 2)) == tuple(((clip[:, 0, 0, 0] + 1) * 127.5).round().int().tolist())
    with pytest.raises(OmniditError, match="frame strip"):
        load_video(path)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"path": "clip.avi"}, r"cannot save a clip as clip\.avi: unknown suffix '\.avi'.*\.mp4, \.gif, \.webp, \.png"),
    ({"path": "clip"}, "cannot save a clip as clip: no suffix"),
    ({"fps": 0}, "fps must be a number"),
    ({"fps": float("nan")}, "fps must be a number"),
    ({"fps": float("inf")}, "fps must be a number"),
    ({"fps": -8}, "fps must be a number"),
    ({"fps": 60, "path": "clip.gif"}, "at most 50 fps"),
    ({"frames": torch.zeros(3, 0, 8, 8)}, "the clip is empty"),
    ({"frames": torch.zeros(4, 2, 8, 8)}, r"float frames must be \(3, T, H, W\)"),
    ({"frames": torch.zeros(2, 8, 8, 3)}, r"float frames must be \(3, T, H, W\)"),
    ({"frames": torch.zeros(2, 8, 8, 4, dtype=torch.uint8)}, r"uint8 frames must be \(T, H, W, 3\)"),
    ({"frames": torch.zeros(3, 8, 8)}, "a clip must be a 4-d tensor"),
    ({"frames": torch.zeros(3, 2, 8, 8, dtype=torch.int64)}, "frames must be float or uint8"),
    ({"frames": torch.full((3, 2, 8, 8), float("nan"))}, "NaN"),
    ({"scale": 0}, "scale must be a positive integer"),
    ({"scale": 1.5}, "scale must be a positive integer"),
    ({"metadata": ["not", "a", "dict"]}, "metadata must be a dict"),
    ({"metadata": {"omnidit_video": 1}}, "reserved"),
    ({"metadata": {(1, 2): "tuple key"}}, "cannot be stored as JSON"),
])
def test_invalid_input_writes_nothing(tmp_path, kwargs, match):
    args = {"frames": smooth_clip(2, 8, 8), "path": "clip.mp4", "fps": 8, **kwargs}
    args["path"] = tmp_path / "out" / args["path"]
    with pytest.raises(OmniditError, match=match) as error:
        save_video(**args)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_failed_encode_leaves_nothing(tmp_path, monkeypatch):
    def broken(rgb, path, fps, document):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    (tmp_path / "clip.mp4").write_bytes(b"old")
    monkeypatch.setattr(video_io, "_write_mp4", broken)
    with pytest.raises(OmniditError, match="could not write .*clip.mp4: disk full"):
        save_video(smooth_clip(2, 8, 8), tmp_path / "clip.mp4", 8)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"] and (tmp_path / "clip.mp4").read_bytes() == b"old"


@pytest.mark.parametrize("name", ["bad.mp4", "bad.gif", "bad.webp", "bad.mkv"])
def test_corrupt_and_missing_files(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00not a video at all" * 20)
    with pytest.raises(OmniditError, match=f"cannot read video .*{name}") as error:
        load_video(tmp_path / name)
    assert "\n" not in str(error.value)
    with pytest.raises(OmniditError, match="no such video file"):
        load_video(tmp_path / f"missing-{name}")


def test_truncated_mp4(tmp_path):
    path = save_video(smooth_clip(4, 16, 16), tmp_path / "clip.mp4", 8)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(OmniditError, match="cannot read video|contains no frames"):
        load_video(path)


def test_pyav_is_optional(tmp_path):
    """Without PyAV the module imports, GIF still works, and MP4 fails with a one-line hint."""
    code = ("import sys; sys.modules['av'] = None\n"
            "import torch; from omnidit.video_io import save_video\n"
            "save_video(torch.zeros(3, 2, 8, 8), sys.argv[1] + '/ok.gif', 8)\n"
            "try: save_video(torch.zeros(3, 2, 8, 8), sys.argv[1] + '/no.mp4', 8)\n"
            "except Exception as e: print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("OmniditError writing and reading .mp4 needs PyAV")
    assert [p.name for p in tmp_path.iterdir()] == ["ok.gif"]


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".webp"])
def test_reading_is_bounded_by_frames_and_size(tmp_path, suffix):
    clip = torch.rand(3, 6, 18, 22) * 2 - 1  # odd-free but not a multiple of 16: the MP4 is padded and cropped
    path = save_video(clip, tmp_path / f"c{suffix}", fps=8.0)
    frames, _, _ = load_video(path, max_frames=6, size=(22, 18))
    assert frames.shape == (3, 6, 18, 22)
    with pytest.raises(OmniditError, match="more than 4 frames"):
        load_video(path, max_frames=4)
    with pytest.raises(OmniditError, match=r"is 22x18 but the output is 32x32 \(hint: pass --size 22x18\)"):
        load_video(path, size=(32, 32))


def test_a_scaled_clip_is_averaged_back_to_the_models_size(tmp_path):
    """What generate --scale k writes (each pixel a k x k block) reads back at the model's size, with a note; the
    GIF keeps its colours exactly enough that the blocks' means are the original pixels."""
    clip = torch.rand(3, 4, 8, 6) * 2 - 1
    path = save_video(clip, tmp_path / "big.gif", fps=8.0, scale=3)  # 18x24, as generate --scale 3 writes it
    with pytest.warns(UserWarning, match=r"is 18x24, 3 times the model's 6x8: averaged down by 3"):
        frames, _, _ = load_video(path, size=(6, 8))
    assert frames.shape == (3, 4, 8, 6)
    small, _, _ = load_video(save_video(clip, tmp_path / "small.gif", fps=8.0))
    torch.testing.assert_close(frames, small, atol=2 / 127.5, rtol=0)
    with pytest.raises(OmniditError, match="is 18x24 but the output is 7x8"):  # not a whole multiple: refused
        load_video(path, size=(7, 8))
