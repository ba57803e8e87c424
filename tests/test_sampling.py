"""Samplers: convergence order on an exact flow, CFG algebra, schedules, seeded noise."""

from __future__ import annotations

import math

import pytest
import torch

from omnidit.condition import Condition
from omnidit.errors import OmniditError
from omnidit.sampling import (
    check_cfg_interval,
    check_skip_blocks,
    classifier_free_guidance,
    euler,
    heun,
    initial_noise,
    sample,
    timestep_schedule,
)

MU, S0 = 1.5, 0.5  # data ~ N(MU, S0^2); noise ~ N(0, 1); independent coupling


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact marginal velocity of the straight-line flow between N(MU, S0^2) and N(0, 1).

    x_t ~ N(m_t, s_t^2) with m_t = (1 - t) MU, s_t^2 = (1 - t)^2 S0^2 + t^2; the flow keeps the
    standardised coordinate fixed, so v = m_t' + (x - m_t) s_t' / s_t.
    """
    t = t.double()
    m, var = (1 - t) * MU, (1 - t) ** 2 * S0**2 + t**2
    dm, dvar = -MU, -2 * (1 - t) * S0**2 + 2 * t
    return dm + (x - m) * dvar / (2 * var)


def solve_error(solver, steps: int) -> float:
    x1 = torch.linspace(-2, 2, 9, dtype=torch.float64)
    x0 = solver(gaussian_velocity, x1.clone(), torch.linspace(1, 0, steps + 1, dtype=torch.float64))
    exact = MU + S0 * x1  # the flow map sends standardised noise to standardised data
    return (x0 - exact).abs().max().item()


def test_euler_first_order_and_heun_second_order():
    e = [solve_error(euler, n) for n in (16, 32, 64)]
    h = [solve_error(heun, n) for n in (16, 32, 64)]
    for a, b in zip(e, e[1:]):
        assert 1.8 < a / b < 2.2, e  # error halves when the step halves
    for a, b in zip(h, h[1:]):
        assert 3.6 < a / b < 4.4, h  # error quarters
    assert h[-1] < e[-1] / 100


class RecordingModel:
    """A fake velocity model that records the times it was called with."""

    def __init__(self):
        self.times = []

    def __call__(self, x, t):
        self.times.append(float(t))
        return torch.ones_like(x)


def test_samplers_call_the_model_on_the_schedule():
    ts = timestep_schedule(4)
    m = RecordingModel()
    out = euler(m, torch.zeros(2), ts)
    assert m.times == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert torch.allclose(out, torch.full((2,), -1.0))  # integral of v = 1 from 1 down to 0
    m = RecordingModel()
    heun(m, torch.zeros(2), ts)
    assert len(m.times) == 8 and m.times[:2] == pytest.approx([1.0, 0.75])


def test_timestep_schedule_endpoints_monotone_and_shift():
    for shift in (1.0, 3.0):
        ts = timestep_schedule(10, shift)
        assert ts[0] == 1.0 and ts[-1] == 0.0 and torch.all(ts[1:] < ts[:-1])
    assert timestep_schedule(2, 3.0)[1].item() == pytest.approx(0.75)
    with pytest.raises(OmniditError):
        timestep_schedule(0)
    with pytest.raises(OmniditError, match="unknown sampler"):
        sample(lambda x, t: x, torch.zeros(1), 2, sampler="ddim")


def _toy_model(x, t, cond):
    # depends on every channel and on the condition, so guidance is visible everywhere
    return x * cond.pooled[:, :1, None] + cond.labels[:, None, None].float() + t


def test_cfg_scale_one_equals_conditional_and_guides_all_channels():
    g = torch.Generator().manual_seed(0)
    cond = Condition(pooled=torch.randn(3, 4, generator=g), labels=torch.tensor([1, 2, 3]))
    null = Condition(pooled=torch.randn(1, 4, generator=g), labels=torch.tensor([9]))
    x, t = torch.randn(3, 5, 6, generator=g), torch.tensor(0.3)
    v_c = _toy_model(x, t, cond)
    v_u = _toy_model(x, t, null.repeat(3))
    torch.testing.assert_close(classifier_free_guidance(_toy_model, cond, null, 1.0)(x, t), v_c)
    torch.testing.assert_close(classifier_free_guidance(_toy_model, cond, null, 0.0)(x, t), v_u)
    guided = classifier_free_guidance(_toy_model, cond, null, 4.0)(x, t)
    torch.testing.assert_close(guided, v_u + 4.0 * (v_c - v_u))
    assert torch.all((guided - v_c).abs().amax(dim=(0, 1)) > 0)  # every channel is guided


def _guidance_inputs(seed: int) -> tuple[Condition, Condition, torch.Tensor]:
    """(cond with batch 3, a batch-1 null condition, x: (3, 5, 6)) for the toy model."""
    g = torch.Generator().manual_seed(seed)
    cond = Condition(pooled=torch.randn(3, 4, generator=g), labels=torch.tensor([1, 2, 3]))
    null = Condition(pooled=torch.randn(1, 4, generator=g), labels=torch.tensor([9]))
    return cond, null, torch.randn(3, 5, 6, generator=g)


def test_cfg_interval_guides_inside_and_runs_the_conditional_branch_alone_outside():
    cond, null, x = _guidance_inputs(0)
    batches = []

    def counting_model(x, t, c):
        batches.append(x.shape[0])
        return _toy_model(x, t, c)

    guided = classifier_free_guidance(counting_model, cond, null, 4.0, interval=(0.2, 0.7))
    for t, inside in ((0.9, False), (0.7, True), (0.45, True), (0.2, True), (0.1, False)):
        t = torch.tensor(t)
        v_c, v_u = _toy_model(x, t, cond), _toy_model(x, t, null.repeat(3))
        batches.clear()
        out = guided(x, t)
        torch.testing.assert_close(out, v_u + 4.0 * (v_c - v_u) if inside else v_c)
        assert batches == ([6] if inside else [3])  # outside the interval: one call at batch B, not 2B


def test_skip_layer_guidance_adds_the_push_away_from_the_weaker_model_inside_the_interval():
    cond, null, x = _guidance_inputs(1)
    calls = []

    def weak_model(x, t, c):  # a different velocity field, standing in for the model without some blocks
        calls.append(x.shape[0])
        return 0.5 * _toy_model(x, t, c) + 0.1

    guided = classifier_free_guidance(_toy_model, cond, null, 4.0, interval=(0.2, 0.7), skip_fn=weak_model,
                                      skip_scale=1.5)
    for t, inside in ((0.9, False), (0.45, True), (0.1, False)):
        t = torch.tensor(t)
        v_c, v_u, v_s = _toy_model(x, t, cond), _toy_model(x, t, null.repeat(3)), weak_model(x, t, cond)
        calls.clear()
        want = v_u + 4.0 * (v_c - v_u) + 1.5 * (v_c - v_s) if inside else v_c
        torch.testing.assert_close(guided(x, t), want)
        assert calls == ([3] if inside else [])  # one more call at batch B, only where guidance runs
    # a skip interval limits the extra push (and call) to its times, inside the guidance interval
    late = classifier_free_guidance(_toy_model, cond, null, 4.0, skip_fn=weak_model, skip_scale=1.5,
                                    skip_interval=(0.5, 1.0))
    for t, skipping in ((0.9, True), (0.3, False)):
        t = torch.tensor(t)
        v_c, v_u, v_s = _toy_model(x, t, cond), _toy_model(x, t, null.repeat(3)), weak_model(x, t, cond)
        calls.clear()
        torch.testing.assert_close(late(x, t), v_u + 4.0 * (v_c - v_u) + (1.5 * (v_c - v_s) if skipping else 0))
        assert calls == ([3] if skipping else [])
    # scale 0 never calls the weaker model; a scale without one is a programming error
    plain = classifier_free_guidance(_toy_model, cond, null, 4.0, skip_fn=weak_model, skip_scale=0.0)
    calls.clear()
    plain(x, torch.tensor(0.5))
    assert calls == []
    with pytest.raises(ValueError, match="skip_fn"):
        classifier_free_guidance(_toy_model, cond, null, 4.0, skip_scale=1.0)


def test_combine_replaces_the_guidance_rule_only_at_the_guided_steps():
    cond, null, x = _guidance_inputs(2)
    seen = []

    def rule(x, t, v_cond, v_uncond, scale):  # any other rule, e.g. guidance rescale
        seen.append(float(t))
        return v_cond - scale * v_uncond

    def weak_model(x, t, c):
        return 0.5 * _toy_model(x, t, c)

    guided = classifier_free_guidance(_toy_model, cond, null, 4.0, interval=(0.2, 0.7), skip_fn=weak_model,
                                      skip_scale=1.0, combine=rule)
    for t, inside in ((0.9, False), (0.45, True)):
        t = torch.tensor(t)
        v_c, v_u, v_s = _toy_model(x, t, cond), _toy_model(x, t, null.repeat(3)), weak_model(x, t, cond)
        want = v_c - 4.0 * v_u + (v_c - v_s) if inside else v_c  # skip-layer guidance still added on top
        torch.testing.assert_close(guided(x, t), want)
    assert seen == [pytest.approx(0.45)]  # outside the guidance interval the rule is not asked


def test_uncond_fn_draws_the_unconditional_velocity_from_another_model():
    cond, null, x = _guidance_inputs(3)
    calls = []

    def base_model(x, t, c):  # another velocity field, standing in for a LoRA run's base (sample.uncond_base)
        calls.append(x.shape[0])
        return 0.3 * _toy_model(x, t, c) - 0.2

    guided = classifier_free_guidance(_toy_model, cond, null, 4.0, interval=(0.2, 0.7), uncond_fn=base_model)
    for t, inside in ((0.9, False), (0.45, True)):
        t = torch.tensor(t)
        v_c, v_b = _toy_model(x, t, cond), base_model(x, t, null.repeat(3))
        calls.clear()
        torch.testing.assert_close(guided(x, t), v_b + 4.0 * (v_c - v_b) if inside else v_c)
        assert calls == ([3] if inside else [])  # the base runs on the null rows alone, where guidance runs


@pytest.mark.parametrize("scale, blocks, depth_single, message", [
    (-1.0, [0], 2, "must be >= 0"), (1.0, [], 2, "needs single-stream blocks"),
    (1.0, [2], 2, r"blocks 0 to 1\), got \[2\]"), (1.0, [0], 0, "no single-stream blocks")])
def test_check_skip_blocks_names_the_problem(scale, blocks, depth_single, message):
    with pytest.raises(OmniditError, match=message):
        check_skip_blocks(scale, blocks, depth_single)
    assert check_skip_blocks(0.0, [], 0) == [] and check_skip_blocks(1.0, (1.0, 0), 2) == [1, 0]


@pytest.mark.parametrize("interval", [(0.5, 0.5), (0.8, 0.2), (-0.1, 1.0), (0.0, 1.5), (0.3,), "ab"])
def test_cfg_interval_rejects_bad_bounds_with_a_hint(interval):
    with pytest.raises(OmniditError, match="guidance interval") as e:
        check_cfg_interval(interval)
    assert e.value.hint


def test_initial_noise_is_seeded_and_standard():
    a, b = initial_noise((2, 3, 8, 8), 5), initial_noise((2, 3, 8, 8), 5)
    assert torch.equal(a, b) and not torch.equal(a, initial_noise((2, 3, 8, 8), 6))
    big = initial_noise((100_000,), 0)
    assert abs(big.mean()) < 0.02 and math.isclose(big.std().item(), 1.0, abs_tol=0.02)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_on_step_runs_after_every_step_and_can_stop_sampling(sampler):
    from omnidit.sampling import sample

    calls: list[tuple[int, int]] = []
    x = sample(lambda x, t: -x, torch.ones(1, 4), 5, sampler, on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 5) for k in range(1, 6)] and torch.isfinite(x).all()

    class Stop(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise Stop

    evaluations = []
    with pytest.raises(Stop):
        sample(lambda x, t: evaluations.append(t) or -x, torch.ones(1, 4), 5, sampler, on_step=stop_after_two)
    assert len(evaluations) == 2 * (2 if sampler == "heun" else 1)  # no model call after the stop
