"""Speed and peak memory of a 2-second clip with sound, per generation direction, for the shapes-av architecture.

Builds ``MMDiT`` from the model section of configs/shapes_av.json (random weights: the speed does not depend on
them; 32x32 at 8 fps, 64 picture tokens per frame, 200 samples of 8 kHz sound per token), wraps it in
``omnidit.pipeline.Pipeline`` with the MiniLM text encoder, and times ``pipe.generate_av`` on 16 frames (2 s:
1,024 picture tokens and 80 sound tokens) in every direction: text -> clip with sound, video -> audio (the clip
given), audio -> video (the sound given), extension (the first 8 frames and their sound given), and sound
alone (2 s, 80 tokens). **Peer: internal.** Each is compared with ``pipe.generate_video`` of the same 16
frames on the same model without its sound stream (the picture-only path a video model runs), so the ratio
says what sound adds. Each round runs every job once in a rotating order after one untimed warm-up round;
ratios are medians over rounds with their interquartile range. Peak memory is the RSS growth of one call
(Linux CPU; ``torch.cuda.max_memory_allocated`` growth on CUDA).

Example:
    python benchmarks/av_generation.py --quick
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from omnidit.config import load_config
from omnidit.model.mmdit import MMDiT
from omnidit.pipeline import Pipeline, resolve_device
from omnidit.text import load_text_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import device_description  # noqa: E402
from video_generation import _iqr  # noqa: E402
from vs_diffusers import peak_memory, timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FRAMES, FPS, SECONDS = 16, 8.0, 2.0
CFG_SCALE = 4.0
PROMPT = "a red circle moving to the right quickly"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/shapes_av.json")
    p.add_argument("--quick", action="store_true", help="10 sampling steps and 2 timed rounds")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30, --quick 10)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3, --quick 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/av_generation.json"),
                   help="results file: a JSON object with the machine, the command and the rows (overwritten)")
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.quick else 30)
    args.rounds = args.rounds or (2 if args.quick else 3)
    return args


def jobs(pipe: Pipeline, steps: int) -> dict[str, tuple[int, Callable[[], None]]]:
    """name -> (tokens generated or given, the call)."""
    dc = pipe.config.data
    g = torch.Generator().manual_seed(0)
    video = torch.rand((1, 3, FRAMES, dc.height, dc.width), generator=g) * 2 - 1
    audio = (torch.rand((1, 1, int(SECONDS * dc.sample_rate)), generator=g) * 2 - 1) * 0.4
    common = dict(frames=FRAMES, fps=FPS, steps=steps, cfg=CFG_SCALE, seed=0)
    picture = FRAMES * (dc.height // pipe.model.config.patch_size) * (dc.width // pipe.model.config.patch_size)
    sound = int(SECONDS * dc.sample_rate) // pipe.model.config.extra_streams["audio"]
    return {
        "video only": (picture, lambda: pipe.generate_video([PROMPT], **common)),
        "text -> av": (picture + sound, lambda: pipe.generate_av([PROMPT], **common)),
        "video -> audio": (picture + sound, lambda: pipe.generate_av([PROMPT], video=video, **common)),
        "audio -> video": (picture + sound, lambda: pipe.generate_av([PROMPT], audio=audio, **common)),
        "extend": (picture + sound, lambda: pipe.generate_av([PROMPT], video=video, audio=audio,
                                                             given_frames=range(FRAMES // 2), **common)),
        "sound alone": (sound, lambda: pipe.generate_av(["a short low beep then a long high beep"], audio_only=True,
                                                        seconds=SECONDS, steps=steps, cfg=CFG_SCALE, seed=0)),
    }


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    torch.manual_seed(0)
    model = MMDiT(config.model).to(device).eval()
    pipe = Pipeline(model, config, load_text_encoder(config.text.encoder, config.text.max_length, device), device)
    table = jobs(pipe, args.steps)
    names = list(table)
    for name in names:  # warm-up round
        table[name][1]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(table[name][1], device))
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))
    meta = {"device": device.type, "device_name": device_description(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds, "cfg": CFG_SCALE,
            "frames": FRAMES, "fps": FPS, "seconds_of_clip": SECONDS, "sample_rate": config.data.sample_rate,
            "params": sum(p.numel() for p in model.parameters()), "config": str(args.config),
            "memory_source": {"cuda": "cuda_max_memory_allocated_growth", "cpu": "rss_peak_growth"}.get(device.type),
            "command": "python benchmarks/av_generation.py " + shlex.join(sys.argv[1:])}
    rows = []
    for name in names:
        ratio = [a / b for a, b in zip(times[name], times["video only"])]
        seconds = statistics.median(times[name])
        rows.append({"job": name, "tokens": table[name][0], "seconds_per_clip": seconds,
                     "seconds_all": times[name], "seconds_per_step": seconds / args.steps,
                     "ratio_to_video_only": statistics.median(ratio), "ratio_to_video_only_iqr": _iqr(ratio),
                     "peak_bytes": peak_memory(table[name][1], device)})
    return meta, rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    meta, rows = run(args)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\n{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads, {meta['params'] / 1e6:.2f} M "
          f"parameters, {args.steps} steps, CFG {CFG_SCALE:g}, a {SECONDS:g} s clip ({FRAMES} frames at {FPS:g} fps, "
          f"{meta['sample_rate']} Hz), {args.rounds} rounds ({meta['seconds']:.0f} s); ratios = median per round")
    print(f"{'job':<15} {'tokens':>6} {'s/clip':>7} {'s/step':>7} {'vs video only':>14} {'peak MiB':>9}")
    for r in rows:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        print(f"{r['job']:<15} {r['tokens']:>6} {r['seconds_per_clip']:>7.2f} {r['seconds_per_step']:>7.3f} "
              f"{r['ratio_to_video_only']:>8.2f}±{r['ratio_to_video_only_iqr']:<5.2f} {peak:>9}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
