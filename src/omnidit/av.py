"""Sampling several streams at once (a clip and its sound) with one model, any of them given.

The samplers integrate one tensor, so the streams are packed into one: every sample's tokens of every stream,
flattened and concatenated, as (B, F, 1) with F = sum N_s * D_s. A given token's features are all given, so
the per-token masks become per-feature masks of the same (B or 1, F) shape and ``sampling.sample`` keeps them
bit-identical as it does for given frames. Guidance takes one scale per stream: the scale becomes a (F, 1)
tensor, so the CFG formula applies each stream's own.

Directions are which streams are given: none (text -> clip with sound), the video (video -> audio), the sound
(audio -> video), or the first frames of both (extend a clip with its sound). Sound alone (``audio_only``) runs
the audio stream by itself, as the model learned it from sound-only data (tones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from omnidit.codecs import load_audio_codec
from omnidit.condition import Condition
from omnidit.errors import OmniditError
from omnidit.flops import sampling_bytes_per_sample
from omnidit.sampling import SAMPLERS, StepCallback, classifier_free_guidance, sample, token_times
from omnidit.tokens import (
    StreamLayout,
    audio_frame_size,
    audio_tubelets,
    audio_unpatchify,
    check_audio_length,
    check_frame_count,
    check_image_size,
    clip_samples,
    exact,
    given_tubelets,
    stream_layout,
    stream_tokens,
    video_unpatchify,
)
from omnidit.validate import check_memory, check_number

MAX_SECONDS = 60.0  # one sampling window holds the whole clip: bounded memory


@dataclass
class AudioVideo:
    """What ``generate_av`` returns: video (B, C, T, H, W) in [-1, 1] or None (sound alone), audio (B, 1, S) in
    [-1, 1], and their rates."""

    video: Tensor | None
    audio: Tensor
    fps: float
    sample_rate: int


def pack(streams: dict[str, Tensor]) -> Tensor:
    """{name: (B, N_s, D_s)} -> (B, F, 1), the streams' tokens flattened and concatenated in order."""
    return torch.cat([x.flatten(1) for x in streams.values()], dim=1)[..., None]


def unpack(x: Tensor, layout: StreamLayout) -> dict[str, Tensor]:
    """Inverse of ``pack``: (B, F, 1) -> {name: (B, N_s, D_s)}."""
    sizes = [layout.tokens[n] * layout.features[n] for n in layout.names]
    parts = x[..., 0].split(sizes, dim=1)
    return {n: p.reshape(x.shape[0], layout.tokens[n], layout.features[n]) for n, p in zip(layout.names, parts)}


def _check_given(name: str, x: Tensor | None, shape: tuple[int, ...], batch: int, what: str) -> Tensor | None:
    if x is None:
        return None
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape or x.shape[0] not in (1, batch):
        raise OmniditError(f"the given {name} must be (B or 1, {', '.join(map(str, shape))}), got {tuple(x.shape)}",
                           hint=f"give {what}")
    if not torch.isfinite(x).all():
        raise OmniditError(f"the given {name} holds NaN or infinite values")
    return x.float()


