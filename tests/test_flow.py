"""Rectified-flow objective: interpolation, target, timestep samplers, shift, condition dropout."""

from __future__ import annotations

import math

import pytest
import torch

from omnidit.condition import Condition
from omnidit.errors import OmniditError
from omnidit.flow import (
    counterfactual_loss,
    drop_condition,
    interpolate,
    logit_normal_timesteps,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
    training_loss,
    uniform_timesteps,
    velocity_errors,
    velocity_target,
)


def test_interpolation_and_target_known_answer():
    x0, eps = torch.full((2, 3), 2.0), torch.full((2, 3), 5.0)
    t = torch.tensor([0.25, 1.0])
    xt = interpolate(x0, eps, t)
    assert torch.allclose(xt[0], torch.full((3,), 2.75)) and torch.allclose(xt[1], eps[1])
    assert torch.allclose(interpolate(x0, eps, torch.zeros(2)), x0)  # t = 0 is data
    assert torch.allclose(velocity_target(x0, eps), torch.full((2, 3), 3.0))
    # the target is the time derivative of x_t (finite difference)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    t, h = torch.full((4,), 0.3), 1e-3
    fd = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x0, eps), atol=1e-4)


def test_training_loss_is_zero_for_the_oracle_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 5, generator=g), torch.randn(6, 4, 5, generator=g)
    t = torch.rand(6, generator=g) * 0.9 + 0.05

    def oracle(xt, tt, cond):  # knows x0: v = (x_t - x0) / t
        return (xt - x0) / tt.view(-1, 1, 1)

    assert training_loss(oracle, x0, Condition(), t, eps) < 1e-10
    zero = training_loss(lambda xt, tt, c: torch.zeros_like(xt), x0, Condition(), t, eps)
    assert torch.isclose(zero, (eps - x0).pow(2).mean())
    # per sample: the same errors, one per row, that the loss averages
    per_sample = velocity_errors(lambda xt, tt, c: torch.zeros_like(xt), x0, Condition(), t, eps)
    assert per_sample.shape == (6,) and torch.allclose(per_sample, (eps - x0).pow(2).mean((1, 2)))
    assert torch.isclose(per_sample.mean(), zero)


def test_weighted_errors_are_each_samples_weighted_mean_and_given_tokens_weigh_nothing():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    t = torch.rand(3, generator=g) * 0.9 + 0.05

    def zero(xt, tt, c):  # the errors are then (eps - x0)^2
        return torch.zeros_like(xt)

    errors = (eps - x0).pow(2)
    weights = torch.rand(3, 4, 6, generator=g) + 0.5
    expected = (errors * weights).sum((1, 2)) / weights.sum((1, 2))
    torch.testing.assert_close(velocity_errors(zero, x0, Condition(), t, eps, weights), expected)
    torch.testing.assert_close(velocity_errors(zero, x0, Condition(), t, eps, torch.full_like(x0, 2.0)),
                               velocity_errors(zero, x0, Condition(), t, eps))  # uniform weights: the plain mean
    # Per-token times: tokens at t = 0 are left out whatever their weight.
    tt = t[:, None].repeat(1, 4)
    tt[:, :2] = 0
    expected = (errors * weights)[:, 2:].sum((1, 2)) / weights[:, 2:].sum((1, 2))
    torch.testing.assert_close(velocity_errors(zero, x0, Condition(), tt, eps, weights), expected)
    assert velocity_errors(zero, x0, Condition(), t, eps, weights).sub(
        velocity_errors(zero, x0, Condition(), t, eps)).abs().max() > 1e-3  # the weights do change the errors
    with pytest.raises(ValueError, match="one stream"):
        velocity_errors(lambda x, tt_, c: x, {"img": x0}, Condition(), {"img": t}, {"img": eps}, weights)


def test_an_explicit_target_replaces_the_flow_target_and_keeps_weights_and_given_tokens():
    g = torch.Generator().manual_seed(4)
    x0, eps, target = (torch.randn(3, 4, 6, generator=g) for _ in range(3))
    t = torch.rand(3, generator=g) * 0.9 + 0.05

    def zero(xt, tt, c):  # the errors are then target^2
        return torch.zeros_like(xt)

    torch.testing.assert_close(velocity_errors(zero, x0, Condition(), t, eps, target=target),
                               target.pow(2).mean((1, 2)))
    assert velocity_errors(lambda xt, tt, c: target, x0, Condition(), t, eps, target=target).abs().max() == 0
    weights = torch.rand(3, 4, 6, generator=g) + 0.5
    tt = t[:, None].repeat(1, 4)
    tt[:, :2] = 0  # given tokens still weigh nothing
    expected = (target.pow(2) * weights)[:, 2:].sum((1, 2)) / weights[:, 2:].sum((1, 2))
    torch.testing.assert_close(velocity_errors(zero, x0, Condition(), tt, eps, weights, target), expected)
    with pytest.raises(ValueError, match="one stream"):
        velocity_errors(zero, {"img": x0}, Condition(), {"img": t}, {"img": eps}, target=target)


