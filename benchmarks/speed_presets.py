"""The --speed presets against the model's defaults in one run: the shapes suite's score and its time on the
shipped model (a warm-up first; each preset on a fresh copy of the pipeline, so quantization does not leak).

**Peer: internal** (the same model at its default settings, the same prompts and seeds). Issue #28's target:
``fast`` at >= 2.5x the images/s of the defaults with the score at most 0.01 lower.

Example:
    python benchmarks/speed_presets.py --limit 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from omnidit.evaluate.runner import evaluate_model
from omnidit.pipeline import load_pipeline
from omnidit.quantize import SPEEDS, apply_speed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import run_meta, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--limit", type=int, default=4, help="prompts per suite category (default 4)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/speed_presets.json"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for speed in SPEEDS:
        pipe = load_pipeline(args.model, device="cpu")
        apply_speed(pipe, speed)
        evaluate_model(pipe, "shapes", n_per_prompt=1, limit=1, progress=False, frechet=False)  # warm-up
        t0 = time.perf_counter()
        report = evaluate_model(pipe, "shapes", n_per_prompt=1, limit=args.limit, progress=False, frechet=False)
        seconds = time.perf_counter() - t0
        rows.append({"speed": speed, "overall": report.overall, "images": report.n_images, "seconds": seconds,
                     "settings": {k: report.settings[k] for k in ("cache", "candidates", "steps")}})
        print(f"{speed}: overall {report.overall:.3f} in {seconds:.1f} s", flush=True)
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        r["score_change"] = r["overall"] - rows[0]["overall"]
    meta = run_meta("speed_presets.py", argv, torch.device("cpu"), start, model=args.model, limit=args.limit)
    print(f"\n{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads; shapes suite, {args.limit} "
          f"prompts per category")
    print(f"{'speed':<8} {'overall':>8} {'vs default':>10} {'speedup':>8}  settings")
    for r in rows:
        print(f"{r['speed']:<8} {r['overall']:>8.3f} {r['score_change']:>+10.3f} {r['speedup']:>7.2f}x  "
              f"{r['settings']}")
    write_report(args.json, meta, rows)


if __name__ == "__main__":
    main()
