"""Quantized sampling (omnidit quantize) against float32 in one run: images/s and the shapes suite's score of the
shipped model as float32, w8a8 (dynamic int8; also with SmoothQuant balancing at alpha 0.5), bf16 (bfloat16
autocast), fp8 (float8 e4m3 products: a scheme for GPUs, computed without fp8 hardware on CPUs), and the
weight-only w8, w4 and w4 with Hadamard rotation (w4-rot), plus the time of one sampling call of a wider random
model of the same shape family, where the matrices are large enough for int8 kernels to pay, and of random models
of named presets (``--preset S``).
Per scheme also: the folder's size, the model's tensors in memory, and the blocks' linear weights' relative
error (dequantized against float32).

**Peer: internal** (float32 of the same weights, the same prompts and seeds). Timings alternate the schemes
``--repeats`` times and keep each one's best, so a busy machine slows all of them alike.

Example:
    python benchmarks/quantize.py --limit 4
    python benchmarks/quantize.py --wide 0 --preset S --schemes w8a8,bf16 --json benchmarks/results/quantize_S.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from omnidit.checkpoint import save_checkpoint
from omnidit.config import config_from_dict
from omnidit.evaluate.runner import evaluate_model
from omnidit.model import MMDiT
from omnidit.pipeline import load_pipeline
from omnidit.quantize import WeightOnlyLinear, _block_linears, quantize_folder, rotate_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import run_meta, write_report  # noqa: E402

VARIANTS = {  # label: quantize_folder's keyword arguments
    "w8a8": {"scheme": "w8a8"}, "w8a8-smooth": {"scheme": "w8a8", "smooth": 0.5}, "bf16": {"scheme": "bf16"},
    "fp8": {"scheme": "fp8"},
    "w8": {"scheme": "w8"}, "w4": {"scheme": "w4"}, "w4-rot": {"scheme": "w4", "rotate": True}}
PROMPTS = ["a red circle above a blue square", "two green triangles", "a small purple diamond",
           "a yellow square to the left of a cyan circle"] * 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="a shipped model name or model folder (default shapes)")
    p.add_argument("--limit", type=int, default=4, help="prompts per suite category for the score (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds, best kept (default 3)")
    p.add_argument("--wide", type=int, default=768, help="hidden size of the wider random model; 0 skips it "
                                                         "(default 768)")
    p.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help="also time a random model of this preset (e.g. S) at 32x32, patch 4 (repeatable)")
    p.add_argument("--schemes", default=",".join(VARIANTS), help=f"which to run (default {','.join(VARIANTS)})")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/quantize.json"))
    return p.parse_args(argv)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def wide_model(folder: Path, hidden: int) -> Path:
    """A random model like the shipped one but ``hidden`` wide (heads of 64), as a model folder."""
    return random_model(folder, {"preset": "tiny", "hidden_size": hidden, "num_heads": hidden // 64,
                                 "axes_dim": [16, 24, 24], "depth": 2, "depth_single": 4, "patch_size": 4})


def random_model(folder: Path, section: dict) -> Path:
    """A random model of the ``section`` model config (e.g. ``{"preset": "S"}``) on the shipped model's data
    (32x32 shapes, its text encoder), as a model folder."""
    config = config_from_dict({"model": section, "data": {"name": "shapes", "width": 32, "height": 32},
                               "sample": {"steps": 30, "cfg": 4.0}})
    torch.manual_seed(0)
    model = MMDiT(config.model)
    return save_checkpoint(folder, config, model.state_dict())


def tensor_mib(model: torch.nn.Module) -> float:
    """The model's parameters and buffers in memory (int8 / packed int4 weights count at their size)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return total / 2**20


