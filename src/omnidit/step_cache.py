"""Step caching: at sampling steps where the network's output barely changes, run only its first block and
reuse (or forecast) what the other blocks added at an earlier step.

The model's trunk maps its hidden states ``h`` after the first block to ``h + R``; ``R`` (the residual of
every later block, over the generated tokens) changes slowly between neighbouring steps, so a skipped step
costs one block instead of all of them. What decides a skip (``CacheSettings.method``):

- ``first_block``: the relative L1 change of the first block's own residual since the last computed step is
  below ``threshold`` (first-block caching, ParaAttention's FBCache / diffusers' FirstBlockCache).
- ``teacache``: the accumulated, rescaled relative change of the first block's modulated input stays below
  ``threshold``; the rescaling is a polynomial from input change to output change that ``calibrate`` fits on
  the model's own samples (TeaCache, Liu et al. 2024, without shipped per-model coefficients).
- ``magcache``: the accumulated error of the residual's magnitude ratio stays below ``threshold``; the
  ratio curve over t comes from one calibration sample (MagCache, Ma et al. 2025), and a skipped residual is
  the cached one scaled by it.
- ``interval``: compute every ``interval``-th step after the warm-up (FORA's fixed schedule).

``forecast``: a skipped step's residual is the last computed one (``copy``) or its first-order Taylor
extrapolation in t from the last two computed steps (``taylor``: TaylorSeer, Liu et al. 2025).

Each distinct call pattern (the guided batch, a conditional-only call outside the guidance interval,
skip-layer guidance's weaker model, another batch size) has its own cached state, so caching composes with
guidance, skip-layer guidance and best-of-N; per-token timesteps are read as their largest value.
Install with ``using_step_cache(model, settings)`` around one sampling run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from omnidit.errors import OmniditError

METHODS = ("none", "first_block", "teacache", "magcache", "interval")
FORECASTS = ("copy", "taylor")
# A method's threshold when none is given: about a third of the steps skipped on the shipped shapes model at
# its 30 steps (benchmarks/step_cache.py measures quality and speed at these and other values).
DEFAULT_THRESHOLDS = {"first_block": 0.12, "teacache": 0.1, "magcache": 0.05}
WARMUP_FRACTION = 0.1  # the first steps always compute: the output changes fastest near noise
MAX_SKIPS = 4  # at most this many skipped steps in a row, whatever the signal says
CALIBRATION_FILE = "step_cache.json"
TEACACHE_DEGREE = 2


@dataclass
class CacheSettings:
    method: str = "none"
    threshold: float = 0.0  # 0 = the method's DEFAULT_THRESHOLDS entry
    interval: int = 2  # method 'interval': compute every N-th step
    forecast: str = "copy"
    steps: int = 30  # the sampling run's steps (sets the warm-up)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OmniditError(f"unknown step cache '{self.method}'", hint=f"choose one of {', '.join(METHODS)}")
        if self.forecast not in FORECASTS:
            raise OmniditError(f"unknown cache forecast '{self.forecast}'", hint="choose copy or taylor")
        if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold <= 10):
            raise OmniditError(f"the cache threshold must be a number in [0, 10], got {self.threshold!r}",
                               hint="0 picks the method's default; larger skips more steps")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise OmniditError(f"the cache interval must be a whole number >= 1, got {self.interval!r}",
                               hint="e.g. 2 computes every other step")
        self.threshold = float(self.threshold) or DEFAULT_THRESHOLDS.get(self.method, 0.0)

    @property
    def warmup(self) -> int:
        return max(1, round(WARMUP_FRACTION * self.steps))


@dataclass
class Calibration:
    """What ``calibrate`` measured on a model (stored as step_cache.json in its folder).

    teacache: polynomial coefficients (highest power first) from the first block's relative input change
    to the relative change of the trunk's residual; magnitude_t / magnitude_log: the log mean absolute
    residual over t (increasing t), whose differences give MagCache's ratios at any step count.
    """
    teacache: list[float]
    magnitude_t: list[float]
    magnitude_log: list[float]
    samples: int = 0
    steps: int = 0

    def ratio(self, t_from: float, t_to: float) -> float:
        """The residual's expected magnitude at t_to over that at t_from."""
        logs = np.interp([t_from, t_to], self.magnitude_t, self.magnitude_log)
        return float(np.exp(logs[1] - logs[0]))

    def rescale(self, change: float) -> float:
        return max(0.0, float(np.polyval(self.teacache, change)))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Calibration | None:
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise OmniditError(f"{path} is not a step-cache calibration ({e})",
                               hint="delete it and run omnidit calibrate on the model again") from None