def test_counterfactual_loss_against_closed_forms():
    g = torch.Generator().manual_seed(0)
    x0, x0_cf, eps = (torch.randn(3, 4, 5, generator=g) for _ in range(3))
    cond, cond_cf = Condition(pooled=x0.flatten(1)), Condition(pooled=x0_cf.flatten(1))

    def reads_x0(xt, tt, c):  # the velocity that turns x_t into the x0 held in the condition
        return (xt - c.pooled.view_as(xt)) / tt.view(-1, 1, 1)

    # Its change between the captions, times t, is exactly x0_cf - x0 at any t: no loss.
    for t in (torch.ones(3), torch.tensor([0.5, 0.8, 0.95])):
        assert counterfactual_loss(reads_x0, x0, x0_cf, cond, cond_cf, t, eps) < 1e-10
    # Captions swapped: the change is reversed, so the error is twice the data change.
    swapped = counterfactual_loss(reads_x0, x0, x0_cf, cond_cf, cond, torch.full((3,), 0.7), eps)
    assert torch.isclose(swapped, (2 * (x0_cf - x0)).pow(2).mean(), rtol=1e-5)
    # A model that ignores the caption is charged the squared data change, whatever it predicts.
    blind = counterfactual_loss(lambda xt, tt, c: xt * 3 + 1, x0, x0_cf, cond, cond_cf, torch.ones(3), eps)
    assert torch.isclose(blind, (x0_cf - x0).pow(2).mean())
    # Velocity = the condition's x0 at t = 0.5: t (v - v_cf) = 0.5 (x0 - x0_cf), off by 1.5 (x0_cf - x0).
    wrong_way = counterfactual_loss(lambda xt, tt, c: c.pooled.view_as(xt), x0, x0_cf, cond, cond_cf,
                                    torch.full((3,), 0.5), eps)
    assert torch.isclose(wrong_way, (1.5 * (x0_cf - x0)).pow(2).mean(), rtol=1e-5)


def test_logit_normal_moments():
    g = torch.Generator().manual_seed(0)
    for mean, std in [(0.0, 1.0), (0.5, 0.7), (-1.0, 1.5)]:
        t = logit_normal_timesteps(200_000, mean, std, generator=g)
        assert 0 < t.min() and t.max() < 1
        logit = torch.log(t / (1 - t))
        assert abs(logit.mean().item() - mean) < 0.01
        assert abs(logit.std().item() - std) < 0.01
    t = logit_normal_timesteps(200_000, generator=g)
    assert abs(t.mean().item() - 0.5) < 0.003  # symmetric around 1/2 for mean 0
    u = uniform_timesteps(200_000, generator=g)
    assert abs(u.mean().item() - 0.5) < 0.003 and abs(u.var().item() - 1 / 12) < 0.001


def test_shift_formula_against_hand_computed_values():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    # alpha = 3: t' = 3t / (1 + 2t)
    expected = torch.tensor([0.0, 0.75 / 1.5, 1.5 / 2.0, 2.25 / 2.5, 1.0], dtype=torch.float64)
    assert torch.allclose(shift_timesteps(t, 3.0), expected)
    assert torch.allclose(shift_timesteps(t, 1.0), t)
    assert torch.all(shift_timesteps(t, 0.5) <= t)  # alpha < 1 moves toward data
    assert resolution_shift(4096, 1024) == 2.0
    assert math.isclose(resolution_shift(64 * 64, 32 * 32), 2.0)
    # shifting the samples equals sampling then shifting
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = sample_timesteps(100, "logit_normal", shift=3.0, generator=g1)
    b = shift_timesteps(logit_normal_timesteps(100, generator=g2), 3.0)
    assert torch.allclose(a, b)
    with pytest.raises(OmniditError, match="unknown timestep distribution"):
        sample_timesteps(4, "cosine")


def test_condition_dropout_rate_and_content():
    n = 20_000
    cond = Condition(txt=torch.ones(n, 3, 2), txt_mask=torch.ones(n, 3, dtype=torch.bool), pooled=torch.ones(n, 2),
                     labels=torch.ones(n, dtype=torch.long))
    null = Condition(txt=torch.zeros(1, 2, 2), txt_mask=torch.ones(1, 2, dtype=torch.bool), pooled=torch.zeros(1, 2),
                     labels=torch.full((1,), 7))
    out = drop_condition(cond, null, 0.1, generator=torch.Generator().manual_seed(0))
    dropped = out.labels == 7
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.all(out.pooled[dropped] == 0) and torch.all(out.pooled[~dropped] == 1)
    # the null prompt is shorter: its padding is masked
    assert torch.all(~out.txt_mask[dropped][:, 2]) and torch.all(out.txt_mask[~dropped])
    assert drop_condition(cond, null, 0.0) is cond
    assert torch.all(drop_condition(cond, null, 1.0).labels == 7)
