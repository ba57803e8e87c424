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


def token_mask(mask: Tensor, cell: int, temporal_patch: int = 1) -> Tensor:
    """Which tokens to generate: (T / pt * H / cell * W / cell,) bool in the tokens' order (tubelet, row, column),
    True where any pixel of the token's ``temporal_patch`` x ``cell`` x ``cell`` block is set in ``mask`` (H, W)
    or (T, H, W) bool."""
    t, h, w = mask.shape if mask.dim() == 3 else (1, *mask.shape)
    pt = temporal_patch if mask.dim() == 3 else 1
    blocks = mask.reshape(t // pt, pt, h // cell, cell, w // cell, cell)
    return blocks.any(dim=5).any(dim=3).any(dim=1).flatten()


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


def move_region(image: Tensor, mask: Tensor, shift: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Move the pixels that ``mask`` (H, W) marks in ``image`` (B, C, H, W) by ``shift`` = (dx, dy) pixels (right,
    down): (the canvas with them pasted at their new place, on top; the vacated pixels (H, W) bool, which the
    region left and nothing covers now, to inpaint). A move for any model: the moved pixels are the input's
    exactly, and only the hole they leave is generated."""
    dx, dy = (int(v) for v in shift)
    if image.dim() != 4 or mask.shape != image.shape[-2:]:
        raise OmniditError(f"a move takes an image (B, C, H, W) and a mask of its size, got {tuple(image.shape)} "
                           f"and {tuple(mask.shape)}", hint="moves work on images, not clips")
    mask = mask.bool()
    if not mask.any():
        raise OmniditError("the mask selects no pixels, so there is nothing to move", hint="mark what to move")
    if (dx, dy) == (0, 0):
        raise OmniditError("a move by (0, 0) pixels changes nothing", hint="give --move DX DY with DX or DY not 0")
    h, w = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)
    if rows.min() + dy < 0 or rows.max() + dy >= h or cols.min() + dx < 0 or cols.max() + dx >= w:
        raise OmniditError(f"moved by ({dx}, {dy}) pixels the region leaves the {w}x{h} image",
                           hint="move it less, or mark a smaller region")
    moved = torch.zeros_like(mask)
    moved[rows + dy, cols + dx] = True
    canvas = image.clone()
    canvas[:, :, rows + dy, cols + dx] = image[:, :, rows, cols]
    return canvas, mask & ~moved


def check_inputs(image: Tensor, mask: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """An image (B or 1, C, H, W) or (C, H, W), or a clip (B or 1, C, T, H, W), and a mask (H, W) or (1, H, W) (for a
    clip: every frame), or (T, H, W) for a clip, checked -> (B, C, T, H, W), (T, H, W) bool."""
    if image.dim() == 3:
        image = image[None]
    if image.dim() == 4:
        image = image[:, :, None]
    if image.dim() != 5 or image.shape[1] != channels:
        raise OmniditError(f"the image must be (B, {channels}, H, W) or a clip (B, {channels}, T, H, W) in [-1, 1], "
                           f"got {tuple(image.shape)}")
    frames = image.shape[2]
    described = f"{mask.shape[-1]}x{mask.shape[-2]}" + (f" x {mask.shape[0]} frames" if mask.dim() == 3 else "")
    if mask.dim() == 2 or (mask.dim() == 3 and mask.shape[0] == 1):
        mask = mask.reshape(mask.shape[-2:]).expand(frames, *mask.shape[-2:])
    if mask.dim() != 3 or mask.shape[-2:] != image.shape[-2:] or mask.shape[0] != frames:
        what = "image" if frames == 1 else f"clip of {frames} frames"
        raise OmniditError(f"the mask is {described} but the {what} is {image.shape[-1]}x{image.shape[-2]}",
                           hint="give a mask of the image's size (H, W), or one per frame (T, H, W) for a clip")
    mask = mask.bool()
    if not mask.any():
        raise OmniditError("the mask selects no pixels, so there is nothing to inpaint",
                           hint="white (or True) marks the pixels to generate")
    return image.float(), mask


def inpaint(pipe, prompts: list[str], image: Tensor, mask: Tensor, mode: str = "auto",
            seed: int | Sequence[int] = 0, progress: bool = False, negative_prompt: str = "",
            on_step=None, boxes: Sequence | None = None, fps: float | None = None, **sampling) -> Tensor:
    """Fill the masked pixels of ``image`` according to each prompt: (B, C, H, W) in [-1, 1], or (B, C, T, H, W)
    for a clip.

    image: (B or 1, C, H, W) in [-1, 1] (one image is shared by every prompt), or a clip (B or 1, C, T, H, W) for a
    video model (at ``fps``, default the model's; T a multiple of its temporal patch); mask: (H, W) bool, True =
    generate (for a clip: in every frame), or (T, H, W) per frame. ``mode``: ``auto``, ``tokens`` or ``blend``
    (the module docstring). ``sampling``: the keys of ``pipeline.SAMPLING_KEYS``; best-of-N candidates (the
    model's ``sample.candidates`` by default) are scored as whole images, the given pixels with the rest
    (``selection``). Pixels outside the mask come back exactly as given. ``boxes``: layout boxes for a model with
    a layout adapter (``Pipeline.generate``), e.g. to draw an object in a new place (a move).
    """
    from omnidit.pipeline import SAMPLING_KEYS

    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(f"inpaint() got unexpected keyword arguments {unknown}")
    mode = resolve_mode(mode, pipe.config)
    mc = pipe.model.config
    factor = pipe.codec.downsample if pipe.codec is not None else 1
    clip = image.dim() == 5
    image, mask = check_inputs(image, mask, 3 if factor != 1 else mc.in_channels)  # (B, C, T, H, W), (T, H, W)
    if image.shape[0] not in (1, len(prompts)):
        raise OmniditError(f"{image.shape[0]} images for {len(prompts)} prompts", hint="give one image, or one each")
    frames, height, width = image.shape[-3:]
    cell = mc.patch_size * factor
    if height % cell or width % cell:
        raise OmniditError(f"the image is {width}x{height}, which this model's {cell}-pixel tokens do not divide",
                           hint=f"crop or pad it to a multiple of {cell} pixels")
    if (clip and factor != 1) or frames % mc.temporal_patch:  # an image too: one frame cannot fill a tubelet of 2
        raise OmniditError(f"this model cannot inpaint a clip of {frames} frames" + (
                           "" if factor != 1 else f": its temporal patch {mc.temporal_patch} does not divide them"),
                           hint="give an image, or a clip whose frame count the video model's temporal patch divides")
    sampling = {k: sampling.get(k) for k in SAMPLING_KEYS}
    settings = pipe.sampling_settings(**sampling)
    with torch.inference_mode():
        given = image.to(pipe.device)
        if factor != 1:  # the model's tokens are a VAE's latents
            given = pipe.codec.encode(given[:, :, 0])[:, :, None]
        generated = pipe._generate(prompts, frames, fps or pipe.config.data.fps, width, height, settings, seed,
                                   given, (), progress, negative_prompt, on_step,
                                   token_mask=~token_mask(mask, cell, mc.temporal_patch),
                                   given_noised=mode == "blend", boxes=boxes)
    result = torch.where(mask, generated, image.cpu().clamp(-1, 1))
    return result if clip else result[:, :, 0]
