"""The AdamW update omnidit's trainer runs (``omnidit.train.make_optimizer``: fused) against torch's default
AdamW (the multi-tensor ``foreach`` path), on the parameters of a real MMDiT preset.

Both optimizers hold the same parameters and gradients and are timed interleaved, A B A B, after one
warm-up pair; ratio = median fused time / median default time.

    python benchmarks/optimizer.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import _sync, device_description  # noqa: E402

from omnidit.model.mmdit import PRESETS, MMDiT  # noqa: E402
from omnidit.pipeline import resolve_device  # noqa: E402
from omnidit.train import make_optimizer, parameter_groups  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,S", help="comma-separated model presets (default: tiny,S)")
    p.add_argument("--repeats", type=int, default=7, help="timed pairs (default: 7)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--json", default="benchmarks/results/optimizer.json", help="output JSON (a list of rows)")
    return p.parse_args(argv)


def time_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    for preset in args.presets.split(","):
        cfg = replace(PRESETS[preset], in_channels=16, context_dim=384, pooled_dim=384)
        model = MMDiT(cfg).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        ours = make_optimizer(model, 1e-4, 0.0, device)
        default = torch.optim.AdamW(parameter_groups(model, 0.0), lr=1e-4)
        times: dict[str, list[float]] = {"fused": [], "default": []}
        for i in range(args.repeats + 1):
            pair = (time_step(ours, device), time_step(default, device))
            if i:  # the first pair allocates the moments
                times["fused"].append(pair[0])
                times["default"].append(pair[1])
        fused, base = statistics.median(times["fused"]), statistics.median(times["default"])
        rows.append({"config": preset, "params": sum(p.numel() for p in model.parameters()),
                     "device": device_description(device), "threads": torch.get_num_threads(),
                     "fused_s": fused, "default_s": base, "ratio": fused / base})
    print(f"{'preset':<8}{'params':>10}{'fused ms':>11}{'default ms':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['config']:<8}{r['params'] / 1e6:>9.2f}M{r['fused_s'] * 1e3:>11.1f}{r['default_s'] * 1e3:>12.1f}"
              f"{r['ratio']:>8.3f}")
    print(f"{rows[0]['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
