"""Save and load generated clips: H.264 MP4, animated GIF / WebP, and PNG frame strips, each carrying its settings.

A clip is a float tensor (3, T, H, W) in [-1, 1] or a uint8 tensor (T, H, W, 3). Every file records one JSON
document: the caller's metadata (prompt, seed, settings) plus, under ``"omnidit_video"``, what reading it back needs
(fps, frame count, true frame size). It lives in the MP4 ``comment`` tag, the GIF comment, the WebP EXIF
ImageDescription, and (as PNG text chunks, through ``images.save_png``) in strips.

PyAV is a dependency of omnidit, imported only to write or read MP4 and other PyAV formats.
"""

from __future__ import annotations

import bisect
import enum
import functools
import json
import math
import numbers
import os
import uuid
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from omnidit.errors import OmniditError

SAVE_SUFFIXES = (".mp4", ".gif", ".webp", ".png")
VIDEO_KEY = "omnidit_video"  # reserved metadata key for the bookkeeping that load_video needs
MP4_CRF = 12  # x264 constant quality: visually lossless; mean error ~1-2/255 on smooth content
WEBP_QUALITY = 90
MAX_ANIMATION_FPS = 50.0  # browsers play GIF/WebP frames shorter than 20 ms at 100 ms
FPS_RANGE = (0.01, 1000.0)
_PYAV_HINT = "pip install av (PyAV; omnidit's install brings it), or save as .gif, .webp or .png"
_BT709 = 1  # AVCOL_SPC_BT709 == AVCOL_PRI_BT709 == AVCOL_TRC_BT709 == 1
_LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG ("MPEG" in PyAV): the range players assume for yuv420p


