"""Step caching on the shipped shapes model: the shapes suite's score and the images/s of each cache
against no cache, in one run, at the model's own sampling settings (30 steps, guidance, skip-layer guidance,
best of 2).

**Peer: internal** (the uncached sampler of the same model); diffusers' cache hooks need a Flux- or SD3-shaped
model, which the shapes model is not (its 3 input channels do not fit FluxTransformer2DModel), so they are
not in this table yet. Each job evaluates the same prompts and seeds; the timed part is the suite's sampling
and judging (the same for every job). The model is copied to a temporary folder and calibrated there
(``omnidit.step_cache.calibrate``), so the installed package is not written.

Example:
    python benchmarks/step_cache.py --limit 4
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from omnidit.calibrate_command import calibration_prompts
from omnidit.checkpoint import shipped_model_dir
from omnidit.evaluate.runner import evaluate_model
from omnidit.pipeline import Pipeline, load_pipeline
from omnidit.step_cache import calibrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import run_meta, write_report  # noqa: E402

JOBS = {  # name -> sampling keyword arguments
    "none": {},
    "first_block": {"cache": "first_block"},
    "teacache": {"cache": "teacache"},
    "magcache": {"cache": "magcache"},
    "interval 2": {"cache": "interval"},
    "interval 2 + taylor": {"cache": "interval", "cache_forecast": "taylor"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="a shipped model name or model folder (default shapes)")
    p.add_argument("--limit", type=int, default=8, help="prompts per suite category (default 8)")
    p.add_argument("--n-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/step_cache.json"))
    return p.parse_args(argv)


def calibrated_copy(model: str, folder: Path, device: str = "cpu") -> Pipeline:
    """The model (a shipped name or folder) copied to ``folder`` and calibrated there as ``omnidit calibrate``
    does (4 captions), so that the installed package is not written; its loaded pipeline."""
    source = shipped_model_dir(model) if not Path(model).exists() else Path(model)
    shutil.copytree(source, folder)
    pipe = load_pipeline(folder, device=device)
    calibrate(pipe, calibration_prompts(pipe.config, 4)).save(folder)
    return pipe


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = calibrated_copy(args.model, Path(tmp) / "model", args.device)
        # Warm up (text encoder, prompt cache, detector, kernels), so the first timed job pays for nothing extra.
        evaluate_model(pipe, "shapes", n_per_prompt=1, limit=1, progress=False, frechet=False)
        rows = []
        for name, sampling in JOBS.items():
            t0 = time.perf_counter()
            report = evaluate_model(pipe, "shapes", n_per_prompt=args.n_per_prompt, limit=args.limit,
                                    progress=False, frechet=False, **sampling)
            seconds = time.perf_counter() - t0
            cache = pipe.model.last_step_cache if sampling else None
            rows.append({"job": name, "overall": report.overall, "images": report.n_images, "seconds": seconds,
                         "saved_fraction": cache.saved_fraction if cache else 0.0,
                         "threshold": report.settings.get("cache_threshold")})
            print(f"{name}: overall {report.overall:.3f} in {seconds:.1f} s")
    base = rows[0]
    for r in rows:
        r["speedup"] = base["seconds"] / r["seconds"]
        r["score_change"] = r["overall"] - base["overall"]
    meta = run_meta("step_cache.py", argv, torch.device(args.device), start, model=args.model, limit=args.limit,
                    n_per_prompt=args.n_per_prompt)
    print(f"\n{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads; shapes suite, "
          f"{args.limit} prompts per category, {args.n_per_prompt} per prompt; the model's sampling settings")
    print(f"{'cache':<22} {'overall':>8} {'vs none':>8} {'skipped':>8} {'speedup':>8}")
    for r in rows:
        print(f"{r['job']:<22} {r['overall']:>8.3f} {r['score_change']:>+8.3f} {r['saved_fraction']:>8.0%} "
              f"{r['speedup']:>7.2f}x")
    write_report(args.json, meta, rows)


if __name__ == "__main__":
    main()
