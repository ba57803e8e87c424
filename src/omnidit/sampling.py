"""Samplers: pure functions that integrate a velocity field from t = 1 (noise) to t = 0 (data).

A sampler takes ``velocity_fn(x, t) -> v`` with t a 0-d tensor, the starting noise and a
decreasing time grid. Classifier-free guidance is a wrapper that returns a new velocity_fn;
there are no stateful scheduler objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from omnidit.condition import Condition
from omnidit.errors import OmniditError
from omnidit.flow import shift_timesteps

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x: (B, ...), t: 0-d tensor) -> v like x


def token_times(t: Tensor, given: Tensor | None) -> Tensor:
    """The model's times when some tokens are given: 0 where ``given`` (B or 1, N) is True, t elsewhere.

    t: 0-d (the sampler's current time). Returns t itself when nothing is given (the uniform path), else
    (B or 1, N) float32.
    """
    if given is None:
        return t
    return torch.where(given, torch.zeros((), dtype=t.dtype, device=t.device), t).float()


def keep_given(velocity_fn: VelocityFn, given: Tensor) -> VelocityFn:
    """A velocity_fn that is exactly 0 on the given tokens (``given``: (B or 1, N) bool), so that every
    sampler (each step adds dt * v) leaves them bit for bit as they were: image-to-video, extension,
    interpolation and inpainting are the starting tokens of the given positions set to the clean data."""
    mask = given[..., None]  # (B or 1, N, 1)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return velocity_fn(x, t).masked_fill(mask, 0.0)

    return fn


def follow_noised_path(velocity_fn: VelocityFn, given: Tensor, path_velocity: Tensor) -> VelocityFn:
    """A velocity_fn that moves the given tokens (``given``: (B or 1, N) bool) along their exact straight path
    from their noise to their clean value (``path_velocity`` = noise - clean, like x), so that the model always
    sees them noised to the current t like everything else: inpainting for a model never trained with clean
    context tokens (the "blend" of SDEdit / diffusers' inpaint pipelines, done exactly: a step of any sampler
    along a constant velocity lands on the path)."""
    mask = given[..., None]  # (B or 1, N, 1)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return torch.where(mask, path_velocity, velocity_fn(x, t))

    return fn


def timestep_schedule(steps: int, shift: float = 1.0, device: str | torch.device = "cpu") -> Tensor:
    """Times 1 -> 0 in ``steps`` uniform steps, then shifted toward noise: (steps + 1,) float32."""
    if steps < 1:
        raise OmniditError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise OmniditError(f"shift must be positive, got {shift}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float().to(device)


# Called after each sampler step with (steps done, steps in all): a server's progress events, or a way to stop
# work nobody waits for any more (raise from it).
StepCallback = Callable[[int, int], None]


def _steps(ts: Tensor, progress: bool, desc: str, on_step: StepCallback | None = None):
    total = len(ts) - 1
    for i in tqdm(range(total), desc=desc, disable=not progress, leave=False, unit="step"):
        yield i
        if on_step is not None:  # the loop body of step i has run
            on_step(i + 1, total)


def euler(velocity_fn: VelocityFn, x: Tensor, ts: Tensor, progress: bool = False,
          on_step: StepCallback | None = None) -> Tensor:
    """First-order: x <- x + (t_next - t) v(x, t)."""
    for i in _steps(ts, progress, "euler", on_step):
        x = x + (ts[i + 1] - ts[i]) * velocity_fn(x, ts[i])
    return x


def heun(velocity_fn: VelocityFn, x: Tensor, ts: Tensor, progress: bool = False,
         on_step: StepCallback | None = None) -> Tensor:
    """Second-order (trapezoidal predictor-corrector): two velocity evaluations per step."""
    for i in _steps(ts, progress, "heun", on_step):
        dt = ts[i + 1] - ts[i]
        v = velocity_fn(x, ts[i])
        x_pred = x + dt * v
        x = x + dt * 0.5 * (v + velocity_fn(x_pred, ts[i + 1]))
    return x


def midpoint(velocity_fn: VelocityFn, x: Tensor, ts: Tensor, progress: bool = False,
             on_step: StepCallback | None = None) -> Tensor:
    """Second-order (explicit midpoint): two velocity evaluations per step. RF-Solver's update (Wang et al. 2024,
    "Taming Rectified Flow for Inversion and Editing", eq. 9: x + dt v + dt^2 / 2 * dv/dt, with dv/dt taken
    as (v(mid) - v) / (dt / 2)) is exactly this; run with increasing ts it inverts an image to noise."""
    for i in _steps(ts, progress, "midpoint", on_step):
        dt = ts[i + 1] - ts[i]
        v = velocity_fn(x, ts[i])
        x = x + dt * velocity_fn(x + 0.5 * dt * v, ts[i] + 0.5 * dt)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": euler, "heun": heun, "midpoint": midpoint}


def check_cfg_interval(interval: Sequence[float]) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo < hi <= 1, or an error that names the fix."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise OmniditError(f"the guidance interval must be two times LO HI, got {interval!r}",
                           hint="e.g. 0.0 1.0 (guide at every step) or 0.0 0.7 (no guidance near pure noise)") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise OmniditError(f"the guidance interval must satisfy 0 <= LO < HI <= 1, got {lo} {hi}",
                           hint="times run from 1 (noise) to 0 (data); 0.0 1.0 guides at every step")
    return lo, hi


def check_skip_blocks(scale: float, blocks: Sequence[int], depth_single: int) -> list[int]:
    """The single-stream blocks skip-layer guidance leaves out, as ints, or an error that names the problem:
    a negative scale, a scale with no blocks, or a block the model (``depth_single`` blocks) lacks."""
    blocks = [int(i) for i in blocks]
    if scale < 0:
        raise OmniditError(f"the skip-layer guidance scale must be >= 0, got {scale}")
    if scale and not blocks:
        raise OmniditError(f"skip-layer guidance at scale {scale} needs single-stream blocks to leave out")
    if any(not 0 <= i < depth_single for i in blocks):
        have = f"single-stream blocks 0 to {depth_single - 1}" if depth_single else "no single-stream blocks"
        raise OmniditError(f"skip-layer guidance can only leave out blocks the model has ({have}), got {blocks}")
    return blocks


def classifier_free_guidance(model_fn: Callable[[Tensor, Tensor, Condition], Tensor], cond: Condition,
                             null_cond: Condition, scale: float, interval: Sequence[float] = (0.0, 1.0),
                             skip_fn: Callable[[Tensor, Tensor, Condition], Tensor] | None = None,
                             skip_scale: float = 0.0, skip_interval: Sequence[float] = (0.0, 1.0),
                             combine: Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor] | None = None,
                             uncond_fn: Callable[[Tensor, Tensor, Condition], Tensor] | None = None,
                             ) -> VelocityFn:
    """v = v_uncond + scale * (v_cond - v_uncond), over all channels, in one batched call.

    model_fn(x, t, cond) -> v; cond has batch B, null_cond batch B or 1. ``interval`` (lo, hi): guide only
    at times lo <= t <= hi and use v_cond alone elsewhere, which costs one model call instead of two
    (guidance in a limited interval, Kynkäänniemi et al. 2024).

    Skip-layer guidance (``skip_scale`` > 0; SD3.5's SLG, after Hyung et al. 2024's spatiotemporal skip
    guidance): ``skip_fn(x, t, cond)`` is the same model with some blocks left out, a weaker model whose
    errors the guided velocity moves away from: v += skip_scale * (v_cond - v_skip) at the guided steps with
    skip_lo <= t <= skip_hi (``skip_interval``), at one more model call per step.

    ``combine(x, t, v_cond, v_uncond, scale) -> v`` replaces the guidance rule itself (default: the formula
    above), for trying other rules such as guidance rescale (scripts/guidance_variants.py).

    ``uncond_fn(x, t, null_cond) -> v`` computes the unconditional velocity with another model than model_fn (a LoRA
    run's base, ``sample.uncond_base``); the two branches are then two calls instead of one batched call.
    """
    if skip_scale and skip_fn is None:
        raise ValueError("skip-layer guidance needs skip_fn")
    skip_lo, skip_hi = check_cfg_interval(skip_interval)
    skip_limited = bool(skip_scale) and (skip_lo, skip_hi) != (0.0, 1.0)
    lo, hi = check_cfg_interval(interval)
    batch = cond.batch_size
    if null_cond.batch_size != batch:
        null_cond = null_cond.repeat(batch)
    both = Condition.cat([cond, null_cond]).without_full_mask()
    cond_only, null_only = cond.without_full_mask(), null_cond.without_full_mask()
    every_step = (lo, hi) == (0.0, 1.0)
    reads_t = not every_step or skip_limited  # only a limited interval reads t on the host (a device sync)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        now = float(t) if reads_t else None  # at most one read per step, shared by both intervals
        if not every_step and not lo <= now <= hi:
            return model_fn(x, t, cond_only)
        if uncond_fn is None:
            v_cond, v_uncond = model_fn(torch.cat([x, x]), t, both).chunk(2)
        else:
            v_cond, v_uncond = model_fn(x, t, cond_only), uncond_fn(x, t, null_only)
        v = v_uncond + scale * (v_cond - v_uncond) if combine is None else combine(x, t, v_cond, v_uncond, scale)
        if not skip_scale or skip_limited and not skip_lo <= now <= skip_hi:
            return v
        return v + skip_scale * (v_cond - skip_fn(x, t, cond_only))

    return guided


def initial_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    """Standard normal noise from a seeded CPU generator, so a seed gives the same image on any device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def sample(velocity_fn: VelocityFn, noise: Tensor, steps: int, sampler: str = "euler", shift: float = 1.0,
           progress: bool = False, given: Tensor | None = None, given_tokens: Tensor | None = None,
           on_step: StepCallback | None = None, given_noised: bool = False) -> Tensor:
    """Integrate from ``noise`` (t = 1) to data (t = 0) with the named sampler.

    ``given`` (B or 1, N) bool and ``given_tokens`` (like noise): tokens known as clean context start as
    ``given_tokens`` and stay exactly so (``keep_given``); velocity_fn should show them to the model at t = 0
    (``token_times``). With ``given_noised`` they instead travel their straight path from their noise to
    ``given_tokens`` (``follow_noised_path``; the model sees one t for all tokens) and end exactly as given.
    noise: (B, N, D) tokens when something is given. ``on_step(done, total)`` runs after each step.
    """
    if sampler not in SAMPLERS:
        raise OmniditError(f"unknown sampler '{sampler}'", hint=f"choose one of {', '.join(SAMPLERS)}")
    ts = timestep_schedule(steps, shift, device=noise.device)
    if given is not None and given_noised:
        clean = given_tokens.to(noise.dtype)
        x = SAMPLERS[sampler](follow_noised_path(velocity_fn, given, noise - clean), noise, ts, progress=progress,
                              on_step=on_step)
        return torch.where(given[..., None], clean, x)  # the path ends there up to rounding: make it exact
    if given is not None:
        noise = torch.where(given[..., None], given_tokens.to(noise.dtype), noise)
        velocity_fn = keep_given(velocity_fn, given)
    return SAMPLERS[sampler](velocity_fn, noise, ts, progress=progress, on_step=on_step)
