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


def rope_rotations(ids: Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> Tensor:
    """(cos, sin) of the rotary angles in the last dim: (B, 1, N, head_dim // 2, 2) float32.

    This is the unit complex number e^(i * angle) stored as (real, imag), so ``apply_rope`` views it
    as complex for free. Computed once per forward (or once per sampling run, see
    ``MMDiT.positions``) and broadcast over heads.
    """
    angles = rope_frequencies(ids, axes_dim, theta).unsqueeze(1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) by their angle (Flux/diffusers convention).

    Each pair is read as the complex number x[2i] + i x[2i+1] and multiplied by its rotation: one
    fused kernel instead of the dozen elementwise ops of the real-valued formula, same arithmetic.
    x: (B, H, N, D); rotations: (B or 1, 1, N, D // 2, 2) from ``rope_rotations`` -> (B, H, N, D) in
    x's dtype.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex ops; the real-valued formula fuses into one kernel.
        cos, sin = rotations.to(xf.dtype).unbind(-1)
        x0, x1 = xf[..., 0], xf[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
    # view_as_complex needs a unit last stride and even strides and storage offset elsewhere.
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()
    rot = torch.view_as_complex(rotations.to(xf.dtype).contiguous())  # no-ops for the usual float32 input
    return torch.view_as_real(torch.view_as_complex(xf) * rot).flatten(-2).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None, mask: Tensor | None) -> Tensor:
    """Multi-head attention with optional RoPE and key padding mask.

    q, k, v: (B, H, N, D); pe: rotations from ``rope_rotations`` or None; mask: (B, N) bool, True
    for keys that may be attended to, or None. Returns (B, N, H * D).
    """
    if pe is not None:
        q, k = apply_rope(q, pe), apply_rope(k, pe)
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
