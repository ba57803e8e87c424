"""Building blocks of the MM-DiT: modulation, norms, MLPs and the output layer."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

# A float32 matrix product with fewer rows than this takes other kernels on x86 CPUs (torch's BLAS: 1-3, 5-7 and
# 9-11 rows gave other roundings than larger products), so a row's output would depend on how many rows share the
# call: a sample's modulation, its text tokens, an image alone or in a batch. Fewer rows are padded to this many.
INVARIANT_ROWS = 16


def cpu_float_inference(x: Tensor, compiled: bool = False) -> bool:
    """Whether ``x`` is computed on in CPU float32/64 inference without autograd or autocast, whose kernels or
    roundings differ: eager, or with ``compiled`` inside torch.compile's trace. Where ``linear`` pads (eager) and
    ``gelu_tanh`` takes its faster form (both)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.is_grad_enabled()
            and torch.compiler.is_compiling() == compiled and not torch.is_autocast_enabled("cpu"))


def padded_rows(x: Tensor) -> Tensor:
    """x (..., in) as (INVARIANT_ROWS, in): its rows, then zeros."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([flat, flat.new_zeros(INVARIANT_ROWS - len(flat), flat.shape[-1])])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` whose output rows do not depend on the other rows of the call at CPU float inference
    (``cpu_float_inference``): a product of fewer than ``INVARIANT_ROWS`` rows is computed padded to that many, as
    the large products are. x: (..., in) -> (..., out). Elsewhere it is ``F.linear`` itself."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not (0 < rows < INVARIANT_ROWS and cpu_float_inference(x)):
        return nn.functional.linear(x, weight, bias)
    return nn.functional.linear(padded_rows(x), weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) computed by ``linear``, so that an image is the same
    whether it was drawn alone or in a batch."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


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


class TokenVectors(NamedTuple):
    """Per-token conditioning vectors, stored compactly: token n of sample b has ``vectors[b, index[b, n]]``.

    vectors: (B, K, D); index: (B, N) int64. Per-token timesteps take few distinct values (0 for given
    tokens, the sampler's time for the rest), so K is small and adaLN projects K vectors per sample.
    """

    vectors: Tensor
    index: Tensor


class Modulation(nn.Module):
    """adaLN: the conditioning vector -> ``chunks`` vectors of size D (shift, scale, gate, ...).

    vec: (B, D) -> tuple of ``chunks`` tensors (B, 1, D), shared by every token; ``TokenVectors`` (one
    vector per token, per-token timesteps) -> tuples of (B, N, D); or a list of per-segment ``(vec, length)``
    for a joint sequence whose streams have their own vectors, each (B, D) or ``TokenVectors`` -> tuples of
    (B, N, D) where N is the sum of the lengths (a (B, D) segment is projected once and broadcast).
    Zero-initialised by the model so that every block starts as the identity (adaLN-Zero).
    """

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.lin = Linear(dim, chunks * dim)

    def _project(self, vec: Tensor | TokenVectors, length: int | None = None) -> Tensor:
        """(B, 1, chunks * D) for a (B, D) vector (expanded to ``length`` tokens when given), (B, N, chunks * D)
        for TokenVectors."""
        per_token = isinstance(vec, TokenVectors)
        v = vec.vectors if per_token else vec
        # In the weights' precision even under bf16 autocast: a rounding error in a scale or gate
        # is applied to every token of the block. (The bias has the weight's dtype, and reading it costs
        # nothing for a weight-only quantized layer, whose weight would be dequantized.)
        with torch.autocast(v.device.type, enabled=False):
            out = self.lin(nn.functional.silu(v.to(self.lin.bias.dtype)))
        if per_token:  # (B, K, C) -> each token's row, (B, N, C)
            return torch.gather(out, 1, vec.index[..., None].expand(-1, -1, out.shape[-1]))
        out = out[:, None, :]
        return out if length is None else out.expand(-1, length, -1)

    def forward(self, vec: Tensor | TokenVectors | list[tuple[Tensor | TokenVectors, int]]) -> tuple[Tensor, ...]:
        if not isinstance(vec, list):
            return self._project(vec).chunk(self.chunks, dim=-1)  # views: no copies
        return torch.cat([self._project(v, n) for v, n in vec], dim=1).chunk(self.chunks, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift in one pass over x. x: (B, N, D); shift, scale: (B, 1 or N, D)."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
    """x + gate * branch in one pass (adaLN-Zero's gated residual). x, branch: (B, N, D); gate: (B, 1 or N, D)."""
    return torch.addcmul(x, gate, branch)


# GELU's tanh form is x * sigmoid(2 u) with u = sqrt(2 / pi) (x + 0.044715 x^3), since 0.5 (1 + tanh(u)) = sigmoid(2 u).
_GELU_2C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh approximation (Flux, SD3, DiT), like ``F.gelu(x, approximate="tanh")`` to float32 rounding.

    At CPU float inference, eager or compiled, it is computed as x * sigmoid(2u) = x / (1 + exp(-2u)): torch's
    vectorised tanh is slow on x86 CPUs, eager and in Inductor's kernels alike, so its form takes two to four
    times as long there (docs/benchmarks.md, "Where the time goes"). Eager it runs in one fresh buffer; compiled,
    Inductor fuses the formula. Under autograd, lower precision (whose intermediate roundings would add error) or
    on a GPU (one fused kernel against several) it is torch's kernel.
    x: any shape, unchanged.
    """
    if cpu_float_inference(x):
        u = x * x
        u.mul_(0.044715 * _GELU_2C).add_(_GELU_2C).mul_(x)  # 2u
        return u.sigmoid_().mul_(x)
    if cpu_float_inference(x, compiled=True):  # not under autograd: exp overflows below x ~ -10 (NaN gradients)
        return x / (1 + torch.exp(-_GELU_2C * (x + 0.044715 * x * x * x)))
    return nn.functional.gelu(x, approximate="tanh")


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, used for the timestep, pooled-text and guidance embeddings."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = Linear(in_dim, hidden)
        self.out_layer = Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(nn.functional.silu(self.in_layer(x)))


class MLP(nn.Module):
    """The transformer feed-forward: Linear -> GELU(tanh) -> Linear. x: (B, N, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a projection to the token's output features.

    x: (B, N, D), vec: (B, D) or per token (``TokenVectors``) -> (B, N, out_dim). Zero-initialised so the model
    outputs 0 at init.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.mod = Modulation(dim, 2)
        self.linear = Linear(dim, out_dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.mod(vec)
        return self.linear(modulate(self.norm(x), shift, scale))
