"""Regional ``torch.compile`` of the blocks (``--compile``, ``MMDiT.compile_blocks``) against eager sampling of
the same model, in one run: the first call's compile time, then images/s of both, alternated ``--repeats``
times with each one's best kept, and the largest pixel difference.

**Peer: internal** (eager PyTorch, the same weights, prompts and seeds), at the model's own sampling settings.
With ``--scheme w8a8`` both sides hold the model's int8 layers (``quantize_in_memory``): compiled, their
quantization traces into the blocks and Inductor fuses it with the ops around it.

Example:
    python benchmarks/compile.py
    python benchmarks/compile.py --scheme w8a8 --json benchmarks/results/compile_w8a8.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from omnidit.pipeline import load_pipeline
from omnidit.quantize import quantize_in_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import run_meta, write_report  # noqa: E402

PROMPTS = ["a red circle above a blue square", "two green triangles", "a small purple diamond",
           "a yellow square to the left of a cyan circle"] * 4


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="a shipped model name or model folder (default shapes)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds, best kept (default 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scheme", choices=("float", "w8a8"), default="float",
                   help="both sides' model: float32 as loaded, or with its blocks' linears in int8 (default float)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/compile.json"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    pipes = {"eager": load_pipeline(args.model, device=args.device),
             "compiled": load_pipeline(args.model, device=args.device)}
    if args.scheme == "w8a8":
        for pipe in pipes.values():
            quantize_in_memory(pipe.model, "w8a8")
    pipes["compiled"].model.compile_blocks()
    t0 = time.perf_counter()
    pipes["compiled"].generate(PROMPTS, seed=0)  # the first call at the timed size: its compile time
    compile_seconds = time.perf_counter() - t0
    pipes["eager"].generate(PROMPTS, seed=0)  # warm-up
    best = {name: float("inf") for name in pipes}
    for _ in range(args.repeats):  # alternate, so a busy machine slows both alike
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.generate(PROMPTS, seed=0)
            best[name] = min(best[name], time.perf_counter() - t0)
    gap = float((pipes["eager"].generate(PROMPTS, seed=1) - pipes["compiled"].generate(PROMPTS, seed=1)).abs().max())
    rows = [{"mode": name, "seconds": best[name], "images_per_s": len(PROMPTS) / best[name],
             "speedup": best["eager"] / best[name]} for name in pipes]
    meta = run_meta("compile.py", argv, torch.device(args.device), start, repeats=args.repeats, scheme=args.scheme,
                    images_per_call=len(PROMPTS), first_call_compile_seconds=compile_seconds,
                    max_pixel_difference=gap)
    print(f"{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads; {args.scheme}; {len(PROMPTS)} "
          f"images per call at the model's settings; compiling took {compile_seconds:.1f} s; "
          f"max pixel difference {gap:.1e}")
    for r in rows:
        print(f"{r['mode']:<9} {r['images_per_s']:>6.2f} images/s  {r['speedup']:.2f}x")
    write_report(args.json, meta, rows)


if __name__ == "__main__":
    main()