def weight_error(model: torch.nn.Module, reference: torch.nn.Module) -> float | None:
    """Mean over the blocks' linears of |W_dequantized - W| / |W| (weight-only schemes; None otherwise)."""
    errors = []
    for name, dense in _block_linears(reference, modulation=True).items():
        layer = model.get_submodule(name)
        if not isinstance(layer, WeightOnlyLinear):
            return None
        restored = layer.dequantized()
        restored = rotate_groups(restored, layer.group) if layer.rotate else restored  # H H = I
        errors.append(float((restored - dense.weight).norm() / dense.weight.norm()))
    return sum(errors) / len(errors)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    plain = {"candidates": 1, "skip_scale": 0.0}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = [("shapes", args.model)]
        if args.wide:
            models.append((f"random width {args.wide}", wide_model(tmp / "wide", args.wide)))
        for preset in args.preset:
            models.append((f"random {preset}", random_model(tmp / f"preset-{preset}", {"preset": preset,
                                                                                       "patch_size": 4})))
        chosen = [v.strip() for v in args.schemes.split(",") if v.strip()]
        for label, source in models:
            folders = {"fp32": source}
            for variant in chosen:
                folders[variant] = quantize_folder(source, tmp / f"{label}-{variant}".replace(" ", "_"),
                                                   **VARIANTS[variant])
            pipes = {name: load_pipeline(folder, device="cpu") for name, folder in folders.items()}
            for pipe in pipes.values():  # warm up
                pipe.generate(PROMPTS[:2], seed=0, steps=2, **plain)
            timed = {name: [] for name in pipes}
            for _ in range(args.repeats):  # alternate, so a busy machine slows every scheme alike
                for name, pipe in pipes.items():
                    timed[name].append(best_time(lambda p=pipe: p.generate(PROMPTS, seed=0, **plain), 1))
            reference = pipes["fp32"].generate(PROMPTS, seed=0, **plain)
            for name, pipe in pipes.items():
                row = {"model": label, "scheme": name, "seconds": min(timed[name]),
                       "images_per_s": len(PROMPTS) / min(timed[name]),
                       "mean_abs_diff": float((pipe.generate(PROMPTS, seed=0, **plain) - reference).abs().mean()),
                       "mib": sum(f.stat().st_size for f in Path(folders[name] if name != "fp32" else
                                                                  pipe.model_dir).iterdir() if f.is_file()) / 2**20,
                       "tensor_mib": tensor_mib(pipe.model),
                       "weight_error": weight_error(pipe.model, pipes["fp32"].model)}
                if label == "shapes":
                    report = evaluate_model(pipe, "shapes", n_per_prompt=1, limit=args.limit, progress=False,
                                            frechet=False, **plain)
                    row["overall"] = report.overall
                rows.append(row)
                print(f"{label} {name}: {row['images_per_s']:.1f} images/s, overall {row.get('overall', '-')}")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["scheme"] == "fp32")
        r["speedup"] = base["seconds"] / r["seconds"]
    meta = run_meta("quantize.py", argv, torch.device("cpu"), start, limit=args.limit, repeats=args.repeats,
                    images_per_call=len(PROMPTS))
    print(f"\n{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads; {len(PROMPTS)} images per "
          f"call, 30 steps with guidance, one candidate; best of {args.repeats}")
    print(f"{'model':<18} {'scheme':<11} {'images/s':>9} {'speedup':>8} {'|diff|':>7} {'MiB':>6} {'mem MiB':>8} "
          f"{'W err':>6} {'overall':>8}")
    for r in rows:
        overall = f"{r['overall']:.3f}" if "overall" in r else "-"
        error = f"{r['weight_error']:.4f}" if r["weight_error"] is not None else "-"
        print(f"{r['model']:<18} {r['scheme']:<11} {r['images_per_s']:>9.1f} {r['speedup']:>7.2f}x "
              f"{r['mean_abs_diff']:>7.3f} {r['mib']:>6.1f} {r['tensor_mib']:>8.1f} {error:>6} {overall:>8}")
    write_report(args.json, meta, rows)


if __name__ == "__main__":
    main()
