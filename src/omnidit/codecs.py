"""Latent codecs: the only place that knows how pixels become model inputs and back, scaling included.

A codec maps images (B, C, H, W) in [-1, 1] to the representation the model trains on,
(B, c, H/f, W/f), already normalised, and back. ``IdentityCodec`` trains on pixels;
``VAECodec`` wraps a diffusers ``AutoencoderKL`` read from a local folder and applies its
``(z - shift) * scale`` normalisation (SD1/SDXL: shift 0; SD3/Flux: a shift from config.json).

diffusers is optional: it is imported only when a VAE is loaded.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from omnidit.errors import OmniditError

_VAE_HINT = ("pass 'identity' or a local diffusers AutoencoderKL folder "
             "(config.json + diffusion_pytorch_model.safetensors)")
_DIFFUSERS_HINT = "pip install -e '.[diffusers]'"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32 / "float32" / "fp32" (and the 16-bit ones) -> a torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise OmniditError(f"unsupported dtype {dtype!r}", hint="use float32, float16 or bfloat16")


def dtype_name(dtype: torch.dtype | str) -> str:
    """The canonical name used in codec names and cache keys: 'float32', 'float16' or 'bfloat16'."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def codec_name(spec: str, dtype: torch.dtype | str = torch.float32, sample: bool = False) -> str:
    """The ``name`` that ``load_codec(spec, ...)`` will have, computed without loading anything.

    Lets a trainer look up a latent cache without loading the VAE: "identity" or
    "vae:<resolved folder>:<dtype>" (+ ":sample" for a sampling codec).
    """
    if spec == "identity":
        return "identity"
    return f"vae:{Path(spec).expanduser().resolve()}:{dtype_name(dtype)}" + (":sample" if sample else "")


class LatentCodec(Protocol):
    """What the trainer, the pipeline and precompute may rely on."""

    name: str  # identity string used in cache keys
    channels: int  # channels of the encoded representation (model.in_channels must equal it)
    downsample: int  # spatial factor f

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


def _check_images(images: Tensor, channels: int, downsample: int, clips: bool = False) -> None:
    """Images (B, C, H, W), or with ``clips`` also clips (B, C, T, H, W)."""
    if images.dim() not in ((4, 5) if clips else (4,)) or images.shape[1] != channels:
        shape = f"(B, {channels}, H, W) or clips (B, {channels}, T, H, W)" if clips else f"(B, {channels}, H, W)"
        raise ValueError(f"expected images {shape}, got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % downsample or w % downsample:
        raise OmniditError(f"image size {w}x{h} is not a multiple of the codec's downsample factor {downsample}",
                           hint=f"use a width and height divisible by {downsample}")


class IdentityCodec:
    """Pixels as they are: encode is a float32 view, decode clamps to [-1, 1]. Images and clips alike."""

    downsample = 1

    def __init__(self, channels: int = 3) -> None:
        self.channels = int(channels)
        self.name = "identity"

    def __repr__(self) -> str:
        return f"IdentityCodec(channels={self.channels})"

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, H, W) or (B, C, T, H, W) in [-1, 1] -> the same values as float32 (no copy when float32)."""
        _check_images(images, self.channels, 1, clips=True)
        return images.float()

    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, H, W) or (B, C, T, H, W) -> the same shape, float32 clamped to [-1, 1]."""
        return latents.float().clamp(-1, 1)


class WaveformCodec:
    """Sound as samples: the mono waveform (B, 1, S) in [-1, 1] times ``scale``, so that beeps of amplitude ~0.4
    with silence between them reach a spread nearer the unit noise (``data.audio_scale``). Exactly invertible
    (up to the scale's rounding): (B, 1, S) -> (B, 1, S), one latent frame per sample (``hop`` 1).

    The interface every sound codec fills (``SpectrogramCodec``; a learned audio autoencoder such as Stable
    Audio Open's VAE would too): ``encode`` (B, 1, S) -> (B, channels, S / hop) latents, normalised; ``decode``
    back to (B, 1, S). The model's sound tokens are runs of latent frames (``tokens.audio_patchify``), so a
    token of F features spans F / channels latent frames, hop samples each, and sits at its start time in
    seconds like a video frame.
    """

    channels = 1
    hop = 1

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise OmniditError(f"data.audio_scale must be positive, got {scale}", hint="e.g. 2.5")
        self.scale = float(scale)
        self.name = f"waveform:{self.scale:g}"

    def encode(self, audio: Tensor) -> Tensor:
        return audio * self.scale

    def decode(self, latents: Tensor) -> Tensor:
        return latents / self.scale