def save_video(frames: Tensor, path: str | Path, fps: float, metadata: dict | None = None, scale: int = 1, *,
               max_strip_frames: int = 16, audio: Tensor | None = None, sample_rate: int | None = None) -> Path:
    """Write a clip to ``path`` (.mp4, .gif, .webp or .png strip) and return the path.

    frames: float (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3). ``scale`` enlarges every frame that many times
    (nearest neighbour, so pixels stay crisp): 32x32 clips are hard to see at 1. A .png is a strip of at most
    ``max_strip_frames`` frames side by side (every k-th frame when there are more). Everything is checked before
    anything is written, and the file appears only once complete (written to a temporary name, then renamed).
    ``audio`` (C, S) or (S,) float in [-1, 1] at ``sample_rate`` Hz: an .mp4 gets it as an AAC track.
    """
    path = Path(path)
    suffix = _check_suffix(path)
    if audio is not None:
        audio = _check_audio(audio, sample_rate, suffix)
    rgb = frames_to_uint8(frames)
    fps = _check_fps(fps, suffix)
    for name, value in (("scale", scale), ("max_strip_frames", max_strip_frames)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise OmniditError(f"{name} must be a positive integer, got {value!r}")
    scale, max_strip_frames = int(scale), int(max_strip_frames)
    rgb = rgb.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else rgb
    info = {"fps": fps, "frames": rgb.shape[0], "width": rgb.shape[2], "height": rgb.shape[1], "scale": scale}
    if audio is not None:  # AAC pads to whole frames of 1024 samples: load_audio cuts back to this length
        info.update(sample_rate=int(sample_rate), audio_samples=int(audio.shape[1]))
    if suffix == ".png":
        stride = math.ceil(rgb.shape[0] / max_strip_frames)
        rgb, info["stride"] = rgb[::stride], stride
    document = _document(metadata, info)
    writer = {".mp4": _write_mp4, ".gif": _write_gif, ".webp": _write_webp, ".png": _write_strip}[suffix]
    if audio is not None:  # _check_audio allowed it for .mp4 only
        writer = functools.partial(_write_mp4, audio=audio, sample_rate=int(sample_rate))
    if suffix == ".mp4":
        _import_av()  # fail before creating anything
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder so the rename is atomic; same suffix so Pillow/PyAV pick the format.
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        writer(rgb, tmp, fps, document)
        os.replace(tmp, path)
    except OSError as e:
        raise OmniditError(f"could not write {path}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_video(path: str | Path, as_uint8: bool = False, max_frames: int | None = None,
               size: tuple[int, int] | None = None) -> tuple[Tensor, float, dict]:
    """Read a clip written by ``save_video`` (or any GIF, WebP or PyAV-readable video).

    Returns (frames, fps, metadata): frames float (3, T, H, W) in [-1, 1], or uint8 (T, H, W, 3) with
    ``as_uint8``; fps as a float; metadata as passed to ``save_video`` (JSON types: tuples come back as lists).
    Files from elsewhere give their comment, if any, as ``{"comment": text}``. Bounds checked while decoding,
    so a wrong or huge file costs one frame: ``max_frames`` at most, ``size`` (width, height) exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise OmniditError(f"no such video file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".png":
        raise OmniditError(f"{path} is a PNG frame strip, which cannot be read back as a clip",
                           hint="use the .mp4, .gif or .webp version of the clip")
    try:
        reader = _read_animation if suffix in (".gif", ".webp") else _read_pyav
        rgb, fps, metadata = reader(path, _FrameCheck(path, max_frames, size))
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL and PyAV errors for corrupt files
        raise OmniditError(f"cannot read video {path}: {_one_line(e)}",
                           hint="the file is corrupt, truncated or not a video") from e
    if rgb.shape[0] == 0:
        raise OmniditError(f"{path} contains no frames")
    if as_uint8:
        return torch.from_numpy(rgb), fps, metadata
    return torch.from_numpy(rgb).permute(3, 0, 1, 2).float() / 127.5 - 1, fps, metadata


def frames_to_uint8(frames: Tensor) -> np.ndarray:
    """float (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3) -> contiguous uint8 array (T, H, W, 3)."""
    shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
    hint = "pass float frames (3, T, H, W) in [-1, 1] or uint8 frames (T, H, W, 3)"
    if not isinstance(frames, Tensor) or frames.dim() != 4:
        raise OmniditError(f"a clip must be a 4-d tensor, got {shape}", hint=hint)
    if frames.dtype == torch.uint8:
        if frames.shape[3] != 3:
            raise OmniditError(f"uint8 frames must be (T, H, W, 3), got {shape}", hint=hint)
        rgb = frames.detach().cpu()
    elif frames.is_floating_point():
        if frames.shape[0] != 3:
            raise OmniditError(f"float frames must be (3, T, H, W), got {shape}", hint=hint)
        if not bool(torch.isfinite(frames).all()):
            raise OmniditError("frames contain NaN or inf", hint="the sampler diverged; check the checkpoint and cfg")
        # Rounded in numpy (half to even, as torch.round): torch's round takes ~15 ms per 32x32 frame on some
        # CPU builds.
        pixels = np.rint((np.clip(frames.detach().cpu().float().numpy(), -1, 1) + 1) * 127.5).astype(np.uint8)
        rgb = torch.from_numpy(pixels.transpose(1, 2, 3, 0))
    else:
        raise OmniditError(f"frames must be float or uint8, got {frames.dtype}", hint=hint)
    if min(rgb.shape[:3]) == 0:
        raise OmniditError(f"the clip is empty: {shape}", hint="a clip needs at least one frame of at least 1x1")
    return np.ascontiguousarray(rgb.numpy())


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        found = f"unknown suffix '{path.suffix}'" if path.suffix else "no suffix"
        raise OmniditError(f"cannot save a clip as {path.name}: {found}", hint=f"use one of {', '.join(SAVE_SUFFIXES)}")
    return suffix


def check_clip_output(path: str | Path, fps: float) -> float:
    """The checks ``save_video`` makes of its path and frame rate, for callers to make before any work."""
    return _check_fps(fps, _check_suffix(Path(path)))


def _check_fps(fps: float, suffix: str) -> float:
    low, high = FPS_RANGE
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not low <= fps <= high:
        raise OmniditError(f"fps must be a number in [{low:g}, {high:g}], got {fps!r}")
    fps = float(fps)
    if suffix in (".gif", ".webp") and fps > MAX_ANIMATION_FPS:
        raise OmniditError(f"{suffix} animations play at most {MAX_ANIMATION_FPS:g} fps, got {fps:g}",
                           hint="save as .mp4, or lower the fps")
    return fps


def _document(metadata: dict | None, info: dict) -> str:
    """The JSON stored in the file: the caller's metadata plus the bookkeeping under VIDEO_KEY. ASCII only
    (non-ASCII is escaped) because GIF comments and EXIF strings are ASCII."""
    if metadata is not None and not isinstance(metadata, dict):
        raise OmniditError(f"metadata must be a dict, got {type(metadata).__name__}")
    metadata = metadata or {}
    if VIDEO_KEY in metadata:
        raise OmniditError(f"metadata key '{VIDEO_KEY}' is reserved for the clip's own fps and size")
    try:
        return json.dumps({**metadata, VIDEO_KEY: info}, default=str)
    except (TypeError, ValueError) as e:
        raise OmniditError(f"metadata cannot be stored as JSON: {e}", hint="use str keys and plain values") from e


def _parse_document(text: str | None) -> tuple[dict, dict]:
    """Stored text -> (metadata, bookkeeping); text that is not our JSON is returned as {"comment": text}."""
    if not text:
        return {}, {}
    try:
        document = json.loads(text)
    except ValueError:
        return {"comment": text}, {}
    if not isinstance(document, dict):
        return {"comment": text}, {}
    info = document.pop(VIDEO_KEY, None)
    return document, info if isinstance(info, dict) else {}


def _frame_starts_ms(count: int, fps: float, quantum: int) -> list[int]:
    """Start of each frame and end of the last, in ms rounded to ``quantum`` (GIF: 10 ms, WebP: 1 ms). Rounding the
    running time, not each duration, keeps the average rate exact: 8 fps GIF frames last 120, 130, 120, ... ms."""
    return [quantum * round(i * 1000 / (fps * quantum)) for i in range(count + 1)]


def _import_av():
    try:
        import av
    except ImportError:
        raise OmniditError("writing and reading .mp4 needs PyAV, which is not installed", hint=_PYAV_HINT) from None
    return av


def _sws_flags(chroma: str):
    """Accurate bicubic RGB <-> yuv420p conversion; ``chroma`` (FULL_CHR_H_INP when encoding, FULL_CHR_H_INT when
    decoding) treats horizontal chroma per pixel instead of per pair, which halves the colour error. PyAV < 18
    takes one interpolation name only, so it gets plain bicubic."""
    from av.video.reformatter import Interpolation

    if not issubclass(Interpolation, enum.IntFlag):
        return "BICUBIC"
    return Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation[chroma]


def _check_audio(audio, sample_rate: int | None, suffix: str) -> np.ndarray:
    """Audio for a video file -> (C, S) float32 in [-1, 1], or an OmniditError."""
    if suffix != ".mp4":
        raise OmniditError(f"only .mp4 clips carry sound, not {suffix}", hint="save as .mp4, or the sound as .wav")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral) \
            or not 8000 <= sample_rate <= 96_000:
        raise OmniditError(f"the sample rate of a clip's sound must be a whole number of Hz in [8000, 96000], got "
                           f"{sample_rate}", hint="e.g. 8000, 16000 or 48000")
    x = audio.detach().cpu().float().numpy() if isinstance(audio, Tensor) else np.asarray(audio, np.float32)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] not in (1, 2) or x.shape[1] == 0 or not np.isfinite(x).all():
        raise OmniditError(f"a clip's sound must be finite mono or stereo (C, S), got shape {tuple(x.shape)}")
    return np.ascontiguousarray(np.clip(x, -1, 1), dtype=np.float32)


def _write_mp4(rgb: np.ndarray, path: Path, fps: float, document: str, audio: np.ndarray | None = None,
               sample_rate: int = 0) -> None:
    """H.264 yuv420p, BT.709 limited range (what players assume), fast start for streaming; with ``audio``
    (C, S) float32, an AAC track after the frames."""
    av = _import_av()

    # yuv420p stores chroma per 2x2 block, so x264 needs even sizes: pad by repeating the last row / column;
    # load_video crops back to the true size recorded in the document.
    height, width = rgb.shape[1:3]
    rgb = np.pad(rgb, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    flags = _sws_flags("FULL_CHR_H_INP")
    try:
        with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            container.metadata["comment"] = document
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                          options={"crf": str(MP4_CRF), "preset": "medium"})
            stream.width, stream.height, stream.pix_fmt = rgb.shape[2], rgb.shape[1], "yuv420p"
            codec = stream.codec_context
            codec.colorspace = codec.color_primaries = codec.color_trc = _BT709
            codec.color_range = _LIMITED_RANGE
            sound = None if audio is None else container.add_stream(  # every stream before the first packet
                "aac", rate=sample_rate, layout="mono" if audio.shape[0] == 1 else "stereo")
            for i, image in enumerate(rgb):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                    format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG", interpolation=flags)
                frame.pts = i  # the codec time base is 1 / rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
            if sound is not None:
                _mux_audio(av, container, sound, audio, sample_rate)
    except av.FFmpegError as e:
        raise OSError(_one_line(e)) from e


def _mux_audio(av, container, stream, audio: np.ndarray, sample_rate: int) -> None:
    """Encode ``audio`` (C, S) into the AAC ``stream`` in chunks of 1024 samples (AAC's frame size)."""
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    for start in range(0, audio.shape[1], 1024):
        chunk = np.ascontiguousarray(audio[:, start:start + 1024])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sample_rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def load_audio(path: str | Path) -> tuple[Tensor, int]:
    """The sound track of a video file: (audio (C, S) float32 in [-1, 1], sample rate), or an OmniditError
    when it has none."""
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise OmniditError(f"{path} has no sound track", hint="give a clip with sound, or a .wav")
            stream = container.streams.audio[0]
            chunks = [frame.to_ndarray() for frame in container.decode(stream)]
            rate = stream.rate
            _, info = _parse_document(container.metadata.get("comment"))
    except av.FFmpegError as e:
        raise OmniditError(f"cannot read the sound of {path}: {_one_line(e)}") from None
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    if isinstance(info.get("audio_samples"), int):
        audio = audio[:, :info["audio_samples"]]
    return torch.from_numpy(np.clip(audio, -1, 1).astype(np.float32)), int(rate)


def _write_gif(rgb: np.ndarray, path: Path, fps: float, document: str) -> None:
    """Looping GIF; durations in 10 ms steps. Pillow merges identical consecutive frames (durations add up);
    load_video splits them again from the recorded fps and frame count."""
    images = [Image.fromarray(image) for image in rgb]
    durations = np.diff(_frame_starts_ms(len(images), fps, 10)).tolist()
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0,
                   comment=document)


def _write_webp(rgb: np.ndarray, path: Path, fps: float, document: str) -> None:
    """Looping lossy WebP (quality 90); the document goes in the EXIF ImageDescription."""
    images = [Image.fromarray(image) for image in rgb]
    durations = np.diff(_frame_starts_ms(len(images), fps, 1)).tolist()
    exif = Image.Exif()
    exif[0x010E] = document  # ImageDescription
    images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], duration=durations, loop=0,
                   quality=WEBP_QUALITY, method=4, exif=exif)


