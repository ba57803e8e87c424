"""Step caching (omnidit.step_cache): a cache that never skips changes nothing, each method skips what it
says, TaylorSeer's forecast is exact where the residual is linear in t, the calibration is fitted, stored and
reused, and caching composes with guidance, skip-layer guidance and given frames."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_cli import assert_one_line_error, run_main

from omnidit.errors import OmniditError
from omnidit.step_cache import MAX_SKIPS, CacheSettings, Calibration, StepCache, fit_calibration


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A copy of the shipped shapes model (calibration is written into its folder)."""
    from omnidit.checkpoint import shipped_model_dir
    from omnidit.pipeline import load_pipeline

    folder = tmp_path_factory.mktemp("cache") / "shapes"
    shutil.copytree(shipped_model_dir("shapes"), folder)
    return load_pipeline(folder, device="cpu")


PLAIN = {"candidates": 1, "skip_scale": 0.0, "steps": 12}
PROMPTS = ["a red circle above a blue square", "a green triangle", "two yellow diamonds"]


def test_a_cache_that_never_skips_changes_no_bit(shapes):
    plain = shapes.generate(PROMPTS, seed=0, **PLAIN)
    cached = shapes.generate(PROMPTS, seed=0, cache="first_block", cache_threshold=1e-9, **PLAIN)
    assert shapes.model.last_step_cache.skipped == 0 and shapes.model.last_step_cache.calls == 12
    assert torch.equal(plain, cached)


def test_first_block_cache_skips_steps_and_stays_close(shapes):
    plain = shapes.generate(PROMPTS, seed=0, candidates=1, skip_scale=0.0)
    cached = shapes.generate(PROMPTS, seed=0, cache="first_block", candidates=1, skip_scale=0.0)
    cache = shapes.model.last_step_cache
    assert 0.2 <= cache.saved_fraction <= 0.6, (cache.skipped, cache.calls)
    assert (cached - plain).abs().mean() < 0.05  # pixels in [-1, 1]: the same pictures, up to a few edges


def _linear_run(settings: CacheSettings, ts: list[float]) -> tuple[list, list, StepCache]:
    """Drive a StepCache with a trunk whose residual is a + b t exactly."""
    a, b = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0)), torch.full((1, 5, 4), 2.0)
    cache, outs, truth = StepCache(settings), [], []
    for t in ts:
        h = torch.full((1, 5, 4), t)
        truth.append(h + a + b * t)
        outs.append(cache.hidden(("k",), t, h * 0, h, lambda h=h, t=t: h + a + b * t, lambda h=h: h))
    return outs, truth, cache


def test_taylor_forecast_is_exact_for_a_residual_linear_in_t_and_copy_is_not():
    ts = [1 - i / 10 for i in range(10)]
    outs, truth, cache = _linear_run(CacheSettings("interval", interval=2, forecast="taylor", steps=10), ts)
    assert cache.skipped == 4  # after the one warm-up step: every other step
    assert all(torch.allclose(o, t, atol=1e-5) for o, t in zip(outs, truth))
    outs, truth, cache = _linear_run(CacheSettings("interval", interval=2, forecast="copy", steps=10), ts)
    errors = [float((o - t).abs().max()) for o, t in zip(outs, truth)]
    assert cache.skipped == 4 and max(errors) == pytest.approx(0.2, rel=1e-4)  # b * one step of t


def test_skips_in_a_row_are_bounded():
    ts = [1 - i / 30 for i in range(30)]
    outs, truth, cache = _linear_run(CacheSettings("first_block", threshold=10, steps=30), ts)
    # 3 warm-up steps, then MAX_SKIPS skipped and one computed, over and over
    assert cache.skipped == sum(1 for i in range(30 - 3) if i % (MAX_SKIPS + 1) != MAX_SKIPS)