class SpectrogramCodec:
    """Sound as a log-magnitude spectrogram: a Hann STFT of 2 * hop points every ``hop`` samples, all
    hop + 1 bins as channels, SCALE * log1p(magnitude): silence is 0, and on the built-in data the values
    spread about 0.5 around a mean of 0.05, near the spread of pixels (a latent scaled as an image VAE's is).
    (B, 1, S) -> (B, hop + 1, S / hop): column j is the window centred on sample j * hop.

    The phase is dropped, so the model never has to draw a waveform's phase (which, on a CPU budget, it did
    not learn: the phase of a tone at a random onset is noise to a small network); ``decode`` puts a phase back
    with Griffin-Lim (``iterations`` rounds of STFT consistency from a fixed seeded start), which is
    deterministic. Not exactly invertible: a tone's pitch, onset and length come back (the tone and sync
    judges score decoded ground truth almost as they score the waveform: 199 of 200 tones clips; 347 of 347
    bounces heard, with 4 beeps split in two), not its samples.
    """

    SCALE = 2.0

    def __init__(self, hop: int = 200, iterations: int = 64) -> None:
        if not (isinstance(hop, int) and hop >= 2):
            raise OmniditError(f"data.audio_hop must be a whole number of samples >= 2, got {hop}")
        self.hop, self.n_fft, self.iterations = hop, 2 * hop, int(iterations)
        self.channels = hop + 1
        self.name = f"spectrogram:{hop}"

    def _window(self, device: torch.device) -> Tensor:
        return torch.hann_window(self.n_fft, dtype=torch.float64, device=device)

    def _stft(self, x: Tensor) -> Tensor:
        """(N, S) float64 -> (N, hop + 1, S / hop) complex: the centred STFT without its last column."""
        return torch.stft(x, self.n_fft, self.hop, window=self._window(x.device), center=True,
                          return_complex=True)[..., :x.shape[-1] // self.hop]

    def encode(self, audio: Tensor) -> Tensor:
        b, c, s = audio.shape
        if c != 1 or s % self.hop:
            raise OmniditError(f"the spectrogram codec takes mono sound of a multiple of {self.hop} samples, "
                               f"got {c} channel(s) of {s}")
        magnitude = self._stft(audio[:, 0].double()).abs()
        return (self.SCALE * torch.log1p(magnitude)).to(audio.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        b, f, w = latents.shape
        magnitude = torch.expm1(latents.double().clamp(0, 12) / self.SCALE)  # below 0 is silence
        magnitude = torch.cat([magnitude, torch.zeros_like(magnitude[..., :1])], dim=-1)  # the dropped column
        length, window = w * self.hop, self._window(latents.device)
        g = torch.Generator().manual_seed(0)
        phase = torch.polar(torch.ones(magnitude.shape, dtype=torch.float64),
                            2 * torch.pi * torch.rand(magnitude.shape, generator=g, dtype=torch.float64))
        phase = phase.to(latents.device)
        for _ in range(self.iterations):
            x = torch.istft(magnitude * phase, self.n_fft, self.hop, window=window, center=True, length=length)
            again = torch.stft(x, self.n_fft, self.hop, window=window, center=True, return_complex=True)
            phase = again / again.abs().clamp(min=1e-12)
        x = torch.istft(magnitude * phase, self.n_fft, self.hop, window=window, center=True, length=length)
        return x[:, None].to(latents.dtype)


AUDIO_CODECS = ("waveform", "spectrogram")


def load_audio_codec(data_config) -> WaveformCodec | SpectrogramCodec:
    """The sound codec a data config names (``data.audio_codec``: waveform, with ``data.audio_scale``, or
    spectrogram, with ``data.audio_hop``)."""
    if data_config.audio_codec == "spectrogram":
        return SpectrogramCodec(data_config.audio_hop)
    return WaveformCodec(data_config.audio_scale)


def _check_vae_folder(directory: Path) -> None:
    """Fail early, before importing diffusers, unless config.json describes an AutoencoderKL."""
    if not directory.exists():
        raise OmniditError(f"VAE folder not found: {directory}", hint=_VAE_HINT)
    if not directory.is_dir():
        raise OmniditError(f"VAE path is not a folder: {directory}", hint=_VAE_HINT)
    path = directory / "config.json"
    if not path.is_file():
        raise OmniditError(f"no config.json in VAE folder {directory}", hint=_VAE_HINT)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OmniditError(f"cannot read {path}: {e}", hint=_VAE_HINT) from e
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise OmniditError(f"{path} describes {found!r}, not an AutoencoderKL", hint=_VAE_HINT)


@contextmanager
def _quiet_diffusers():
    """Silence diffusers' load-time advice (e.g. 'install accelerate'), then restore its log level."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


class VAECodec:
    """A frozen diffusers ``AutoencoderKL`` from a local folder, with its latent normalisation.

    Latents are ``(z - shift) * scale`` with ``scale = scaling_factor`` and ``shift = shift_factor``
    (0 when config.json has none, as for SD1/SDXL). A config with per-channel ``latents_mean`` /
    ``latents_std`` uses them instead: ``(z - mean) * scaling_factor / std``.

    ``encode`` returns the posterior mean (deterministic, so latents can be cached); with
    ``sample=True`` it draws ``mean + std * noise`` from the generator it is given. The VAE runs on
    ``device`` in ``dtype`` (float32 by default; bfloat16 suits GPUs); inputs and outputs are float32
    on the caller's device.
    """

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, sample: bool = False) -> None:
        directory = Path(directory).expanduser().resolve()
        _check_vae_folder(directory)
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise OmniditError("loading a VAE needs the optional 'diffusers' package", hint=_DIFFUSERS_HINT) from e
        self.dtype, self.device, self.sample = resolve_dtype(dtype), torch.device(device), bool(sample)
        with _quiet_diffusers():
            try:  # use_safetensors: never fall back to a pickled .bin
                vae = AutoencoderKL.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                    torch_dtype=self.dtype)
            except Exception as e:  # OSError, ValueError, safetensors errors ... all mean "bad folder"
                raise OmniditError(f"cannot load the VAE in {directory}: {e}", hint=_VAE_HINT) from e
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.directory = directory
        config = vae.config  # config.json with diffusers' defaults filled in (scaling_factor 0.18215 ...)
        self.image_channels, self.channels = int(config.in_channels), int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)  # null/absent (SD1, SDXL) -> 0
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        shape = (1, self.channels, 1, 1)
        shift = torch.tensor(mean).reshape(shape) if mean else torch.full(shape, self.shift_factor)
        scale = self.scaling_factor / (torch.tensor(std).reshape(shape) if std else torch.ones(shape))
        self.shift, self.scale = shift.float().to(self.device), scale.float().to(self.device)  # (1, c, 1, 1)
        self.name = codec_name(str(directory), self.dtype, self.sample)

    def __repr__(self) -> str:
        return f"VAECodec({str(self.directory)!r}, channels={self.channels}, downsample={self.downsample}, " \
               f"dtype={dtype_name(self.dtype)}, device={self.device})"

    @torch.no_grad()  # not inference_mode: the latents become training targets, which autograd saves
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f), float32 on the images' device."""
        _check_images(images, self.image_channels, self.downsample)
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        if self.sample:
            if generator is None:
                raise ValueError("a sampling VAECodec needs an explicit torch.Generator")
            z = dist.sample(generator=generator)
        else:
            z = dist.mean
        z = z.float()  # normalise in float32 so bf16 VAEs lose no more precision than they must
        return ((z - self.shift) * self.scale).to(images.device)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, c, h, w) -> images (B, C, h*f, w*f) float32 in [-1, 1] on the latents' device."""
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"expected latents (B, {self.channels}, h, w), got {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32)
        z = z / self.scale + self.shift
        images = self.vae.decode(z.to(self.dtype)).sample
        return images.float().clamp(-1, 1).to(latents.device)


_LOADED: dict[tuple, LatentCodec] = {}


def load_codec(spec: str, channels: int = 3, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32, sample: bool = False) -> LatentCodec:
    """``"identity"`` (pixels with ``channels`` channels) or a local VAE folder; one instance per settings.

    ``channels`` is the data's channel count; a VAE must take that many. ``dtype`` and ``sample``
    apply to VAEs only (see ``VAECodec``).
    """
    if spec == "identity":
        key: tuple = ("identity", int(channels))
    else:
        if not spec:
            raise OmniditError("no codec given", hint=_VAE_HINT)
        key = (str(Path(spec).expanduser().resolve()), str(torch.device(device)), dtype_name(dtype), bool(sample))
    if key not in _LOADED:
        _LOADED[key] = IdentityCodec(channels) if spec == "identity" else VAECodec(spec, device, dtype, sample)
    codec = _LOADED[key]
    if isinstance(codec, VAECodec) and codec.image_channels != channels:
        raise OmniditError(f"the VAE in {codec.directory} takes {codec.image_channels}-channel images "
                           f"but the data has {channels} channels",
                           hint="use a VAE made for this data, or the identity codec")
    return codec