def _write_strip(rgb: np.ndarray, path: Path, fps: float, document: str) -> None:
    """Frames side by side with 2-px white gaps, metadata as PNG text like generated images."""
    from omnidit.images import make_grid, save_png

    metadata, info = _parse_document(document)
    strip = make_grid([Image.fromarray(image) for image in rgb], columns=len(rgb), padding=2)
    save_png(strip, path, {**metadata, VIDEO_KEY: json.dumps(info)})


def undo_scale(pixels: np.ndarray, size: tuple[int, int], name: str, note: bool = True) -> np.ndarray:
    """``pixels`` (H, W, 3) uint8 of ``size`` (width, height), or k times it in both sides (what ``--scale k``
    writes), averaged back down by k (with a note naming ``name`` unless ``note`` is false); any other size is
    returned as it is, for the caller to refuse."""
    h, w = pixels.shape[:2]
    k = w // size[0] if size[0] else 0
    if k < 2 or (w, h) != (k * size[0], k * size[1]):
        return pixels
    if note:
        warnings.warn(f"{name} is {w}x{h}, {k} times the model's {size[0]}x{size[1]}: averaged down by {k} "
                      f"(the inverse of --scale {k})", stacklevel=2)
    blocks = pixels.reshape(size[1], k, size[0], k, 3).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


