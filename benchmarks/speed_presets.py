"""The --speed presets against the model's defaults in one run: the shapes suite's score and its time on the
shipped model (a warm-up first; each row on a fresh copy of the pipeline, so quantization does not leak).

**Peer: internal** (the same model at its default settings, the same prompts and seeds). Issue #28's target:
``fast`` at >= 2.5x the images/s of the defaults with the score at most 0.01 lower. ``--variant`` adds rows of
other combinations (a quantization scheme in memory and sampling settings, or a preset with changed settings),
for choosing what a preset holds on a seed that is not the suite's.

Example:
    python benchmarks/speed_presets.py --limit 4
    python benchmarks/speed_presets.py --seed 1 --limit 16 --n-per-prompt 2 --presets default,fast \\
        --variant "interval3-taylor:w8a8:cache=interval,cache_interval=3,cache_forecast=taylor"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from omnidit.evaluate.runner import evaluate_model
from omnidit.pipeline import SAMPLING_KEYS, load_pipeline
from omnidit.quantize import SPEEDS, apply_speed, quantize_in_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import run_meta, write_report  # noqa: E402

SCHEMES = ("none", "w8a8", "bf16")
PRESET_BASES = ("fast", "faster")  # a variant on a preset: the preset's model and settings, changed by the variant's


def parse_variant(text: str) -> tuple[str, str, dict]:
    """'NAME:BASE:key=value,...' -> (name, base, sampling settings); BASE is a scheme applied to the model at its
    defaults or a preset (fast, faster) that the settings change; values are ints, floats or words."""
    parts = text.split(":")
    if len(parts) != 3 or parts[1] not in SCHEMES + PRESET_BASES:
        raise argparse.ArgumentTypeError(f"a variant is NAME:BASE:key=value,... with BASE one of "
                                         f"{', '.join(SCHEMES + PRESET_BASES)}, got {text!r}")
    settings = {}
    for item in filter(None, parts[2].split(",")):
        key, _, value = item.partition("=")
        if key not in SAMPLING_KEYS or not value:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not KEY=VALUE with a sampling key "
                                             f"(list-valued keys are not supported here)")
        for kind in (int, float, str):
            try:
                settings[key] = kind(value)
                break
            except ValueError:
                continue
    return parts[0], parts[1], settings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--limit", type=int, default=4, help="prompts per suite category (default 4)")
    p.add_argument("--seed", type=int, default=0, help="the suite's seed (default 0, the one reported)")
    p.add_argument("--n-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--presets", default=",".join(SPEEDS), help="which presets to run, the first is the baseline")
    p.add_argument("--variant", type=parse_variant, action="append", default=[],
                   help="an extra row NAME:BASE:key=value,... (BASE: none, w8a8 or bf16 on the model at its defaults, "
                        "or the preset fast or faster; keys of the sampling settings, e.g. "
                        "cache=interval,cache_interval=3); repeatable")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/speed_presets.json"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    jobs = [(speed, speed, None, {}) for speed in args.presets.split(",")]
    jobs += [(name, base, None, settings) if base in PRESET_BASES else (name, "default", base, settings)
             for name, base, settings in args.variant]
    rows = []
    for name, speed, scheme, settings in jobs:
        pipe = load_pipeline(args.model, device="cpu")
        apply_speed(pipe, speed)
        if scheme not in (None, "none"):
            quantize_in_memory(pipe.model, scheme)
        suite = dict(progress=False, frechet=False, **settings)
        evaluate_model(pipe, "shapes", n_per_prompt=1, limit=1, **suite)  # warm-up
        t0 = time.perf_counter()
        report = evaluate_model(pipe, "shapes", n_per_prompt=args.n_per_prompt, seed=args.seed, limit=args.limit,
                                **suite)
        seconds = time.perf_counter() - t0
        rows.append({"speed": name, "overall": report.overall, "images": report.n_images, "seconds": seconds,
                     "scheme": scheme or ("w8a8" if speed != "default" else "none"),
                     "settings": {k: report.settings[k] for k in ("cache", "cache_threshold", "cache_forecast",
                                                                  "cache_interval", "candidates", "steps")}})
        print(f"{name}: overall {report.overall:.3f} in {seconds:.1f} s", flush=True)
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        r["score_change"] = r["overall"] - rows[0]["overall"]
    meta = run_meta("speed_presets.py", argv, torch.device("cpu"), start, model=args.model, limit=args.limit,
                    seed=args.seed, n_per_prompt=args.n_per_prompt)
    print(f"\n{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads; shapes suite seed {args.seed}, "
          f"{args.limit} prompts per category, {args.n_per_prompt} image(s) each")
    print(f"{'row':<18} {'overall':>8} {'vs first':>9} {'speedup':>8}  scheme, settings")
    for r in rows:
        print(f"{r['speed']:<18} {r['overall']:>8.3f} {r['score_change']:>+9.3f} {r['speedup']:>7.2f}x  "
              f"{r['scheme']}, {r['settings']}")
    write_report(args.json, meta, rows)


if __name__ == "__main__":
    main()
