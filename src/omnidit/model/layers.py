"""Building blocks of the MM-DiT: modulation, norms, MLPs and the output layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMS normalisation with a learnable per-channel scale, computed in float32. x: (..., D)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel for x * rsqrt(mean(x^2) + eps) * scale.
        return nn.functional.rms_norm(x.float(), self.scale.shape, self.scale.float(), self.eps).type_as(x)


def layer_norm(dim: int, eps: float = 1e-6) -> nn.LayerNorm:
    """The affine-free LayerNorm that adaLN modulates (eps 1e-6 as in DiT/SD3/Flux)."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


class Modulation(nn.Module):
    """adaLN: the conditioning vector -> ``chunks`` vectors of size D (shift, scale, gate, ...).

    vec: (B, D) -> tuple of ``chunks`` tensors (B, 1, D), shared by every token; (B, N, D), one vector per
    token (per-token timesteps) -> tuples of (B, N, D); or a list of per-segment ``(vec, length)`` for a joint
    sequence whose streams have their own vectors, each (B, D) or (B, length, D) -> tuples of (B, N, D)
    where N is the sum of the lengths (a (B, D) segment is computed once and broadcast over its tokens).
    Zero-initialised by the model so that every block starts as the identity (adaLN-Zero).
    """

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(dim, chunks * dim)

    def _project(self, vec: Tensor) -> Tensor:
        # In the weights' precision even under bf16 autocast: a rounding error in a scale or gate
        # is applied to every token of the block.
        with torch.autocast(vec.device.type, enabled=False):
            out = self.lin(nn.functional.silu(vec.to(self.lin.weight.dtype)))
        return out[:, None, :] if out.dim() == 2 else out  # (B, 1 or N, chunks * D)

    def forward(self, vec: Tensor | list[tuple[Tensor, int]]) -> tuple[Tensor, ...]:
        if isinstance(vec, Tensor):
            return self._project(vec).chunk(self.chunks, dim=-1)  # views: no copies
        parts = [self._project(v).expand(-1, n, -1) for v, n in vec]
        return torch.cat(parts, dim=1).chunk(self.chunks, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift in one pass over x. x: (B, N, D); shift, scale: (B, 1 or N, D)."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
    """x + gate * branch in one pass (adaLN-Zero's gated residual). x, branch: (B, N, D); gate: (B, 1 or N, D)."""
    return torch.addcmul(x, gate, branch)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, used for the timestep, pooled-text and guidance embeddings."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(nn.functional.silu(self.in_layer(x)))


class MLP(nn.Module):
    """The transformer feed-forward: Linear -> GELU(tanh) -> Linear. x: (B, N, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a projection to the token's output features.

    x: (B, N, D), vec: (B, D) or per token (B, N, D) -> (B, N, out_dim). Zero-initialised so the model
    outputs 0 at init.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.mod = Modulation(dim, 2)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.mod(vec)
        return self.linear(modulate(self.norm(x), shift, scale))