def test_bad_settings_are_errors():
    for kwargs, fragment in (({"method": "fastest"}, "unknown step cache"), ({"forecast": "linear"}, "forecast"),
                             ({"threshold": -1}, "threshold"), ({"interval": 0}, "interval")):
        with pytest.raises(OmniditError, match=fragment):
            CacheSettings(**kwargs)
    with pytest.raises(OmniditError, match="omnidit calibrate"):
        StepCache(CacheSettings("teacache"))
    from omnidit.config import config_from_dict

    with pytest.raises(OmniditError, match="sample.cache"):
        config_from_dict({"sample": {"cache": "fast"}})


def test_fit_calibration_recovers_a_known_rescaling_and_magnitude_curve():
    rows = [{"key": ((), 2, (16,)), "t": t, "log_magnitude": -2 * t, "input_change": x, "output_change": 3 * x * x}
            for t, x in zip([1.0, 0.75, 0.5, 0.25, 0.1], [0.1, 0.2, 0.3, 0.4, 0.5])]
    rows.append({"key": ((2,), 2, (16,)), "t": 0.5, "log_magnitude": 40.0})  # skip-layer calls are left out
    cal = fit_calibration(rows, samples=1, steps=5)
    assert cal.rescale(0.25) == pytest.approx(3 * 0.25**2, abs=1e-9)
    assert cal.ratio(0.5, 0.25) == pytest.approx(float(torch.tensor(0.5).exp()), rel=1e-6)


def test_calibrate_once_then_teacache_and_magcache_reuse_it(shapes, capsys):
    folder = shapes.model_dir
    code, out, err = run_main(capsys, "generate", "a red circle", "--model", folder, "--cache", "teacache",
                              "-o", folder / "x.png", "--no-progress")
    assert_one_line_error(code, err, "calibrate")
    assert not (folder / "x.png").exists()
    code, out, err = run_main(capsys, "calibrate", folder, "--prompts", "2", "--steps", "12")
    assert code == 0 and "step_cache.json" in out, err
    cal = Calibration.load(folder)
    assert cal.samples == 2 and cal.steps == 12 and len(cal.magnitude_t) == 12
    plain = shapes.generate(PROMPTS, seed=0, **PLAIN)
    for method in ("teacache", "magcache"):  # at 12 steps each step changes more: a larger threshold skips some
        cached = shapes.generate(PROMPTS, seed=0, cache=method, cache_threshold=0.3, **PLAIN)
        assert shapes.model.last_step_cache.skipped >= 2, method
        assert (cached - plain).abs().mean() < 0.1, method
    code, out, err = run_main(capsys, "generate", "a red circle", "--model", folder, "--cache", "magcache",
                              "--steps", "6", "-o", folder / "y.png", "--no-progress")
    assert code == 0 and (folder / "y.png").is_file(), err


def test_cache_composes_with_guidance_intervals_and_skip_layer_guidance(shapes):
    """Each call pattern (the guided batch, the conditional-only calls outside the guidance interval, the
    skip-layer model) keeps its own cache: a never-skipping cache still changes nothing."""
    settings = {"steps": 12, "candidates": 2, "skip_scale": 1.0, "skip_blocks": [2], "cfg_interval": [0.0, 0.6]}
    plain = shapes.generate(PROMPTS[:2], seed=0, **settings)
    cached = shapes.generate(PROMPTS[:2], seed=0, cache="first_block", cache_threshold=1e-9, **settings)
    assert torch.equal(plain, cached)
    assert len(shapes.model.last_step_cache.branches) == 3
    shapes.generate(PROMPTS[:2], seed=0, cache="interval", **settings)
    assert shapes.model.last_step_cache.skipped > 0


def test_given_frames_stay_exact_under_a_cache():
    from omnidit.pipeline import load_pipeline

    video = load_pipeline("shapes-video", device="cpu")
    first = video.generate(["a green triangle"], seed=0, steps=6)
    clip = video.generate_video(["a green triangle moving to the left"], first_frame=first, seed=0, steps=10,
                                cache="interval", cache_forecast="taylor")
    assert video.model.last_step_cache.skipped > 0
    assert torch.equal(clip[0, :, 0], first[0])
