"""Cutting data into tokens and back, and the position ids the model's RoPE reads.

The model never sees pixels: images become (B, N, C * p * p) patch tokens here and videos (B, N,
C * pt * p * p) tubelet tokens, with ids whose first axis is time in seconds, shared by every modality
(a tubelet sits at the mean time of its frames, frame k at k / fps; a still image is one frame at
time 0), and whose last two axes are (row, column) of the patch grid. Any resolution or aspect ratio
that the patch size divides works, and any frame count that the temporal patch divides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from omnidit.errors import OmniditError
from omnidit.validate import check_number


def check_image_size(height: int, width: int, patch_size: int) -> None:
    """Raise a clear error unless both sides are positive multiples of the patch size."""
    if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
        w, h = (max(patch_size, side // patch_size * patch_size) for side in (width, height))
        raise OmniditError(
            f"image size {width}x{height} is not a positive multiple of the patch size {patch_size}",
            hint=f"use a width and height divisible by {patch_size}, e.g. {w}x{h}",
        )


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p), row-major over the grid, features ordered (c, py, px).

    The (c, py, px) order matches a Conv2d patch embedding's flattened kernel, so conv weights
    load into the token projection by a reshape.
    """
    b, c, h, w = x.shape
    check_image_size(h, w, patch_size)
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """Inverse of ``patchify``: (B, N, C * p * p) -> (B, C, H, W)."""
    b, n, d = tokens.shape
    p = patch_size
    gh, gw = height // p, width // p
    if gh * gw != n or d % (p * p):
        raise ValueError(f"{n} tokens of size {d} do not form a {width}x{height} image with patch {p}")
    c = d // (p * p)
    x = tokens.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
    return x.reshape(b, c, height, width)


def image_position_ids(grid_h: int, grid_w: int, num_axes: int = 3, device: torch.device | str = "cpu") -> Tensor:
    """Position ids of a (grid_h, grid_w) patch grid: (1, grid_h * grid_w, num_axes).

    Column -2 is the row, column -1 the column; any leading axes (time for video) are 0.
    """
    if num_axes < 2:
        raise ValueError("image positions need at least 2 axes")
    ids = torch.zeros(grid_h, grid_w, num_axes, device=device)
    ids[..., -2] = torch.arange(grid_h, device=device)[:, None]
    ids[..., -1] = torch.arange(grid_w, device=device)[None, :]
    return ids.reshape(1, grid_h * grid_w, num_axes)


