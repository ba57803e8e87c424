"""Rectified flow: the training objective and its timestep distributions.

Convention used everywhere in omnidit: t = 1 is pure noise, t = 0 is data,
x_t = (1 - t) * x0 + t * eps, and the network predicts the velocity v = eps - x0 (so that
dx/dt = v and integrating from t = 1 down to t = 0 turns noise into data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from omnidit.condition import Condition
from omnidit.errors import OmniditError

VelocityModel = Callable[[Tensor, Tensor, Condition], Tensor]  # (x_t, t, cond) -> v


def uniform_timesteps(n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
    """t ~ U(0, 1): (n,)."""
    return torch.rand(n, generator=generator, device=device)


def logit_normal_timesteps(n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                           device: str | torch.device = "cpu") -> Tensor:
    """t = sigmoid(u), u ~ N(mean, std^2) (SD3's default for rectified flow): (n,)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Move time toward noise by ``shift`` = alpha: t' = alpha t / (1 + (alpha - 1) t) (SD3 eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int) -> float:
    """SD3's resolution-dependent shift alpha = sqrt(tokens / base_tokens)."""
    return math.sqrt(num_tokens / base_tokens)


def sample_timesteps(n: int, distribution: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                     shift: float = 1.0, generator: torch.Generator | None = None,
                     device: str | torch.device = "cpu") -> Tensor:
    """Training times: ``distribution`` in {"uniform", "logit_normal"}, then shifted. (n,)."""
    if distribution == "uniform":
        t = uniform_timesteps(n, generator, device)
    elif distribution == "logit_normal":
        t = logit_normal_timesteps(n, mean, std, generator, device)
    else:
        raise OmniditError(f"unknown timestep distribution '{distribution}'", hint="use 'uniform' or 'logit_normal'")
    return shift_timesteps(t, shift) if shift != 1.0 else t


def draw_given_tubelets(batch: int, count: int, p: float, generator: torch.Generator) -> Tensor:
    """(batch, count) bool: which of each clip's ``count`` tubelets are given as clean context.

    With probability ``p`` a clip gets one of three patterns, equally likely: the first tubelet
    (image-to-video), the first k, k uniform in 1..count // 2 (extension), or the first and the last
    (interpolation, only from three tubelets up; shorter clips get the first instead); otherwise none. So
    every clip keeps at least one tubelet to generate, and a single tubelet is never given.
    """
    u = torch.rand(batch, generator=generator)
    kind = torch.randint(0, 3, (batch,), generator=generator)
    if count < 3:
        kind = torch.where(kind == 2, torch.zeros_like(kind), kind)
    k = torch.randint(1, max(count // 2, 1) + 1, (batch,), generator=generator)
    index = torch.arange(count)[None]
    first_k = index < torch.where(kind == 1, k, torch.ones_like(k))[:, None]
    last = (kind == 2)[:, None] & (index == count - 1)
    return (first_k | last) & ((u < p) & (count > 1))[:, None]


def box_token_span(lo: Tensor, hi: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """The tokens [start, end) along one axis of ``grid`` tokens that a box from ``lo`` to ``hi`` (fractions, any
    shape) covers once grown by half a token on each side and rounded out to whole tokens (object regions)."""
    return ((lo * grid - 0.5).floor().clamp(0, grid - 1).long(), (hi * grid + 0.5).ceil().clamp(1, grid).long())


def draw_given_regions(batch: int, tubelets: int, grid_h: int, grid_w: int, p: float, generator: torch.Generator,
                       boxes: Tensor | None = None, box_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """(given, on_box): (batch, tubelets * grid_h * grid_w) bool, the tokens each sample is given as clean context
    (mask-aware training for inpainting and outpainting), and (batch,) bool, the samples whose generated region is
    their box.

    With probability ``p`` a sample gets a rectangle of tokens, 1 .. grid - 1 tokens on each side at a uniform
    place, over all its tubelets: three times in four everything but the rectangle is given (inpainting),
    otherwise the rectangle alone (outpainting); so a sample always keeps tokens to generate and tokens given.
    Otherwise nothing is given. A grid of one row or column gets no regions. ``boxes`` (batch, 4) (x0, y0, x1,
    y1) fractions, NaN where a sample has none: with probability ``box_p`` a sample's rectangle is instead its
    box, grown by half a token on each side and rounded out to whole tokens, and everything else is given (an
    object inpainted, as `omnidit inpaint` does with a mask around it).
    """
    u, outside = torch.rand(batch, generator=generator), torch.rand(batch, generator=generator) < 0.25
    use = torch.zeros(batch, dtype=torch.bool)
    starts, ends = [], []
    for grid in (grid_h, grid_w):
        size = torch.randint(1, max(grid - 1, 1) + 1, (batch,), generator=generator)
        start = (torch.rand(batch, generator=generator) * (grid - size + 1)).floor().long()
        starts.append(start)
        ends.append(start + size)
    if boxes is not None and box_p > 0:
        use = (torch.rand(batch, generator=generator) < box_p) & ~boxes.isnan().any(1)
        for axis, grid in ((1, grid_h), (0, grid_w)):  # rows from y, columns from x
            lo, hi = box_token_span(boxes[:, axis].nan_to_num(0), boxes[:, axis + 2].nan_to_num(1), grid)
            i = 1 - axis
            starts[i], ends[i] = torch.where(use, lo, starts[i]), torch.where(use, hi, ends[i])
        outside = outside & ~use
    index = [torch.arange(grid)[None] for grid in (grid_h, grid_w)]
    sides = [(ix >= s[:, None]) & (ix < e[:, None]) for ix, s, e in zip(index, starts, ends)]  # (B, grid) each
    inside = (sides[0][:, :, None] & sides[1][:, None, :]).flatten(1).repeat(1, tubelets)  # (B, N)
    given = torch.where(outside[:, None], inside, ~inside)
    drawn = (u < p) & (min(grid_h, grid_w) > 1)
    return given & drawn[:, None], use & drawn


def given_token_times(t: Tensor, given: Tensor) -> Tensor:
    """Per-token times (B, N): 0 on the ``given`` (B, N) tokens, ``t`` ((B,) or (B, N)) elsewhere."""
    t = t[:, None].expand(-1, given.shape[1]) if t.dim() == 1 else t
    return torch.where(given, torch.zeros((), dtype=t.dtype), t)


def token_times_with_context(t: Tensor, given: Tensor, num_tokens: int) -> Tensor:
    """Per-token times (B, N): 0 on the tokens of given tubelets (given: (B, T / pt) bool), t (B,) elsewhere."""
    per_tubelet = num_tokens // given.shape[1]
    mask = given.repeat_interleave(per_tubelet, dim=1)  # (B, N)
    return torch.where(mask, torch.zeros(()), t[:, None].expand(-1, num_tokens))


def stream_timesteps(t: Tensor, streams: Sequence[str], independent_p: float,
                     draw: Callable[[int], Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """Per-stream times {name: (B,)} for a sample of several generated streams (video and audio, say).

    Every stream takes the sample's ``t`` (B,), except that with probability ``independent_p`` a sample's
    streams each get their own draw from ``draw(n) -> (n,)`` (UniDiffuser's per-modality timesteps: the model
    then learns each stream's conditionals on the others at every noise level, not only the joint, which is
    what generating one stream from another given one needs). The first stream always keeps ``t``.
    """
    if not 0.0 <= independent_p <= 1.0:
        raise ValueError(f"independent_p must lie in [0, 1], got {independent_p}")
    batch = t.shape[0]
    own = torch.rand(batch, generator=generator) < independent_p  # (B,) samples whose streams differ
    times = {streams[0]: t}
    for name in streams[1:]:
        times[name] = torch.where(own.to(t.device), draw(batch).to(t), t)
    return times


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps; t: (B,) per sample or (B, N) per token, broadcast over the other dims of x0."""
    t = t.reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """d x_t / dt = eps - x0."""
    return noise - x0


def drop_condition(cond: Condition, null_cond: Condition, p: float, generator: torch.Generator | None = None
                   ) -> Condition:
    """Replace each row of ``cond`` by ``null_cond`` with probability ``p`` (for classifier-free guidance).

    null_cond: batch 1 (or B), e.g. the empty prompt's embedding or the null class label.
    """
    if p <= 0:
        return cond
    keep = condition_keep_mask(cond.batch_size, p, generator)
    return cond.where(keep.to(cond.device), null_cond.to(cond.device))


def condition_keep_mask(n: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """(n,) bool: True where a row keeps its condition (probability 1 - p)."""
    return torch.rand(n, generator=generator) >= p


def velocity_errors(model: VelocityModel, x0: Tensor | Mapping[str, Tensor], cond: Condition,
                    t: Tensor | Mapping[str, Tensor], noise: Tensor | Mapping[str, Tensor],
                    weights: Tensor | None = None, target: Tensor | None = None) -> Tensor:
    """(B,): each sample's mean squared error between the predicted velocity and the true one (or ``target``).

    x0: (B, ...) clean data (tokens or pixels); t: (B,) times, or (B, N) per token for tokens x0 (B, N, D);
    noise: like x0. A token at t = 0 is given as clean context: x_t is the data itself, its velocity
    cannot be known, and it is left out of the mean (the sample's mean runs over its other tokens).
    weights: None, or (B, ...) like x0 (one stream): each element's weight, the mean becoming a weighted mean.
    target: None, or (B, ...) like x0 (one stream): the velocity to regress on in place of eps - x0 (a frozen
    model's, train.prior_preservation).

    Several generated streams: x0, t and noise are mappings {name: ...} (the model takes and returns mappings);
    a sample's error is the mean over its streams of each stream's mean, streams it is wholly given left out,
    so a stream of few tokens (sound) weighs as much as one of many (video).
    """
    if not isinstance(x0, Mapping):
        v = model(interpolate(x0, noise, t), t, cond)
        return _stream_errors(v, velocity_target(x0, noise) if target is None else target, t, weights)[0]
    if weights is not None or target is not None:
        raise ValueError("loss weights and targets apply to one stream, not to a mapping of streams")
    v = model({n: interpolate(x0[n], noise[n], t[n]) for n in x0}, dict(t), cond)
    errors, generated = zip(*(_stream_errors(v[n], velocity_target(x0[n], noise[n]), t[n]) for n in x0))
    weights = torch.stack(generated).to(errors[0].dtype)  # (S, B): 1 where the sample generates the stream
    return (torch.stack(errors) * weights).sum(0) / weights.sum(0).clamp(min=1)


def _stream_errors(v: Tensor, target: Tensor, t: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """((B,) mean squared error of the velocity v against ``target`` (both like x0) over the generated tokens,
    weighted by ``weights`` (like x0) when given, (B,) bool: the sample has any)."""
    errors = (v.float() - target.float()).pow(2)
    has_any = (t > 0).any(1) if t.dim() == 2 else t.reshape(-1).expand(errors.shape[0]) > 0
    if weights is not None:
        w = weights.float().expand(errors.shape)
        if t.dim() == 2:  # given tokens weigh nothing
            w = w * (t > 0)[..., None]
        return (errors * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1e-12), has_any
    if t.dim() < 2:
        return errors.flatten(1).mean(1), has_any
    generated = (t > 0).to(errors.dtype)  # (B, N)
    per_token = errors.flatten(2).mean(2)  # (B, N)
    return (per_token * generated).sum(1) / generated.sum(1).clamp(min=1), has_any


def training_loss(model: VelocityModel, x0: Tensor, cond: Condition, t: Tensor, noise: Tensor,
                  weights: Tensor | None = None, target: Tensor | None = None) -> Tensor:
    """Mean squared error between the predicted and the true velocity, over the batch.

    x0: (B, ...) clean data (tokens or pixels); t: (B,) times, or (B, N) per token (given tokens at t = 0
    carry no loss, see ``velocity_errors``); noise: like x0; weights: None or like x0, each sample's mean then
    weighted (``object_loss_weights``); target: None (eps - x0) or like x0, the velocity to regress on. Randomness
    is drawn by the caller so that it can be seeded and resumed exactly.
    """
    return velocity_errors(model, x0, cond, t, noise, weights, target).mean()


def counterfactual_loss(model: VelocityModel, x0: Tensor | Mapping[str, Tensor], x0_cf: Tensor | Mapping[str, Tensor],
                        cond: Condition, cond_cf: Condition, t: Tensor,
                        noise: Tensor | Mapping[str, Tensor]) -> Tensor:
    """Mean squared error between the change of the predicted clean image when the caption changes and
    the change of the data: t [v(x_t, t, cond) - v(x_t, t, cond_cf)] vs x0_cf - x0.

    x0, x0_cf: (B, ...) an item and its counterfactual partner (the same item with one fact of its
    caption changed, e.g. the relation reversed); t: (B,) times near 1; noise: like x0. Several generated
    streams: x0, x0_cf and noise are mappings {name: (B, N_s, D_s)}, every stream at the sample's t, and the
    loss is the mean over the streams of each stream's error (as ``velocity_errors`` weighs them).
    The best velocity is (x_t - E[x0 | x_t, cond]) / t, so t times the change of the velocity is
    E[x0 | x_t, cond_cf] - E[x0 | x_t, cond]. Near t = 1 the flow target eps - x0 is nearly all noise, so
    the small part of it that depends on a fact like the relation's direction gives a weak gradient;
    in the difference the noise cancels. With x_t nearly independent of x0 (t -> 1), x0_cf - x0
    estimates that change without bias when the partner is distributed like the data under cond_cf.
    At smaller t, x_t already shows x0 and the estimate exaggerates the change: use it near t = 1 only.
    """
    both = Condition.cat([cond, cond_cf])  # one forward over both captions (one pass per backward: DDP, FSDP)
    if not isinstance(x0, Mapping):
        x_t = interpolate(x0, noise, t)
        return _change_error(model(torch.cat([x_t, x_t]), torch.cat([t, t]), both), x0, x0_cf, t)
    x_t = {n: interpolate(x0[n], noise[n], t) for n in x0}
    tt = torch.cat([t, t])  # one tensor for every stream: the model then computes its time embedding once
    v = model({n: torch.cat([x, x]) for n, x in x_t.items()}, {n: tt for n in x0}, both)
    return torch.stack([_change_error(v[n], x0[n], x0_cf[n], t) for n in x0]).mean()


def _change_error(v: Tensor, x0: Tensor, x0_cf: Tensor, t: Tensor) -> Tensor:
    """v: (2B, ...) the velocities under both captions, stacked -> the mean squared error of t (v - v_cf)
    against x0_cf - x0."""
    v, v_cf = v.float().chunk(2)
    change = (v - v_cf) * t.float().view(-1, *([1] * (v.dim() - 1)))
    return (change - (x0_cf - x0).float()).pow(2).mean()
