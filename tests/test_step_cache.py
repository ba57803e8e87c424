"""Step caching (omnidit.step_cache): a cache that never skips changes nothing, each method skips what it
says, TaylorSeer's forecast is exact where the residual is linear in t, the calibration is fitted, stored and
reused, and caching composes with guidance, skip-layer guidance and given frames."""

from __future__ import annotations

import dataclasses
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


def test_a_zero_threshold_skips_nothing_and_changes_no_bit(shapes, tmp_path):
    Calibration(teacache=[1.0, 0.0], magnitude_t=[0.0, 1.0], magnitude_log=[0.0, 1.0]).save(tmp_path)
    pipe = dataclasses.replace(shapes, model_dir=tmp_path)  # the calibration is read from the model folder
    plain = pipe.generate(PROMPTS, seed=0, **PLAIN)
    for method in ("first_block", "teacache", "magcache"):
        cached = pipe.generate(PROMPTS, seed=0, cache=method, cache_threshold=0, **PLAIN)
        # calls count rows: 12 steps of 3 prompts' conditional and unconditional rows
        assert pipe.model.last_step_cache.skipped == 0 and pipe.model.last_step_cache.calls == 12 * 6, method
        assert torch.equal(plain, cached), method
    assert pipe.sampling_settings(cache="first_block")["cache_threshold"] == 0.12  # unset: the method's default


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
        outs.append(cache.hidden(("k",), t, h * 0, h, lambda rows, h=h, t=t: h + a + b * t, lambda h=h: h))
    return outs, truth, cache


def test_taylor_forecast_is_exact_for_a_residual_linear_in_t_and_copy_is_not():
    ts = [1 - i / 10 for i in range(10)]
    outs, truth, cache = _linear_run(CacheSettings("interval", interval=2, forecast="taylor", steps=10), ts)
    assert cache.skipped == 4  # after the one warm-up step: every other step
    assert all(torch.allclose(o, t, atol=1e-5) for o, t in zip(outs, truth))
    outs, truth, cache = _linear_run(CacheSettings("interval", interval=2, forecast="copy", steps=10), ts)
    errors = [float((o - t).abs().max()) for o, t in zip(outs, truth)]
    assert cache.skipped == 4 and max(errors) == pytest.approx(0.2, rel=1e-4)  # b * one step of t


def _rule_run(settings: CacheSettings, signals: list[list[float]], calibration: Calibration | None = None,
              ts: list[float] | None = None) -> list[list[bool]]:
    """Drive a StepCache whose rows' signals are scalars times one fixed pattern: row r at call i has the first
    block's residual signals[r][i] * base (first_block) or that modulated input (teacache). Returns which rows
    skipped at each call, read from which rows ``rest`` was asked for."""
    base = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0)).abs() + 0.5
    ts = ts or [1 - i / len(signals[0]) for i in range(len(signals[0]))]
    cache, skipped = StepCache(settings, calibration), []
    for i, t in enumerate(ts):
        values = torch.tensor([row[i] for row in signals]).view(-1, 1, 1) * base  # (B, 5, 4)
        asked = []

        def rest(rows, values=values, asked=asked):
            asked.append(list(range(len(signals))) if rows is None else rows.tolist())
            return values if rows is None else values[rows]

        cache.hidden(("k",), t, values * 0, values, rest, lambda values=values: values)
        skipped.append([r not in (asked[0] if asked else []) for r in range(len(signals))])
    return skipped


def _expected(signals: list[float], warmup: int, skip_rule) -> list[bool]:
    """The closed form, row by row: after the warm-up a call may skip when the row has a computed step and fewer
    than MAX_SKIPS skips in a row; skip_rule(i, last_computed, since) says whether the signal allows it."""
    out, last, in_row = [], None, 0
    for i in range(len(signals)):
        skip = i >= warmup and last is not None and in_row < MAX_SKIPS and skip_rule(i, last)
        out.append(skip)
        last, in_row = (last, in_row + 1) if skip else (i, 0)
    return out


def test_each_rule_skips_what_its_closed_form_says_row_by_row():
    slow = [1.02**i for i in range(20)]  # the signal grows by 2% a step
    fast = [1.3**i for i in range(20)]  # by 30%
    rows = [slow, fast, [1.0] * 20]
    columns = lambda runs: [[step[r] for step in runs] for r in range(len(rows))]  # noqa: E731

    # first_block: the relative change of the first block's residual since the row's last computed step
    got = columns(_rule_run(CacheSettings("first_block", threshold=0.047, steps=20), rows))
    for row, skips in zip(rows, got):
        assert skips == _expected(row, 2, lambda i, j, row=row: abs(row[i] - row[j]) / row[j] < 0.047)
    # rows decide apart; a still row skips all it may: 4 of every 5 calls after the warm-up
    assert any(got[0]) and not any(got[1]) and sum(got[2]) == 15

    # teacache: the rescaled step-to-step input change, accumulated since the row's last computed step
    cal = Calibration(teacache=[2.0, 0.0], magnitude_t=[0.0, 1.0], magnitude_log=[0.0, 0.0])  # rescale(x) = 2x
    got = columns(_rule_run(CacheSettings("teacache", threshold=0.13, steps=20), rows, cal))
    for row, skips in zip(rows, got):
        def rule(i, j, row=row):
            return sum(2 * abs(row[k] - row[k - 1]) / row[k - 1] for k in range(j + 1, i + 1)) < 0.13

        assert skips == _expected(row, 2, rule)
    assert any(got[0]) and not any(got[1])

    # magcache: the accumulated |1 - ratio| of the calibrated magnitude curve (log m = t: ratio e^(t' - t))
    cal = Calibration(teacache=[0.0], magnitude_t=[0.0, 1.0], magnitude_log=[0.0, 1.0])
    ts = [1 - i / 20 for i in range(20)]
    got = columns(_rule_run(CacheSettings("magcache", threshold=0.17, steps=20), rows, cal, ts))
    import math

    rule = lambda i, j: sum(abs(1 - math.exp(ts[k] - ts[j])) for k in range(j + 1, i + 1)) < 0.17  # noqa: E731
    assert all(skips == _expected(rows[0], 2, rule) for skips in got) and any(got[0])  # the same curve for all rows