def check_frame_count(frames: int, temporal_patch: int) -> None:
    """Raise a clear error unless ``frames`` is a positive multiple of the temporal patch (no 8k+1 rule)."""
    if frames <= 0 or frames % temporal_patch:
        below = max(temporal_patch, frames // temporal_patch * temporal_patch)
        above = (max(frames, 1) + temporal_patch - 1) // temporal_patch * temporal_patch
        nearest = sorted({below, above}, key=lambda n: (abs(n - frames), n))[0]
        raise OmniditError(
            f"a clip of {frames} frames does not split into tubelets of {temporal_patch} frames",
            hint=f"use a positive multiple of {temporal_patch} frames; the nearest is {nearest}",
        )


def video_patchify(x: Tensor, patch_size: int, temporal_patch: int = 1) -> Tensor:
    """(B, C, T, H, W) -> (B, T/pt * H/p * W/p, C * pt * p * p): tubelets in (time, row, column) order,
    features ordered (c, kt, ky, kx) like a Conv3d kernel. With pt = 1 and T = 1 this is ``patchify``."""
    b, c, frames, h, w = x.shape
    check_frame_count(frames, temporal_patch)
    check_image_size(h, w, patch_size)
    p, pt = patch_size, temporal_patch
    x = x.reshape(b, c, frames // pt, pt, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (frames // pt) * (h // p) * (w // p), c * pt * p * p)


def video_unpatchify(tokens: Tensor, frames: int, height: int, width: int, patch_size: int,
                     temporal_patch: int = 1) -> Tensor:
    """Inverse of ``video_patchify``: (B, N, C * pt * p * p) -> (B, C, T, H, W)."""
    b, n, d = tokens.shape
    p, pt = patch_size, temporal_patch
    gt, gh, gw = frames // pt, height // p, width // p
    if gt * gh * gw != n or d % (pt * p * p) or frames % pt:
        raise ValueError(f"{n} tokens of size {d} do not form a {frames}x{width}x{height} clip with "
                         f"tubelets ({pt}, {p}, {p})")
    c = d // (pt * p * p)
    x = tokens.reshape(b, gt, gh, gw, c, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, gt, pt, gh, p, gw, p)
    return x.reshape(b, c, frames, height, width)


def tubelet_times(frames: int, fps: float, temporal_patch: int = 1) -> Tensor:
    """Time in seconds of each tubelet: the time of its first frame, frame k at k / fps, as an audio token's is
    the time its frame starts (``audio_position_ids``), so tokens that start at the same instant share their time
    coordinate whatever the tubelet and audio frame sizes. (T / pt,) float64."""
    check_number("fps", fps, low=0.0, low_open=True)
    check_frame_count(frames, temporal_patch)
    return torch.arange(0, frames, temporal_patch, dtype=torch.float64) / fps


def video_position_ids(frames: int, grid_h: int, grid_w: int, fps: float, temporal_patch: int = 1,
                       num_axes: int = 3, device: torch.device | str = "cpu") -> Tensor:
    """Position ids of a clip's tubelets: (1, T/pt * grid_h * grid_w, num_axes) float32.

    Column 0 is time in seconds (``tubelet_times``), column -2 the row, column -1 the column; axes in
    between (if any) are 0. One frame gives exactly ``image_position_ids``.
    """
    if num_axes < 3:
        raise ValueError("video positions need at least 3 axes (time, row, column)")
    times = tubelet_times(frames, fps, temporal_patch).float().to(device)
    image = image_position_ids(grid_h, grid_w, num_axes, device=device)  # (1, gh * gw, A)
    ids = image.repeat(1, len(times), 1)
    ids[0, :, 0] = times.repeat_interleave(grid_h * grid_w)
    return ids


def check_audio_length(samples: int, frame: int) -> None:
    """Raise a clear error unless ``samples`` is a positive multiple of the audio frame size."""
    if samples <= 0 or samples % frame:
        below = max(frame, samples // frame * frame)
        raise OmniditError(f"{samples} audio samples do not split into frames of {frame} samples",
                           hint=f"use a length that {frame} divides, e.g. {below} or {below + frame} samples")


def audio_patchify(x: Tensor, frame: int) -> Tensor:
    """(B, C, S) waveform -> (B, S / frame, C * frame) tokens: consecutive frames of samples, features ordered
    (c, k) like a Conv1d kernel of stride ``frame``. Exactly invertible (``audio_unpatchify``)."""
    b, c, s = x.shape
    check_audio_length(s, frame)
    return x.reshape(b, c, s // frame, frame).permute(0, 2, 1, 3).reshape(b, s // frame, c * frame)


def audio_unpatchify(tokens: Tensor, samples: int, frame: int) -> Tensor:
    """Inverse of ``audio_patchify``: (B, S / frame, C * frame) -> (B, C, S)."""
    b, n, d = tokens.shape
    if n * frame != samples or d % frame:
        raise ValueError(f"{n} tokens of size {d} do not form {samples} samples in frames of {frame}")
    return tokens.reshape(b, n, d // frame, frame).permute(0, 2, 1, 3).reshape(b, d // frame, samples)


def audio_position_ids(samples: int, frame: int, sample_rate: float, num_axes: int = 3,
                       device: torch.device | str = "cpu") -> Tensor:
    """Position ids of audio frames: (1, samples / frame, num_axes) float32. Column 0 is the time in seconds at
    which each frame starts (frame j at j * frame / rate), the convention of video frames (frame k at k / fps),
    so an audio frame and a video frame that start at the same instant share their time coordinate; the
    other axes are 0 (audio has no rows or columns)."""
    check_number("the sample rate", sample_rate, low=0.0, low_open=True)
    check_audio_length(samples, frame)
    ids = torch.zeros(1, samples // frame, num_axes, dtype=torch.float64)
    ids[0, :, 0] = torch.arange(samples // frame, dtype=torch.float64) * frame / sample_rate
    return ids.float().to(device)


def audio_frame_size(model_config, codec) -> int:
    """Samples per token of a model's ``audio`` stream with a sound codec (``codecs.load_audio_codec``): its token
    features are runs of latent frames of ``codec.channels`` features, ``codec.hop`` samples each."""
    return audio_latent_frames(model_config, codec) * codec.hop


def audio_latent_frames(model_config, codec) -> int:
    """Latent frames per sound token: the stream's token features over the codec's channels, or an error."""
    features = model_config.extra_streams.get("audio")
    if not features:
        raise OmniditError("this model has no audio stream",
                           hint='add model.extra_streams={"audio": N} (N token features) to train on sound')
    if features % codec.channels:
        raise OmniditError(f"the model's audio tokens have {features} features, which is not a whole number of the "
                           f"{codec.name} codec's {codec.channels}-channel latent frames",
                           hint=f"use a multiple of {codec.channels} features, e.g. model.extra_streams="
                                f'{{"audio": {codec.channels * max(1, features // codec.channels)}}}')
    return features // codec.channels


def exact(value: float) -> Fraction:
    """A rate (fps, Hz) as an exact fraction, so that lengths in samples and frames are compared exactly
    (29.97 fps stays 2997/100; float products like 7 / 25 * 22050 do not round)."""
    return Fraction(value).limit_denominator(1_000_000)


def clip_samples(frames: int, fps: float, sample_rate: float) -> Fraction:
    """The samples of sound that ``frames`` frames at ``fps`` last, exactly (a Fraction; whole when they fit)."""
    return Fraction(int(frames)) / exact(fps) * exact(sample_rate)


def audio_tubelets(samples: int, frame: int, sample_rate: float, fps: float, temporal_patch: int,
                   tubelets: int) -> Tensor:
    """(samples / frame,) int64: the video tubelet in which each audio frame starts (the last one for frames past
    the clip), so that sound can be given or generated over the same stretches of time as the picture. Exact:
    frame j starts at j * frame / rate seconds, in tubelet floor(j * frame * fps / (rate * pt))."""
    check_audio_length(samples, frame)
    per_sample = exact(fps) / (exact(sample_rate) * temporal_patch)  # tubelets per sample
    index = [int(j * frame * per_sample) for j in range(samples // frame)]  # int() floors these non-negatives
    return torch.tensor(index, dtype=torch.long).clamp(0, tubelets - 1)


def given_tubelets(given_frames: Sequence[int], frames: int, temporal_patch: int) -> list[int]:
    """The tubelets that ``given_frames`` fill, sorted, or an error: a frame outside the clip, or frames that do
    not fill whole tubelets."""
    indices = sorted({int(i) for i in given_frames})
    if not indices:
        raise OmniditError("no frames are given", hint="name the frames to keep, e.g. [0, 1, 2, 3]")
    if indices[0] < 0 or indices[-1] >= frames:
        raise OmniditError(f"given frame {indices[-1] if indices[0] >= 0 else indices[0]} lies outside the "
                           f"{frames} frames being generated", hint=f"use frame indices 0..{frames - 1}")
    tubelets = sorted({i // temporal_patch for i in indices})
    if len(tubelets) * temporal_patch != len(indices):
        raise OmniditError(f"the given frames {indices} do not fill whole tubelets of {temporal_patch} frames",
                           hint=f"give frames in complete groups of {temporal_patch}, starting at multiples of "
                                f"{temporal_patch}")
    return tubelets


@dataclass
class StreamLayout:
    """What a sample of several generated streams looks like as tokens: position ids (1, N_s, A) and token
    features per stream, in the model's stream order."""

    ids: dict[str, Tensor]
    features: dict[str, int]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.ids)

    @property
    def tokens(self) -> dict[str, int]:
        return {n: ids.shape[1] for n, ids in self.ids.items()}


def stream_layout(model_config, streams: Sequence[str], frames: int, grid_h: int, grid_w: int, fps: float,
                  samples: int = 0, sample_rate: float = 0.0, device: torch.device | str = "cpu",
                  audio_codec=None) -> StreamLayout:
    """The layout of ``streams`` ("img" for images and clips, "audio" for ``samples`` of sound through
    ``audio_codec``) of a model."""
    mc, ids, features = model_config, {}, {}
    for name in (n for n in mc.generated_streams if n in streams):
        if name == "img":
            ids[name] = video_position_ids(frames, grid_h, grid_w, fps, mc.temporal_patch, len(mc.axes_dim), device)
            features[name] = mc.token_dim
        else:
            ids[name] = audio_position_ids(samples, audio_frame_size(mc, audio_codec), sample_rate, len(mc.axes_dim),
                                           device)
            features[name] = mc.extra_streams[name]
    return StreamLayout(ids, features)


def stream_tokens(data: dict[str, Tensor], model_config, audio_codec=None) -> dict[str, Tensor]:
    """Data by stream ({"img": (B, C, H, W) or (B, C, T, H, W), "audio": latents (B, c, L) of ``audio_codec``})
    -> tokens (B, N_s, D_s)."""
    mc, out = model_config, {}
    for name, x in data.items():
        if name == "img":
            out[name] = video_patchify(x if x.dim() == 5 else x[:, :, None], mc.patch_size, mc.temporal_patch)
        else:
            out[name] = audio_patchify(x, audio_latent_frames(mc, audio_codec))
    return out
