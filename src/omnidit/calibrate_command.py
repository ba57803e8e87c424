"""``omnidit calibrate MODEL``: measure the model's own step-to-step changes once, for the teacache and magcache
step caches (omnidit.step_cache), and store them as step_cache.json in the model folder."""

from __future__ import annotations

import argparse
import time

from omnidit.errors import OmniditError

CALIBRATION_SEED = 4_242  # the scenes whose captions calibrate: a data seed no recipe trains on (they use 0)
MAX_PROMPTS = 64


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate the teacache and magcache step caches for a model (once)",
                       description="Sample a few captions of the model's own data with every step computed and fit "
                                   "what the teacache (input change -> output change) and magcache (the residual's "
                                   "magnitude over t) step caches need; written to step_cache.json in the model "
                                   "folder and read by generate, eval, demo and the API whenever --cache teacache "
                                   "or magcache is used. Seconds to a minute on a CPU.")
    p.add_argument("model", help="checkpoint or run folder, or a shipped model name (shapes, shapes-video, ...)")
    p.add_argument("--prompts", type=int, default=4, help="captions to sample (default 4, at most 64)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's sample.steps)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, 0 or more (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def calibration_prompts(config, n: int) -> list[str]:
    """n captions of the model's data drawn with a seed that training does not use."""
    from omnidit.data import build_dataset

    dc = config.data
    if dc.name == "imagefolder":
        raise OmniditError("calibration draws captions from the model's data, and an image folder has none here",
                           hint="calibrate in Python: omnidit.step_cache.calibrate(pipe, your_prompts)")
    ds = build_dataset(dc.name, dc.width, dc.height, seed=CALIBRATION_SEED, frames=dc.frames, fps=dc.fps,
                       sample_rate=dc.sample_rate, seconds=dc.seconds)
    return [ds[i]["caption"] for i in range(n)]


def cmd_calibrate(args: argparse.Namespace) -> None:
    from omnidit.generate_command import model_or_shipped
    from omnidit.pipeline import load_pipeline
    from omnidit.step_cache import calibrate
    from omnidit.validate import check_number

    check_number("--prompts", args.prompts, low=1, high=MAX_PROMPTS, integer=True)
    if args.steps is not None:
        check_number("--steps", args.steps, low=5, high=10_000, integer=True,
                     hint="calibration needs at least 5 steps; the model's default is fine")
    check_number("--seed", args.seed, low=0, high=2**63 - 1, integer=True)
    pipe = load_pipeline(model_or_shipped(args.model), device=args.device)
    start = time.perf_counter()
    calibration = calibrate(pipe, calibration_prompts(pipe.config, args.prompts), seed=args.seed, steps=args.steps)
    path = calibration.save(pipe.model_dir)
    print(f"wrote {path} ({args.prompts} samples at {calibration.steps} steps in "
          f"{time.perf_counter() - start:.1f} s)")