def test_a_row_is_the_same_whatever_shares_its_batch(shapes, tmp_path):
    """Rows decide their skips apart, so a prompt drawn with others (and best of 2, with guidance, whose
    conditional and unconditional rows are rows too) gives the image it gives alone, for every method."""
    settings = {"steps": 12, "candidates": 2, "skip_scale": 0.0}
    Calibration(teacache=[1.0, 0.0], magnitude_t=[0.0, 1.0], magnitude_log=[0.0, 1.0]).save(tmp_path)
    pipe = dataclasses.replace(shapes, model_dir=tmp_path)  # the calibration is read from the model folder
    for method, threshold in (("first_block", 0.3), ("teacache", 0.3), ("magcache", 0.3)):
        together = pipe.generate(PROMPTS, seed=[5, 6, 7], cache=method, cache_threshold=threshold, **settings)
        cache = pipe.model.last_step_cache
        assert 0 < cache.skipped < cache.calls, method
        if method != "magcache":  # its ratio curve is the same for every row: rows skip together
            assert any(0 < rows < 12 for rows in cache.computed_rows), method  # some calls ran a subset
        rows_together, alone, rows_alone = cache.computed_rows, [], []
        for prompt, k in zip(PROMPTS, [5, 6, 7]):
            alone.append(pipe.generate([prompt], seed=[k], cache=method, cache_threshold=threshold, **settings))
            rows_alone.append(pipe.model.last_step_cache.computed_rows)
        # each call ran as many rows as the three prompts' calls alone did together (each row skipped what it
        # skips alone), and the pixels differ only by the float noise of other batch sizes, as uncached ones do
        assert rows_together == [sum(rows) for rows in zip(*rows_alone)], method
        assert torch.allclose(together, torch.cat(alone), atol=1e-2), method


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


def test_calibration_of_a_model_whose_data_has_no_captions_is_a_one_line_error(tiny_run, tmp_path, capsys):
    import json

    folder = tmp_path / "model"
    shutil.copytree(tiny_run / "checkpoint-0000020", folder)
    config = json.loads((folder / "config.json").read_text())
    config["data"].update(name="imagefolder", path=str(tmp_path))  # trained on a folder of images: no captions here
    (folder / "config.json").write_text(json.dumps(config))
    code, out, err = run_main(capsys, "calibrate", folder, "--prompts", "2")
    assert_one_line_error(code, err, "an image folder has none here")
    assert not (folder / "step_cache.json").exists()


def test_cache_composes_with_guidance_intervals_and_skip_layer_guidance(shapes):
    """Each call pattern (the guided batch, the conditional-only calls outside the guidance interval, the
    skip-layer model) keeps its own cache: a never-skipping cache still changes nothing."""
    settings = {"steps": 12, "candidates": 2, "skip_scale": 1.0, "skip_blocks": [2], "cfg_interval": [0.0, 0.6]}
    plain = shapes.generate(PROMPTS[:2], seed=0, **settings)
    cached = shapes.generate(PROMPTS[:2], seed=0, cache="first_block", cache_threshold=0, **settings)
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


def test_rows_that_part_ways_under_per_token_times_keep_their_vectors():
    """Given frames give per-token conditioning vectors (TokenVectors); when the rows' skips differ, the computing
    rows' vectors are taken with them, and each clip is the one it is drawn alone."""
    from omnidit.model.layers import TokenVectors
    from omnidit.model.mmdit import take_rows
    from omnidit.pipeline import load_pipeline

    vectors = TokenVectors(torch.arange(12.0).view(3, 2, 2), torch.tensor([[0, 1], [1, 0], [1, 1]]))
    taken = take_rows([vectors, (vectors.vectors, 5)], torch.tensor([2, 0]), 3)
    assert isinstance(taken[0], TokenVectors) and torch.equal(taken[0].index, vectors.index[[2, 0]])
    assert torch.equal(taken[1][0], vectors.vectors[[2, 0]]) and taken[1][1] == 5

    video = load_pipeline("shapes-video", device="cpu")
    first = video.generate(["a green triangle", "a red circle"], seed=[0, 1], steps=4)
    prompts = ["a green triangle moving to the left", "a red circle moving up"]
    settings = {"seed": [0, 1], "steps": 10, "cache": "first_block", "cache_threshold": 0.3, "frames": 4}
    together = video.generate_video(prompts, first_frame=first, **settings)
    rows_together = video.model.last_step_cache.computed_rows
    # 2 clips x (conditional, unconditional) = 4 rows a call
    assert any(0 < rows < 4 for rows in rows_together), "no call ran a strict subset: the test would miss it"
    alone, rows_alone = [], []
    for k, prompt in enumerate(prompts):
        alone.append(video.generate_video([prompt], first_frame=first[k:k + 1], **{**settings, "seed": [k]}))
        rows_alone.append(video.model.last_step_cache.computed_rows)
    # each clip skips exactly the steps it skips alone; the pixels then differ only by the float noise of other
    # batch sizes, which uncached sampling shows too (a few 1e-3 over 10 steps of this model)
    assert rows_together == [a + b for a, b in zip(*rows_alone)]
    assert torch.allclose(together, torch.cat(alone), atol=2e-2) and torch.equal(together[:, :, 0], first)
