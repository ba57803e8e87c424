"""Inpainting and outpainting: generate only the masked part of an image, keep every other pixel exactly.

The mask is rounded up to whole tokens (a token is generated when any of its pixels is masked); the other tokens
are given, by one of two mechanisms (``mode``):

- ``tokens``: the given tokens are clean context at t = 0, exactly as image-to-video gives frames (the modalities
  issue's per-token timesteps). Right for a model trained with clean context tokens (``train.given_p``,
  ``train.region_p`` or ``train.stream_given_p`` > 0).
- ``blend``: the given tokens travel their straight path from their noise to the image, so the model sees every
  token noised to the same t, as in training (``sampling.follow_noised_path``; SDEdit's and diffusers' inpaint
  pipelines blend the same way). Right for any model, and the choice of ``auto`` for one never trained with
  clean context (the shipped shapes model).

Either way the result is the generated image where the mask is set and the input image, bit for bit, everywhere
else (for a VAE model the decoded latents would blur the kept pixels, so they are pasted back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from omnidit.errors import OmniditError

INPAINT_MODES = ("auto", "tokens", "blend")


def trained_with_context(config) -> bool:
    """Whether the model saw clean context tokens (t = 0) next to noised ones in training."""
    return config.train.given_p > 0 or config.train.stream_given_p > 0 or config.train.region_p > 0


def resolve_mode(mode: str, config) -> str:
    """``auto`` -> ``tokens`` for a model trained with clean context tokens, else ``blend``."""
    if mode not in INPAINT_MODES:
        raise OmniditError(f"unknown inpainting mode '{mode}'", hint=f"choose one of {', '.join(INPAINT_MODES)}")
    if mode == "auto":
        return "tokens" if trained_with_context(config) else "blend"
    return mode


def token_mask(mask: Tensor, cell: int) -> Tensor:
    """Which tokens to generate: (H / cell * W / cell,) bool in row-major order, True where any pixel of the token's
    ``cell`` x ``cell`` square is set in ``mask`` (H, W) bool."""
    h, w = mask.shape
    return mask.reshape(h // cell, cell, w // cell, cell).any(dim=3).any(dim=1).flatten()


def pad_for_outpainting(image: Tensor, mask: Tensor | None, pad: Sequence[int]) -> tuple[Tensor, Tensor]:
    """A canvas larger by ``pad`` = (left, top, right, bottom) pixels with ``image`` (B, C, H, W) inside and the
    mask (H', W') bool that marks the border (and ``mask`` (H, W), if given, inside) for generation."""
    left, top, right, bottom = (int(v) for v in pad)
    if min(left, top, right, bottom) < 0:
        raise OmniditError(f"outpainting pads must not be negative, got {tuple(pad)}")
    b, c, h, w = image.shape
    canvas = torch.zeros(b, c, h + top + bottom, w + left + right, dtype=image.dtype)
    canvas[:, :, top:top + h, left:left + w] = image
    grown = torch.ones(canvas.shape[-2:], dtype=torch.bool)
    grown[top:top + h, left:left + w] = False if mask is None else mask
    return canvas, grown


def check_inputs(image: Tensor, mask: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """image (B or 1, C, H, W) or (C, H, W) and mask (H, W) or (1, H, W), checked -> (B, C, H, W), (H, W) bool."""
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != channels:
        raise OmniditError(f"the image must be (B, {channels}, H, W) in [-1, 1], got {tuple(image.shape)}")
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != image.shape[-2:]:
        raise OmniditError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                           f"{image.shape[-1]}x{image.shape[-2]}", hint="give a mask of the image's size")
    mask = mask.bool()
    if not mask.any():
        raise OmniditError("the mask selects no pixels, so there is nothing to inpaint",
                           hint="white (or True) marks the pixels to generate")
    return image.float(), mask


def inpaint(pipe, prompts: list[str], image: Tensor, mask: Tensor, mode: str = "auto",
            seed: int | Sequence[int] = 0, progress: bool = False, negative_prompt: str = "",
            on_step=None, boxes: Sequence | None = None, **sampling) -> Tensor:
    """Fill the masked pixels of ``image`` according to each prompt: (B, C, H, W) in [-1, 1].

    image: (B or 1, C, H, W) in [-1, 1] (one image is shared by every prompt); mask: (H, W) bool, True = generate.
    ``mode``: ``auto``, ``tokens`` or ``blend`` (the module docstring). ``sampling``: the keys of
    ``pipeline.SAMPLING_KEYS``; best-of-N candidates (the model's ``sample.candidates`` by default) are scored
    as whole images, the given pixels with the rest (``selection``). Pixels outside the mask come back exactly
    as given. ``boxes``: layout boxes for a model with a layout adapter (``Pipeline.generate``), e.g. to draw an
    object in a new place (a move).
    """
    from omnidit.pipeline import SAMPLING_KEYS

    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(f"inpaint() got unexpected keyword arguments {unknown}")
    mode = resolve_mode(mode, pipe.config)
    mc = pipe.model.config
    factor = pipe.codec.downsample if pipe.codec is not None else 1
    image, mask = check_inputs(image, mask, 3 if factor != 1 else mc.in_channels)
    if image.shape[0] not in (1, len(prompts)):
        raise OmniditError(f"{image.shape[0]} images for {len(prompts)} prompts", hint="give one image, or one each")
    height, width = image.shape[-2:]
    cell = mc.patch_size * factor
    if height % cell or width % cell:
        raise OmniditError(f"the image is {width}x{height}, which this model's {cell}-pixel tokens do not divide",
                           hint=f"crop or pad it to a multiple of {cell} pixels")
    sampling = {k: sampling.get(k) for k in SAMPLING_KEYS}
    settings = pipe.sampling_settings(**sampling)
    with torch.inference_mode():
        given = image.to(pipe.device)
        if factor != 1:  # the model's tokens are a VAE's latents
            given = pipe.codec.encode(given)
        generated = pipe._generate(prompts, 1, 1.0, width, height, settings, seed, given[:, :, None], (), progress,
                                   negative_prompt, on_step, token_mask=~token_mask(mask, cell),
                                   given_noised=mode == "blend", boxes=boxes)[:, :, 0]
    return torch.where(mask, generated, image.cpu().clamp(-1, 1))
