"""Cutting data into tokens and back, and the integer position ids the model's RoPE reads.

The model never sees pixels: images become (B, N, C * p * p) patch tokens here, with ids whose
last two axes are (row, column) of the patch grid and whose leading axes (time, ...) are 0 for a
still image. Any resolution or aspect ratio that the patch size divides works.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omnidit.errors import OmniditError


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
