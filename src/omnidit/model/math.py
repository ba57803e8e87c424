"""The model's pure functions: attention, rotary position embedding, timestep embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The one place where the time convention t in [0, 1] meets the embedding's scale: sinusoidal
# frequencies were designed for integer steps 0..1000 (DDPM), so t is multiplied by 1000 here and
# nowhere else (guidance scales go through the same function, as in Flux).
TIME_FACTOR = 1000.0


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of continuous times, ``[cos, sin]`` halves (as DiT, SD3 and Flux).

    t: (B,) floats in [0, 1] -> (B, dim) float32. Frequencies are exp(-ln(max_period) i / (half -
    freq_shift)); SD3 and Flux use freq_shift 0, diffusers' DiT 1.
    """
    t = (TIME_FACTOR * t).float()  # scale first, in the caller's precision: 0.127 * 1000 is exact in float64
    half = dim // 2
    # The same float32 operation order as diffusers and Flux, so embeddings agree bit for bit.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope_frequencies(ids: Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> Tensor:
    """Axial rotary angles for integer position ids.

    ids: (B, N, A) positions, one column per axis; axes_dim: rotary dims per axis (each even,
    summing to the head dim). Returns angles (B, N, head_dim // 2) float32: axis ``a`` owns
    ``axes_dim[a] // 2`` consecutive frequency slots, as in Flux's EmbedND.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes but the model has {len(axes_dim)}")
    # float64 keeps large positions exact; MPS has no float64.
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)
        angles.append(ids[..., axis, None].to(dtype) * omega)
    return torch.cat(angles, dim=-1).float()


def rope_cos_sin(ids: Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, shaped (B, 1, N, head_dim // 2) to broadcast over heads."""
    angles = rope_frequencies(ids, axes_dim, theta).unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) by their angle (Flux/diffusers convention).

    x: (B, H, N, D); cos, sin: (B, 1, N, D // 2) -> (B, H, N, D) in x's dtype.
    """
    x_pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: tuple[Tensor, Tensor] | None, mask: Tensor | None) -> Tensor:
    """Multi-head attention with optional RoPE and key padding mask.

    q, k, v: (B, H, N, D); pe: (cos, sin) from ``rope_cos_sin`` or None; mask: (B, N) bool, True
    for keys that may be attended to, or None. Returns (B, N, H * D).
    """
    if pe is not None:
        q, k = apply_rope(q, *pe), apply_rope(k, *pe)
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).flatten(2)


def sincos_position_embedding(ids: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Fixed absolute sin-cos embedding over all position axes (DiT-style, computed from ids).

    ids: (B, N, A) -> (B, N, dim); each axis gets ``dim // A`` channels, ``[sin, cos]`` halves.
    """
    axes = ids.shape[-1]
    per_axis = dim // axes
    if per_axis * axes != dim or per_axis % 2:
        raise ValueError(f"hidden size {dim} must split into {axes} even parts for sin-cos positions")
    half = per_axis // 2
    omega = 1.0 / max_period ** (torch.arange(half, dtype=torch.float32, device=ids.device) / half)
    parts = []
    for axis in range(axes):
        args = ids[..., axis, None].float() * omega
        parts += [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=-1).float()


def sincos_2d_table(size: int, dim: int, max_period: float = 10000.0) -> Tensor:
    """The fixed 2-D sin-cos table of DiT and SD3 for a size x size grid: (size, size, dim) float32.

    Entry [row, col] = [sin(col w), cos(col w), sin(row w), cos(row w)], w_i = max_period^(-i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a dim divisible by 4, got {dim}")
    omega = 1.0 / max_period ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(size, dtype=torch.float64)[:, None] * omega  # (size, dim/4)
    axis = torch.cat([pos.sin(), pos.cos()], dim=-1)  # (size, dim/2)
    cols = axis[None, :, :].expand(size, size, -1)
    rows = axis[:, None, :].expand(size, size, -1)
    return torch.cat([cols, rows], dim=-1).float()
