"""Training throughput of the omnidit MMDiT: images/s, tokens/s, achieved TFLOP/s and MFU.

Times full training steps of the real model: ``omnidit.flow.training_loss`` forward, backward and
an AdamW step (``omnidit.train.make_optimizer``, as the trainer does; no EMA update, no data
loading), on one fixed batch of synthetic random latents and conditioning. Warmup steps (which also absorb
``torch.compile``) are not timed; CUDA is synchronised around the timed loop.

The peer this benchmark compares against is the device's theoretical dense peak (the datasheet
table ``omnidit.flops.PEAK_TFLOPS``, or ``--peak-tflops``); the ratio it reports is MFU = achieved
model FLOP/s / peak, with model FLOPs from ``omnidit.flops.training_flops`` (3x the analytic
forward). On a CPU there is no table entry, so MFU is null unless ``--peak-tflops`` is given.

Latent space as in DiT: a ``--resolution`` 256 image is a 32x32x4 latent (``--latent-factor`` 8,
``--in-channels`` 4), so with ``--patch`` 2 it is 256 tokens, the same as DiT-XL/2 at 256 px.
``--text-tokens`` 0 gives a class-conditional model (1000 classes, no text stream, as DiT);
otherwise the model reads MiniLM-sized text (384-d tokens and pooled vector).

Example:
    python benchmarks/train_throughput.py --preset XL --resolution 256 --batch 32 --dtype bf16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from omnidit.condition import Condition
from omnidit.flops import estimate_training_memory, flops_per_image, mfu, parameter_count, peak_tflops
from omnidit.flow import training_loss
from omnidit.model.mmdit import PRESETS, MMDiT, MMDiTConfig
from omnidit.pipeline import resolve_device
from omnidit.tokens import check_image_size, image_position_ids
from omnidit.train import make_optimizer

TEXT_DIM = 384  # the packaged MiniLM text encoder's token and pooled width
NUM_CLASSES = 1000  # ImageNet-sized label table for the class-conditional (--text-tokens 0) model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (square)")
    p.add_argument("--latent-factor", type=int, default=8,
                   help="pixels per latent cell (8 = SD VAE; 1 = pixel space)")
    p.add_argument("--patch", type=int, default=2, help="patch size on the latent grid")
    p.add_argument("--in-channels", type=int, default=4, help="latent channels")
    p.add_argument("--text-tokens", type=int, default=32,
                   help="text tokens per sample (32 = the trainer's text.max_length); 0 = class-conditional")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 = autocast on CUDA (parameters and AdamW stay float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (regional compilation)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (torch.set_num_threads); default: torch's choice, one per core")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak TFLOP/s for MFU")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/train_throughput.json"),
                   help="results file: a JSON list of rows; this run's row is appended")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> MMDiTConfig:
    text = args.text_tokens > 0
    return replace(PRESETS[args.preset], in_channels=args.in_channels, patch_size=args.patch,
                   context_dim=TEXT_DIM if text else 0, pooled_dim=TEXT_DIM if text else 0,
                   num_classes=0 if text else NUM_CLASSES)


def synthetic_batch(cfg: MMDiTConfig, batch: int, tokens: int, text_tokens: int, device: torch.device,
                    seed: int = 0) -> tuple[torch.Tensor, Condition, torch.Tensor, torch.Tensor]:
    """Random x0 (B, N, token_dim), condition, t (B,) and noise, drawn on the CPU then moved."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, tokens, cfg.token_dim, generator=g)
    cond = Condition()
    if text_tokens:
        cond.txt = torch.randn(batch, text_tokens, cfg.context_dim, generator=g)
        cond.pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    else:
        cond.labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    t = torch.rand(batch, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0.to(device), cond.to(device), t.to(device), noise.to(device)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def run_meta(script: str, argv: list[str] | None, device: torch.device, start: float, **fields) -> dict:
    """The header every benchmark's JSON carries: machine, torch, threads, its own fields, wall time, command."""
    return {"device_name": device_description(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), **fields, "seconds": round(time.perf_counter() - start, 1),
            "command": f"python benchmarks/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)}


def write_report(path: Path, meta: dict, rows: list[dict]) -> None:
    """Write {**meta, "rows": rows} as JSON and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


def _rss_bytes() -> int:
    # Peak resident set size of this process so far; Linux reports KiB, macOS bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.dtype == "bf16" and device.type != "cuda":
        raise SystemExit("--dtype bf16 uses CUDA autocast; on this device use --dtype fp32")
    if args.resolution % args.latent_factor:
        raise SystemExit(f"--resolution {args.resolution} is not a multiple of --latent-factor {args.latent_factor}")
    cfg = build_config(args)
    side = args.resolution // args.latent_factor
    check_image_size(side, side, cfg.patch_size)
    grid = side // cfg.patch_size
    tokens, text_tokens = grid * grid, args.text_tokens

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_bytes()
    torch.manual_seed(0)
    model = MMDiT(cfg).to(device).train()
    if args.compile:
        for block in [*model.double_blocks, *model.single_blocks]:
            block.compile()
    optimizer = make_optimizer(model, 1e-4, 0.0, device)
    ids = image_position_ids(grid, grid, len(cfg.axes_dim), device=device)
    x0, cond, t, noise = synthetic_batch(cfg, args.batch, tokens, text_tokens, device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def step() -> torch.Tensor:
        with autocast:
            loss = training_loss(lambda x, tt, c: model(x, ids, tt, c), x0, cond, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    _sync(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    loss_value = float(loss)

    if device.type == "cuda":
        peak_memory, memory_source = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        growth = _rss_bytes() - rss_before
        peak_memory, memory_source = (growth, "rss_peak_growth") if growth > 0 else (None, None)

    per_image = flops_per_image(cfg, side, side, text_tokens)
    step_s = sum(times) / len(times)
    achieved = per_image["train"] * args.batch / step_s
    if args.peak_tflops is not None:
        peak = args.peak_tflops
    elif device.type == "cuda":
        # float32 matmuls run on the non-tensor FP32 units unless TF32 is allowed.
        precision = "bf16" if args.dtype == "bf16" else (
            "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32")
        peak = peak_tflops(torch.cuda.get_device_name(device), precision)
    else:
        peak = None
    estimate = estimate_training_memory(cfg, args.batch, tokens, text_tokens, ema=False,
                                        activation_bytes=2 if args.dtype == "bf16" else 4)
    return {
        "preset": args.preset, "resolution": args.resolution, "latent_factor": args.latent_factor,
        "patch": cfg.patch_size, "in_channels": cfg.in_channels, "image_tokens": tokens,
        "text_tokens": text_tokens, "batch": args.batch, "dtype": args.dtype, "compile": args.compile,
        "steps": args.steps, "warmup": args.warmup,
        "device": device.type, "device_name": device_description(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": parameter_count(cfg),
        "forward_gflops_per_image": per_image["forward"] / 1e9, "train_gflops_per_image": per_image["train"] / 1e9,
        "step_ms": 1e3 * step_s, "step_ms_median": 1e3 * statistics.median(times),
        "images_per_s": args.batch / step_s, "image_tokens_per_s": args.batch * tokens / step_s,
        "achieved_tflops": achieved / 1e12, "peak_tflops": peak,
        "mfu": None if peak is None else mfu(achieved, peak),
        "peak_memory_bytes": peak_memory, "memory_source": memory_source,
        "estimated_memory_bytes": sum(estimate.values()), "final_loss": loss_value,
        "command": "python benchmarks/train_throughput.py " + shlex.join(sys.argv[1:]),
    }


def print_report(row: dict) -> None:
    gib = 2**30
    print(f"device: {row['device_name']}  torch {row['torch']}  {row['threads']} CPU threads")
    print(f"model: {row['preset']}  {row['params'] / 1e6:.2f} M parameters  "
          f"{row['image_tokens']} image + {row['text_tokens']} text tokens "
          f"({row['resolution']} px / latent factor {row['latent_factor']} / patch {row['patch']})")
    print(f"analytic GFLOPs per image: forward {row['forward_gflops_per_image']:.3f}, "
          f"train step {row['train_gflops_per_image']:.3f}")
    mem = "n/a" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / gib:.2f}"
    columns = [
        ("batch", f"{row['batch']}"), ("dtype", row["dtype"]), ("compile", str(row["compile"])),
        ("step ms", f"{row['step_ms']:.1f}"), ("median ms", f"{row['step_ms_median']:.1f}"),
        ("img/s", f"{row['images_per_s']:.2f}"),
        ("tok/s", f"{row['image_tokens_per_s']:.0f}"), ("TFLOP/s", f"{row['achieved_tflops']:.4f}"),
        ("peak", "n/a" if row["peak_tflops"] is None else f"{row['peak_tflops']:g}"),
        ("MFU", "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"),
        ("mem GiB", mem), ("est GiB", f"{row['estimated_memory_bytes'] / gib:.2f}"),
    ]
    print("  ".join(f"{name:>{max(len(name), len(value))}}" for name, value in columns))
    print("  ".join(f"{value:>{max(len(name), len(value))}}" for name, value in columns))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    row = run(args)
    print_report(row)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows + [row], indent=2) + "\n")
    print(f"appended to {args.json}")


if __name__ == "__main__":
    main()