def relative_change(new: Tensor, old: Tensor) -> float:
    """mean |new - old| / mean |old| (one host sync)."""
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


@dataclass
class _Branch:
    """The cached state of one call pattern."""
    calls: int = 0
    skips_in_row: int = 0
    times: list[float] = field(default_factory=list)  # the last two computed steps' t
    residuals: list[Tensor] = field(default_factory=list)  # and their residuals
    first_residual: Tensor | None = None  # first_block: at the last computed step
    modulated: Tensor | None = None  # teacache: at the previous call
    accumulated: float = 0.0  # teacache: rescaled change; magcache: ratio error
    ratio: float = 1.0  # magcache: accumulated magnitude ratio since the last computed step
    last_t: float = 1.0


class StepCache:
    """Decides per model call whether the trunk after the first block runs; counts what it saved.

    ``record=True`` runs every step and keeps per-call measurements for ``calibrate``.
    """

    def __init__(self, settings: CacheSettings, calibration: Calibration | None = None, record: bool = False):
        if settings.method in ("teacache", "magcache") and calibration is None:
            raise OmniditError(f"the {settings.method} cache needs the model's calibration",
                               hint="run: omnidit calibrate MODEL (once; it is stored in the model folder)")
        self.settings, self.calibration, self.record = settings, calibration, record
        self.branches: dict[tuple, _Branch] = {}
        self.calls = self.skipped = 0
        self.records: list[dict] = []

    @property
    def saved_fraction(self) -> float:
        """The fraction of model calls whose trunk after the first block was skipped."""
        return self.skipped / max(1, self.calls)

    def hidden(self, key: tuple, t: float, before: Tensor, after_first: Tensor,
               rest: Callable[[], Tensor], modulated: Callable[[], Tensor]) -> Tensor:
        """The generated tokens' hidden states after the whole trunk, (B, N, D).

        before / after_first: the generated tokens before and after the first block; rest() runs the other
        blocks and returns the full result; modulated() is the first block's modulated input (teacache).
        """
        s, method = self.settings, self.settings.method
        branch = self.branches.setdefault(key, _Branch())
        self.calls += 1
        first_residual = after_first - before
        decide = (branch.calls >= s.warmup and bool(branch.residuals) and branch.skips_in_row < MAX_SKIPS
                  and not self.record)
        previous_input, current_input = branch.modulated, None
        if method == "teacache" or self.record:
            current_input = branch.modulated = modulated()
        skip = False
        if decide and method == "first_block":
            skip = relative_change(first_residual, branch.first_residual) < s.threshold
        elif decide and method == "teacache":
            branch.accumulated += self.calibration.rescale(relative_change(current_input, previous_input))
            skip = branch.accumulated < s.threshold
        elif decide and method == "magcache":
            branch.ratio *= self.calibration.ratio(branch.last_t, t)
            branch.accumulated += abs(1.0 - branch.ratio)
            skip = branch.accumulated < s.threshold
        elif decide and method == "interval":
            skip = (branch.calls - s.warmup) % s.interval != 0
        branch.calls += 1
        branch.last_t = t
        if skip:
            branch.skips_in_row += 1
            self.skipped += 1
            return after_first + self._forecast(branch, t)
        hidden = rest()
        residual = hidden - after_first
        if self.record:
            row = {"key": key, "t": t, "log_magnitude": float(residual.abs().mean().clamp_min(1e-12).log())}
            if branch.residuals:
                row["output_change"] = relative_change(residual, branch.residuals[-1])
                row["input_change"] = relative_change(current_input, previous_input)
            self.records.append(row)
        branch.times, branch.residuals = (branch.times + [t])[-2:], (branch.residuals + [residual])[-2:]
        branch.first_residual, branch.skips_in_row = first_residual, 0
        branch.accumulated, branch.ratio = 0.0, 1.0
        return hidden

    def _forecast(self, branch: _Branch, t: float) -> Tensor:
        last = branch.residuals[-1]
        if self.settings.method == "magcache":
            last = last * branch.ratio
        if self.settings.forecast == "copy" or len(branch.residuals) < 2 or branch.times[-1] == branch.times[-2]:
            return last
        slope = (branch.residuals[-1] - branch.residuals[-2]) / (branch.times[-1] - branch.times[-2])
        return last + slope * (t - branch.times[-1])


