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
skip-layer guidance's weaker model, another batch size) has its own cached state, and within it each row (an
image, a candidate, guidance's conditional or unconditional branch) decides its skips on its own signal, and
only the rows that compute run the rest of the blocks. So caching composes with guidance (per branch),
skip-layer guidance and best-of-N, and an output is the same whatever else shares its batch; per-token
timesteps are read as their largest value.
Install with ``using_step_cache(model, settings)`` around one sampling run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
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
    threshold: float | None = None  # None: the method's DEFAULT_THRESHOLDS entry; 0 never skips
    interval: int = 2  # method 'interval': compute every N-th step
    forecast: str = "copy"
    steps: int = 30  # the sampling run's steps (sets the warm-up)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OmniditError(f"unknown step cache '{self.method}'", hint=f"choose one of {', '.join(METHODS)}")
        if self.forecast not in FORECASTS:
            raise OmniditError(f"unknown cache forecast '{self.forecast}'", hint="choose copy or taylor")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and not isinstance(self.threshold, bool) and 0 <= self.threshold <= 10):
            raise OmniditError(f"the cache threshold must be a number in [0, 10], got {self.threshold!r}",
                               hint="0 never skips; larger skips more steps")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise OmniditError(f"the cache interval must be a whole number >= 1, got {self.interval!r}",
                               hint="e.g. 2 computes every other step")
        self.threshold = DEFAULT_THRESHOLDS.get(self.method, 0.0) if self.threshold is None else float(self.threshold)

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

    def rescale(self, change: float | np.ndarray) -> float | np.ndarray:
        """TeaCache's fitted map from the input's relative change to the output's (a number or an array)."""
        out = np.maximum(0.0, np.polyval(self.teacache, change))
        return float(out) if np.ndim(out) == 0 else out

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


def row_changes(new: Tensor, old: Tensor) -> np.ndarray:
    """relative_change of each row: (B, ...) tensors -> (B,) on the host (one sync)."""
    change = (new - old).abs().flatten(1).mean(1) / old.abs().flatten(1).mean(1).clamp_min(1e-12)
    return change.double().cpu().numpy()


@dataclass
class _Branch:
    """The cached state of one call pattern, row by row: each row of the batch (an image, a candidate, a
    guidance branch) decides its skips on its own signal, so an output does not depend on what else shares its
    batch. Host-side arrays are (B,); tensors keep the rows' last computed results."""
    calls: int = 0
    last_t: float = 1.0
    skips_in_row: np.ndarray | None = None
    computed: np.ndarray | None = None  # how many computed steps each row keeps (0, 1 or 2)
    times: np.ndarray | None = None  # (2, B): the t of each row's last two computed steps, the last at [1]
    residuals: Tensor | None = None  # (2, B, N, D): and their residuals
    first_residual: Tensor | None = None  # first_block: (B, N, D) at each row's last computed step
    modulated: Tensor | None = None  # teacache: at the previous call
    accumulated: np.ndarray | None = None  # teacache: rescaled change; magcache: ratio error
    ratio: np.ndarray | None = None  # magcache: magnitude ratio accumulated since the row's last computed step

    def start(self, batch: int) -> None:
        if self.skips_in_row is None:
            self.skips_in_row, self.computed = np.zeros(batch, int), np.zeros(batch, int)
            self.times, self.accumulated, self.ratio = np.zeros((2, batch)), np.zeros(batch), np.ones(batch)


