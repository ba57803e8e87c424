"""Analytic FLOPs of an MMDiT forward, checked against PyTorch's FLOP counter, and the fraction of the
machine's measured matmul peak that the forward achieves.

The peer here is the machine itself: a large square matmul measured in the same run sets the peak, and the
model's achieved FLOP/s is reported as a ratio of it.

    python benchmarks/flops.py --preset tiny --resolution 64 --batch 8
    python benchmarks/flops.py --preset S --resolution 64 --batch 4 --json benchmarks/results/flops.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import build_config, device_description, synthetic_batch  # noqa: E402

from omnidit.flops import forward_flops  # noqa: E402
from omnidit.model.mmdit import PRESETS, MMDiT  # noqa: E402
from omnidit.pipeline import resolve_device  # noqa: E402
from omnidit.tokens import image_position_ids  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default: tiny)")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--latent-factor", type=int, default=8, help="VAE downsampling factor (default: 8)")
    p.add_argument("--patch", type=int, default=2, help="patch size (default: 2)")
    p.add_argument("--in-channels", type=int, default=4, help="latent channels (default: 4)")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens; 0 = class-conditional (default: 32)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default: 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards (default: 5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--json", default="benchmarks/results/flops.json", help="output JSON (a list of rows)")
    return p.parse_args(argv)


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of an fp32 size x size matmul: the machine's practical peak."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 / _median_seconds(lambda: a @ b, repeats, device)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    cfg = build_config(args)
    grid = args.resolution // args.latent_factor // args.patch
    torch.manual_seed(0)
    model = MMDiT(cfg).to(device).eval()
    x, cond, t, _ = synthetic_batch(cfg, args.batch, grid * grid, args.text_tokens, device)
    ids = image_position_ids(grid, grid, len(cfg.axes_dim), device=device)
    analytic = forward_flops(cfg, grid * grid, args.text_tokens, args.batch)
    with torch.enable_grad():  # as training computes: inference pads products of few rows (layers.linear)
        # The math backend runs attention as bmm, which the counter sees (CPU's fused kernel counts 0).
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, ids, t, cond)
    with torch.inference_mode():
        seconds = _median_seconds(lambda: model(x, ids, t, cond), args.repeats, device)
    peak = matmul_peak(device)
    return {"preset": args.preset, "resolution": args.resolution, "tokens": grid * grid,
            "text_tokens": args.text_tokens, "batch": args.batch, "device": device_description(device),
            "analytic_flops": analytic, "counted_flops": counter.get_total_flops(),
            "analytic_over_counted": analytic / counter.get_total_flops(), "forward_s": seconds,
            "achieved_tflops": analytic / seconds / 1e12, "matmul_peak_tflops": peak / 1e12,
            "fraction_of_peak": analytic / seconds / peak, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    row = run(args)
    for key, value in row.items():
        print(f"{key:22s} {value:.4g}" if isinstance(value, float) else f"{key:22s} {value}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(rows + [row], indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