@contextmanager
def using_step_cache(model: torch.nn.Module, settings: CacheSettings | None,
                     calibration: Calibration | None = None, record: bool = False) -> Iterator[StepCache | None]:
    """Install a fresh StepCache on ``model`` for one sampling run (nothing when the method is none)."""
    if settings is None or settings.method == "none" and not record:
        yield None
        return
    cache = StepCache(settings, calibration, record)
    previous, model.step_cache = getattr(model, "step_cache", None), cache
    try:
        yield cache
    finally:
        model.step_cache, model.last_step_cache = previous, cache  # last_step_cache: what it saved, for reports


def fit_calibration(records: list[dict], samples: int, steps: int) -> Calibration:
    """TeaCache's polynomial and MagCache's magnitude curve from a recording run's per-call rows (of the
    full model's calls: skip-layer guidance's weaker model is left out)."""
    records = [r for r in records if not r["key"][0]]
    pairs = np.array([(r["input_change"], r["output_change"]) for r in records if "input_change" in r])
    if len(pairs) < TEACACHE_DEGREE + 2:
        raise OmniditError(f"calibration needs at least {TEACACHE_DEGREE + 3} sampling steps, got {steps}",
                           hint="calibrate with more steps (the model's default is fine)")
    poly = np.polyfit(pairs[:, 0], pairs[:, 1], TEACACHE_DEGREE)
    ts = np.array([r["t"] for r in records])
    logs = np.array([r["log_magnitude"] for r in records])
    grid = np.unique(np.round(ts, 6))
    curve = [float(logs[np.abs(ts - g) < 1e-6].mean()) for g in grid]
    return Calibration(teacache=[float(c) for c in poly], magnitude_t=[float(g) for g in grid],
                       magnitude_log=curve, samples=samples, steps=steps)


def calibrate(pipeline, prompts: list[str], seed: int = 0, steps: int | None = None) -> Calibration:
    """Sample ``prompts`` once with every step computed and fit the calibration (the pipeline's sampling
    settings otherwise). Clips and sound sample their first few frames' worth as the model's data sets."""
    settings = pipeline.sampling_settings(steps=steps)
    with using_step_cache(pipeline.model, CacheSettings(steps=settings["steps"]), record=True) as cache:
        if pipeline.model.config.extra_streams:
            pipeline.generate_av(prompts, seed=seed, steps=settings["steps"], candidates=1)
        else:
            pipeline.generate_video(prompts, seed=seed, steps=settings["steps"], candidates=1) \
                if pipeline.config.data.frames > 1 else pipeline.generate(prompts, seed=seed, steps=settings["steps"],
                                                                         candidates=1)
    return fit_calibration(cache.records, len(prompts), settings["steps"])