def generate_av(pipeline, prompts: list[str], frames: int | None = None, fps: float | None = None,
                width: int | None = None, height: int | None = None, seconds: float | None = None,
                seed: int | Sequence[int] = 0, video: Tensor | None = None, audio: Tensor | None = None,
                given_frames: Sequence[int] | None = None, audio_only: bool = False, cfg_video: float | None = None,
                cfg_audio: float | None = None, progress: bool = False, negative_prompt: str = "",
                on_step: StepCallback | None = None, **sampling) -> AudioVideo:
    """One clip with sound per prompt from a model with an ``audio`` stream; see ``Pipeline.generate_av``."""
    from omnidit.pipeline import SAMPLING_KEYS

    model, config = pipeline.model, pipeline.config
    mc, dc = model.config, config.data
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(f"generate_av() got unexpected keyword arguments {unknown}")
    settings = pipeline.sampling_settings(**{k: sampling.get(k) for k in SAMPLING_KEYS})
    if settings["candidates"] > 1:
        raise OmniditError("best-of-N candidates are not scored for clips with sound", hint="use --candidates 1")
    if settings["sampler"] not in SAMPLERS:
        raise OmniditError(f"unknown sampler '{settings['sampler']}'", hint=f"choose one of {', '.join(SAMPLERS)}")
    codec = load_audio_codec(dc)
    frame = audio_frame_size(mc, codec)  # samples per sound token
    rate = dc.sample_rate
    batch = len(prompts)
    if audio_only:
        if video is not None or given_frames:
            raise OmniditError("sound alone cannot be given a video or frames", hint="drop audio_only")
        seconds = dc.seconds if seconds is None else check_number("seconds", seconds, low=0, low_open=True,
                                                                  high=MAX_SECONDS)
        exact_samples = exact(seconds) * rate
        if exact_samples.denominator != 1:
            raise OmniditError(f"{seconds:g} s is not a whole number of samples at {rate} Hz")
        samples = int(exact_samples)
        check_audio_length(samples, frame)
        layout = stream_layout(mc, ("audio",), 1, 1, 1, 1.0, samples, rate, pipeline.device, codec)
        frames, fps, height, width = 0, float(dc.fps), 0, 0
    else:
        frames = dc.frames if frames is None else check_number("the frame count", frames, low=1, integer=True)
        fps = float(dc.fps if fps is None else check_number("fps", fps, low=0, low_open=True))
        width, height = width or dc.width, height or dc.height
        check_frame_count(frames, mc.temporal_patch)
        check_image_size(height, width, mc.patch_size)
        if frames / fps > MAX_SECONDS:
            raise OmniditError(f"{frames} frames at {fps:g} fps last {frames / fps:g} s, longer than the "
                               f"{MAX_SECONDS:g} s one sampling window holds", hint="make a shorter clip")
        exact_samples = clip_samples(frames, fps, rate)
        if exact_samples.denominator != 1 or exact_samples % frame:
            raise OmniditError(f"{frames} frames at {fps:g} fps last {frames / fps:g} s, which is not a whole number "
                               f"of audio tokens of {frame} samples at {rate} Hz",
                               hint=f"use a length that is a multiple of {frame / rate:g} s")
        samples = int(exact_samples)
        layout = stream_layout(mc, ("img", "audio"), frames, height // mc.patch_size, width // mc.patch_size, fps,
                               samples, rate, pipeline.device, codec)
    video = _check_given("video", video, (mc.in_channels, frames, height, width), batch,
                         f"{frames} frames of {width}x{height}")
    audio = _check_given("audio", audio, (1, samples), batch, f"{samples} samples ({samples / rate:g} s at {rate} Hz)")
    masks, clean = _given_tokens(layout, mc, video, audio, given_frames, frames, fps, rate, codec, pipeline.device)
    names = layout.names
    scales = {"img": settings["cfg"] if cfg_video is None else check_number("cfg_video", cfg_video, low=0, high=100),
              "audio": settings["cfg"] if cfg_audio is None else check_number("cfg_audio", cfg_audio, low=0, high=100)}
    tokens = sum(layout.tokens.values())
    rows = 2 if any(scales[n] != 1.0 for n in names) or settings["skip_scale"] else 1
    check_memory(batch * rows * sampling_bytes_per_sample(mc, tokens, config.text.max_length), pipeline.device,
                 f"sampling {batch} clip(s) with sound", hint="draw fewer at once or make them shorter")

    if pipeline.uncond_model is not None and rows == 2:
        raise OmniditError("sample.uncond_base is not supported for clips with sound yet",
                           hint="set sample.uncond_base to false in the run's config.json")
    cond, null = pipeline.conditions(prompts, negative_prompt)
    given = pack({n: masks[n][..., None].expand(-1, -1, layout.features[n]) for n in names})[..., 0]  # (1, F)
    given = given if bool(given.any()) else None
    stream_masks = {n: (masks[n] if bool(masks[n].any()) else None) for n in names}

    def model_fn(x: Tensor, t: Tensor, c: Condition, skip: Sequence[int] = ()) -> Tensor:
        if all(m is None for m in stream_masks.values()):  # one time for all: one conditioning vector
            times = t
        else:
            times = {n: token_times(t, stream_masks[n]) for n in names}
        out = model(unpack(x, layout), layout.ids, times, c, skip_single=skip)
        return pack(out)

    def skip_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:
        return model_fn(x, t, c, settings["skip_blocks"])

    if rows == 1:
        cond = cond.without_full_mask()
        velocity = lambda x, t: model_fn(x, t, cond)  # noqa: E731
    else:
        if len({scales[n] for n in names}) > 1:  # each stream's own scale, over its features
            scale = pack({n: torch.full((1, layout.tokens[n], layout.features[n]), float(scales[n]),
                                        device=pipeline.device) for n in names})[0]  # (F, 1)
        else:
            scale = scales[names[0]]
        velocity = classifier_free_guidance(model_fn, cond, null, scale, settings["cfg_interval"], skip_fn,
                                            settings["skip_scale"], settings["skip_interval"])
    seeds = [int(seed) + i for i in range(batch)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} prompts")
    noise = pack(_noise(layout, mc, seeds, frames, height, width)).to(pipeline.device)
    clean_packed = pack({n: clean[n].expand(batch, -1, -1) for n in names}) if given is not None else None
    with pipeline.step_cache(settings), pipeline.precision():
        x = sample(velocity, noise, settings["steps"], settings["sampler"], settings["shift"], progress=progress,
                   given=given, given_tokens=clean_packed, on_step=on_step)
    out = unpack(x, layout)
    clip = None
    if "img" in out:
        clip = video_unpatchify(out["img"], frames, height, width, mc.patch_size, mc.temporal_patch)
        clip = clip.clamp(-1, 1).float().cpu()
    latent_frames = samples // codec.hop
    latents = audio_unpatchify(out["audio"], latent_frames, latent_frames // layout.tokens["audio"])
    sound = codec.decode(latents).clamp(-1, 1).float().cpu()
    if audio is not None:  # the given sound exactly as given (a codec need not invert exactly)
        kept = masks["audio"].repeat_interleave(frame, dim=1)[:, None].cpu()  # (1, 1, S)
        sound = torch.where(kept, audio.cpu(), sound)
    return AudioVideo(clip, sound, fps, rate)


def _noise(layout: StreamLayout, mc, seeds: list[int], frames: int, height: int, width: int) -> dict[str, Tensor]:
    """Each sample's starting noise from its own seed, from one generator: the clip's first (so that with a
    list of seeds the picture starts as ``Pipeline.generate_video``'s does), then the sound tokens'."""
    per_stream: dict[str, list[Tensor]] = {n: [] for n in layout.names}
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        if "img" in layout.names:
            clip = torch.randn((1, mc.in_channels, frames, height, width), generator=g)
            per_stream["img"].append(stream_tokens({"img": clip}, mc)["img"])
        per_stream["audio"].append(torch.randn((1, layout.tokens["audio"], layout.features["audio"]), generator=g))
    return {n: torch.cat(v) for n, v in per_stream.items()}


def _given_tokens(layout: StreamLayout, mc, video: Tensor | None, audio: Tensor | None,
                  given_frames: Sequence[int] | None, frames: int, fps: float, rate: int, codec,
                  device: torch.device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per stream: the mask of given tokens (1, N_s) and the clean tokens (B or 1, N_s, D_s) (zeros where none).

    ``given_frames`` None: a given stream is given whole. Otherwise those frames of the video and the sound over
    the same tubelets are given (a clip extended with its sound); each frame must fill whole tubelets."""
    data = {}
    if video is not None:
        data["img"] = video.to(device)
    if audio is not None:
        data["audio"] = codec.encode(audio.to(device))
    tokens = stream_tokens(data, mc, codec)
    masks, clean = {}, {}
    for n in layout.names:
        masks[n] = torch.zeros(1, layout.tokens[n], dtype=torch.bool, device=device)
        clean[n] = tokens.get(n, torch.zeros(1, layout.tokens[n], layout.features[n], device=device))
    if given_frames is None:
        for n in tokens:
            masks[n][:] = True
        return masks, clean
    if "img" not in layout.names:
        raise OmniditError("given frames need a clip", hint="drop audio_only")
    if video is None:
        raise OmniditError("given frames need the clip they come from", hint="pass video=")
    pt = mc.temporal_patch
    tubelets = given_tubelets(given_frames, frames, pt)
    count = frames // pt
    known = torch.zeros(count, dtype=torch.bool, device=device)
    known[tubelets] = True
    masks["img"] = known.repeat_interleave(layout.tokens["img"] // count)[None]
    if audio is not None:
        frame = audio_frame_size(mc, codec)
        where = audio_tubelets(layout.tokens["audio"] * frame, frame, rate, fps, pt, count)
        masks["audio"] = known[where.to(device)][None]
    return masks, clean