class _FrameCheck:
    """Called with each decoded frame (H, W, 3), after cropping: refuses the file at the first frame past
    ``max_frames`` or of the wrong ``size`` (width, height)."""

    def __init__(self, path: Path, max_frames: int | None, size: tuple[int, int] | None) -> None:
        self.path, self.max_frames, self.size, self.count = path, max_frames, size, 0

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        self.count += 1
        if self.max_frames is not None and self.count > self.max_frames:
            raise OmniditError(f"{self.path} has more than {self.max_frames} frames",
                               hint=f"use a clip of at most {self.max_frames} frames")
        if self.size is not None and (frame.shape[1], frame.shape[0]) != tuple(self.size):  # one note per clip
            frame = undo_scale(frame, self.size, f"the clip {self.path}", note=self.count == 1)
        if self.size is not None and (frame.shape[1], frame.shape[0]) != tuple(self.size):
            w, h = self.size
            raise OmniditError(f"the clip {self.path} is {frame.shape[1]}x{frame.shape[0]} but the output is {w}x{h}",
                               hint=f"pass --size {frame.shape[1]}x{frame.shape[0]}")
        return frame


def _read_animation(path: Path, check: _FrameCheck) -> tuple[np.ndarray, float, dict]:
    """GIF / WebP through Pillow: composited RGB frames, per-frame durations and the stored document."""
    with Image.open(path) as image:
        if image.format not in ("GIF", "WEBP"):
            raise ValueError(f"not a GIF or WebP file (Pillow reads it as {image.format})")
        if image.format == "GIF":
            text = image.info.get("comment", b"").decode("utf-8", "replace")
        else:
            text = image.getexif().get(0x010E)
        frames, durations = [], []
        for i in range(getattr(image, "n_frames", 1)):
            image.seek(i)
            image.load()  # WebP sets the frame's duration only once it is decoded
            frames.append(check(np.asarray(image.convert("RGB"))))
            durations.append(int(image.info.get("duration") or 0))
    metadata, info = _parse_document(text)
    starts = np.cumsum([0, *durations]).tolist()
    if isinstance(info.get("frames"), int) and isinstance(info.get("fps"), (int, float)) and info["fps"] > 0:
        # Undo the merging of identical frames: show, at each original frame's start, the stored frame then on.
        quantum = 10 if path.suffix.lower() == ".gif" else 1
        targets = _frame_starts_ms(info["frames"], info["fps"], quantum)[:-1]
        frames = [frames[bisect.bisect_right(starts[:len(frames)], t) - 1] for t in targets]
        return np.stack(frames), float(info["fps"]), metadata
    fps = len(frames) * 1000 / starts[-1] if starts[-1] > 0 else 10.0  # 10 fps: what browsers do with no delays
    return np.stack(frames), fps, metadata


