"""Checks that a training config's model, data, codec and text settings agree, each failure one error that
names the key to change."""

from __future__ import annotations

from omnidit.codecs import load_audio_codec
from omnidit.config import Config
from omnidit.data import streams
from omnidit.errors import OmniditError
from omnidit.tokens import (
    audio_frame_size,
    check_audio_length,
    check_frame_count,
    check_image_size,
    clip_samples,
)


def check_streams(config: Config, dataset) -> None:
    """The model must have every stream the data fill, and frames that divide the data's sound."""
    mc, dc = config.model, config.data
    missing = [n for n in streams(dataset) if n not in mc.generated_streams]
    if missing:
        raise OmniditError(f"the '{dc.name}' data have {missing[0]}, but the model has no {missing[0]} stream",
                           hint='add model.extra_streams={"audio": 200} (samples per token)')
    if "audio" in streams(dataset):
        frame = audio_frame_size(mc, load_audio_codec(dc))  # samples per sound token
        check_audio_length(dataset.samples, frame)
        if "img" in streams(dataset):
            tubelet = clip_samples(mc.temporal_patch, dc.fps, dc.sample_rate)  # samples per video tubelet
            if tubelet % frame:
                raise OmniditError(f"audio tokens of {frame} samples do not tile a video tubelet of "
                                   f"{float(tubelet):g} samples", hint="use an audio frame that divides "
                                   f"{dc.sample_rate} / {dc.fps:g} x {mc.temporal_patch} samples")


def check_compatible(config: Config, dataset, codec) -> None:
    """Model, data, codec and text settings must agree; say which key to change when they do not."""
    mc = config.model
    check_streams(config, dataset)
    if "img" not in streams(dataset):  # sound alone: the picture settings do not apply
        return _check_text(config)
    if mc.in_channels != codec.channels:
        what = "data" if config.data.codec == "identity" else "VAE latents"
        raise OmniditError(f"model.in_channels is {mc.in_channels} but the '{config.data.name}' {what} have "
                           f"{codec.channels} channels", hint=f"set model.in_channels={codec.channels}")
    if mc.out_channels not in (0, mc.in_channels):
        raise OmniditError(f"model.out_channels={mc.out_channels} differs from in_channels={mc.in_channels}: "
                           "a velocity model predicts one value per input value", hint="set model.out_channels=0")
    if dataset.num_classes and mc.num_classes not in (0, dataset.num_classes):
        raise OmniditError(f"model.num_classes is {mc.num_classes} but the data has {dataset.num_classes} classes")
    check_image_size(config.data.height, config.data.width, mc.patch_size * codec.downsample)
    check_frame_count(config.data.frames, mc.temporal_patch)
    clip = getattr(dataset, "frames", 1) > 1 or config.data.frames > 1
    if clip and (getattr(dataset, "frames", 1), getattr(dataset, "fps", config.data.fps)) != (
            config.data.frames, config.data.fps):
        raise OmniditError(f"data.frames={config.data.frames} is for clips, but the '{config.data.name}' data are "
                           "still images", hint="use data.name=shapes_video, or data.frames=1")
    if clip and codec.downsample != 1:
        raise OmniditError("clips train in pixel space: the image VAE in data.codec has no time axis",
                           hint="set data.codec=identity")
    if clip and config.data.cache_dir:
        raise OmniditError("data.cache_dir caches images; clips train from the data directly",
                           hint="drop data.cache_dir")
    if config.train.given_p > 0 and config.data.frames // mc.temporal_patch < 2:
        raise OmniditError("train.given_p gives some frames of a clip as context, but the data are single frames",
                           hint="set train.given_p=0, or train on clips (data.frames > 1)")
    _check_text(config)


def _check_text(config: Config) -> None:
    """The text encoder's sizes must match the model's (or there is no text, and class labels instead)."""
    mc = config.model
    if config.text.encoder == "none":
        if mc.context_dim or mc.pooled_dim:
            raise OmniditError("text.encoder is 'none' but the model reads text",
                               hint="set model.context_dim=0 and model.pooled_dim=0 (class labels only)")
        if not mc.num_classes:
            raise OmniditError("the model has neither text nor class conditioning",
                               hint="set text.encoder=minilm or model.num_classes")
        return
    from omnidit.text import text_encoder_dims

    dim, pooled = text_encoder_dims(config.text.encoder)
    if mc.context_dim not in (0, dim) or mc.pooled_dim not in (0, pooled):
        raise OmniditError(f"the text encoder gives {dim}-d tokens and {pooled}-d pooled vectors, but the model has "
                           f"context_dim={mc.context_dim}, pooled_dim={mc.pooled_dim}",
                           hint=f"set model.context_dim={dim} model.pooled_dim={pooled}")