class StepCache:
    """Decides per model call and per row whether the trunk after the first block runs; counts what it saved.

    ``record=True`` runs every step and keeps per-call measurements for ``calibrate``.
    """

    def __init__(self, settings: CacheSettings, calibration: Calibration | None = None, record: bool = False):
        if settings.method in ("teacache", "magcache") and calibration is None:
            raise OmniditError(f"the {settings.method} cache needs the model's calibration",
                               hint="run: omnidit calibrate MODEL (once; it is stored in the model folder)")
        self.settings, self.calibration, self.record = settings, calibration, record
        self.branches: dict[tuple, _Branch] = {}
        self.calls = self.skipped = 0
        self.computed_rows: list[int] = []  # per model call, how many rows ran the blocks past the first
        self.records: list[dict] = []

    @property
    def saved_fraction(self) -> float:
        """The fraction of rows of model calls whose trunk after the first block was skipped."""
        return self.skipped / max(1, self.calls)

    def skips(self, branch: _Branch, t: float, first_residual: Tensor, current_input: Tensor | None,
              previous_input: Tensor | None) -> np.ndarray:
        """(B,) which rows skip this call, by the method's rule on each row's own signal; updates the rows'
        accumulated signals (teacache, magcache)."""
        s, method = self.settings, self.settings.method
        decide = ((branch.calls >= s.warmup) & (branch.computed > 0) & (branch.skips_in_row < MAX_SKIPS)
                  & (not self.record))
        if not decide.any():
            return decide
        if method == "first_block":
            return decide & (row_changes(first_residual, branch.first_residual) < s.threshold)
        if method == "teacache":
            change = self.calibration.rescale(row_changes(current_input, previous_input))
            branch.accumulated = np.where(decide, branch.accumulated + change, branch.accumulated)
            return decide & (branch.accumulated < s.threshold)
        if method == "magcache":
            branch.ratio = np.where(decide, branch.ratio * self.calibration.ratio(branch.last_t, t), branch.ratio)
            branch.accumulated = np.where(decide, branch.accumulated + np.abs(1.0 - branch.ratio),
                                          branch.accumulated)
            return decide & (branch.accumulated < s.threshold)
        if method == "interval":
            return decide & ((branch.calls - s.warmup) % s.interval != 0)
        return np.zeros_like(decide)

    def hidden(self, key: tuple, t: float, before: Tensor, after_first: Tensor,
               rest: Callable[[Tensor | None], Tensor], modulated: Callable[[], Tensor]) -> Tensor:
        """The generated tokens' hidden states after the whole trunk, (B, N, D).

        before / after_first: the generated tokens before and after the first block; rest(rows) runs the other
        blocks on the batch rows ``rows`` (a (k,) index tensor; None: every row) and returns their result,
        (k, N, D); modulated() is the first block's modulated input (teacache).
        """
        branch = self.branches.setdefault(key, _Branch())
        batch = after_first.shape[0]
        branch.start(batch)
        first_residual = after_first - before
        previous_input, current_input = branch.modulated, None
        if self.settings.method == "teacache" or self.record:
            current_input = branch.modulated = modulated()
        skip = self.skips(branch, t, first_residual, current_input, previous_input)
        branch.calls += 1
        branch.last_t = t
        self.calls += batch
        self.skipped += int(skip.sum())
        self.computed_rows.append(batch - int(skip.sum()))
        branch.skips_in_row[skip] += 1
        if skip.all():
            return after_first + self._forecast(branch, t, np.arange(batch))
        rows = np.flatnonzero(~skip)
        index = None if len(rows) == batch else torch.as_tensor(rows, device=after_first.device)
        computed = rest(index)  # (k, N, D)
        residual = computed - (after_first if index is None else after_first[index])
        if self.record:
            row = {"key": key, "t": t, "log_magnitude": float(residual.abs().mean().clamp_min(1e-12).log())}
            if branch.residuals is not None:
                row["output_change"] = relative_change(residual, branch.residuals[1])
                row["input_change"] = relative_change(current_input, previous_input)
            self.records.append(row)
        self._keep(branch, rows, index, t, residual, first_residual)
        if index is None:
            return computed
        hidden = torch.empty_like(after_first)
        hidden[index] = computed
        skipped = np.flatnonzero(skip)
        hidden[torch.as_tensor(skipped, device=hidden.device)] = after_first[skipped] + self._forecast(branch, t,
                                                                                                        skipped)
        return hidden

    @staticmethod
    def _keep(branch: _Branch, rows: np.ndarray, index: Tensor | None, t: float, residual: Tensor,
              first_residual: Tensor) -> None:
        """Store the computed rows' results; their skip counters and accumulated signals start again."""
        if branch.residuals is None:
            branch.residuals = residual.new_zeros((2, len(branch.computed), *residual.shape[1:]))
            branch.first_residual = torch.zeros_like(first_residual)
        at = slice(None) if index is None else index
        branch.residuals[0, at] = branch.residuals[1, at]
        branch.residuals[1, at] = residual
        branch.first_residual[at] = first_residual if index is None else first_residual[index]
        branch.times[0, rows], branch.times[1, rows] = branch.times[1, rows], t
        branch.computed[rows] = np.minimum(branch.computed[rows] + 1, 2)
        branch.skips_in_row[rows], branch.accumulated[rows], branch.ratio[rows] = 0, 0.0, 1.0

    def _forecast(self, branch: _Branch, t: float, rows: np.ndarray) -> Tensor:
        """The residual of the skipped ``rows`` at ``t``: their last computed one (scaled by MagCache's ratio),
        plus TaylorSeer's first-order term in t where a row has two computed steps at different times."""
        index = torch.as_tensor(rows, device=branch.residuals.device)
        newest = branch.residuals[1, index]
        shape = (len(rows),) + (1,) * (newest.dim() - 1)
        last = newest
        if self.settings.method == "magcache":
            last = newest * torch.as_tensor(branch.ratio[rows], dtype=newest.dtype, device=newest.device).view(shape)
        if self.settings.forecast == "copy":
            return last
        t0, t1 = branch.times[0, rows], branch.times[1, rows]
        usable = (branch.computed[rows] == 2) & (t1 != t0)
        factor = np.where(usable, (t - t1) / np.where(usable, t1 - t0, 1.0), 0.0)
        slope = newest - branch.residuals[0, index]
        return last + slope * torch.as_tensor(factor, dtype=last.dtype, device=last.device).view(shape)


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
