"""Best-of-N sampling with the model as its own verifier: inference-time scaling without a reward model.

Each prompt is sampled from N noise seeds and every candidate image x0 is scored by its flow-matching loss
under its own prompt,

    score(x0, c) = mean_k || v(x_k, t_k, c) - (eps_k - x0) ||^2,    x_k = (1 - t_k) x0 + t_k eps_k,

at fixed times t_k with fixed noise eps_k (the same for every candidate, so scores compare images, not noise
draws). This is, up to the weighting of the times, the denoising bound on -log p(x0 | c) that diffusion
classifiers use (Li et al. 2023, "Your diffusion model is secretly a zero-shot classifier"); here it ranks
images for one prompt instead of prompts for one image. The lowest score wins. Nothing outside the model
judges the images, so the shapes suite's detector stays an independent measure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from omnidit.condition import Condition
from omnidit.flow import velocity_errors

SCORE_TIMES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SCORE_NOISE_SEED = 0  # the noise eps_k comes from this seed, whatever the batch or the sampling seed
# Candidate j of an image with noise seed s starts from seed (s + j * CANDIDATE_SEED_STEP) mod 2^32. PyTorch's
# CPU generator keeps only the low 32 bits of a seed, so the seeds must differ there; the step is odd, so the
# first 2^32 candidates of an image all get different seeds.
CANDIDATE_SEED_STEP = 0x9E3779B1


def candidate_seeds(seed: int, n: int) -> list[int]:
    """The noise seeds of ``n`` candidates for an image with ``seed``; the first is ``seed`` itself, so one
    candidate samples exactly what plain sampling does."""
    return [seed if j == 0 else (seed + j * CANDIDATE_SEED_STEP) % 2**32 for j in range(n)]


def denoising_scores(model_fn: Callable[[Tensor, Tensor, Condition], Tensor], x0: Tensor, cond: Condition,
                     times: Sequence[float] = SCORE_TIMES) -> Tensor:
    """(B,) the mean velocity error of each sample under its condition (lower = more likely under it).

    model_fn(x, t, cond) -> v with t of shape (B,); x0: (B, ...) clean samples (tokens); cond: batch B.
    One model call per time.
    """
    gen = torch.Generator("cpu").manual_seed(SCORE_NOISE_SEED)
    noise = torch.randn((len(times), *x0.shape[1:]), generator=gen).to(x0.device, x0.dtype)
    total = torch.zeros(len(x0), device=x0.device)
    for t, eps in zip(times, noise):
        total += velocity_errors(model_fn, x0, cond, torch.full((len(x0),), t, device=x0.device),
                                 eps.expand_as(x0))
    return total / len(times)


def best_candidates(candidates: Tensor, scores: Tensor, n: int) -> Tensor:
    """The lowest-scoring of ``n`` candidates per item.

    candidates: (n * B, ...) candidate-major (rows j * B .. j * B + B - 1 are candidate j of items 0..B-1);
    scores: (n * B,). Returns (B, ...).
    """
    batch = len(candidates) // n
    best = scores.view(n, batch).argmin(0)  # (B,)
    return candidates.view(n, batch, *candidates.shape[1:])[best, torch.arange(batch, device=best.device)]