def _read_pyav(path: Path, check: _FrameCheck) -> tuple[np.ndarray, float, dict]:
    """MP4 (and other PyAV formats): decode the first video stream to RGB, cropping the yuv420p padding."""
    av = _import_av()
    flags = _sws_flags("FULL_CHR_H_INT")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            tags = dict(container.metadata)
            info = _parse_document(tags.get("comment"))[1]
            crop = (info.get("height"), info.get("width")) if all(
                isinstance(info.get(k), int) for k in ("width", "height")) else (None, None)
            # to_ndarray converts with the colour matrix the stream is tagged with (BT.709 for ours); our files
            # are cropped back from the yuv420p padding to the size they store.
            frames = [check(np.ascontiguousarray(frame.to_ndarray(format="rgb24", interpolation=flags)
                                                 [:crop[0], :crop[1]])) for frame in container.decode(stream)]
            rate = stream.average_rate or stream.guessed_rate
    except av.FFmpegError as e:
        raise ValueError(_one_line(e)) from e
    if not frames:
        return np.zeros((0, 1, 1, 3), np.uint8), 0.0, {}
    metadata, info = _parse_document(tags.get("comment"))
    rgb = np.stack(frames)
    fps = info.get("fps") if isinstance(info.get("fps"), (int, float)) else float(rate or 0) or 10.0
    return rgb, float(fps), metadata


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
