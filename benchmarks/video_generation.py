"""Video sampling speed and peak memory of the shapes_video architecture for 8, 16 and 32 frames.

Builds ``MMDiT`` from the model section of configs/shapes_video.json (random weights: the speed does not
depend on them), wraps it in ``omnidit.pipeline.Pipeline`` with that config and the MiniLM text encoder
(``text.max_length`` 32), and times ``pipe.generate_video([prompt], frames=F, fps=8, steps=S, cfg=4)`` at
32x32 (patch 4, temporal patch 1: 64 tokens per frame; no skip-layer guidance, whatever the config's sample
section says), next to ``pipe.generate([prompt], steps=S, cfg=4)``
(the same model on one frame: the image model's 64-token path). Each round runs the image and every frame
count once, in a rotating order, after one untimed warm-up round; per-round ratios to 8 frames and to the
image are reported as medians with their interquartile range, since load from other jobs hits a whole
round about equally.

**Peer: internal.** How generation scales from 8 to 16 to 32 frames (tokens x2 and x4), and against the
64-token image path. Per frame count the script also reports the peak RSS growth of one clip (Linux CPU;
``torch.cuda.max_memory_allocated`` growth on CUDA) and the analytic attention score matrix, 2 (the CFG
batch) x heads x N_total^2 x 4 bytes with N_total = video tokens + text tokens, together with the measured
peak of one ``F.scaled_dot_product_attention`` call of exactly that shape (with the text key mask that
guidance passes) and the attention kernel the profiler saw, which says whether torch materialises the
score matrix. GFLOP/step is ``omnidit.flops.forward_flops`` of one guided forward (batch 2).

Example:
    python benchmarks/video_generation.py --quick --threads 1
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
import torch.nn.functional as F

from omnidit.condition import Condition
from omnidit.config import load_config
from omnidit.flops import forward_flops
from omnidit.model.mmdit import MMDiT
from omnidit.pipeline import Pipeline, resolve_device
from omnidit.text import load_text_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import device_description  # noqa: E402
from vs_diffusers import peak_memory, timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FRAMES = (8, 16, 32)
FPS = 8.0
CFG_SCALE = 4.0
PROMPT = "a red circle moving to the right"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/shapes_video.json")
    p.add_argument("--quick", action="store_true", help="10 sampling steps and 2 timed rounds")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30, --quick 10)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3, --quick 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/video_generation.json"),
                   help="results file: a JSON object with the machine, the command and the rows (overwritten)")
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.quick else 30)
    args.rounds = args.rounds or (2 if args.quick else 3)
    return args


def guided_text(pipe: Pipeline) -> Condition:
    """The text of the guided batch, as ``classifier_free_guidance`` builds it: the prompt and the empty
    prompt padded to one length, with a key mask unless it masks nothing."""
    cond, null = pipe.conditions([PROMPT])
    return Condition.cat([cond, null]).without_full_mask()


def attention_probe(heads: int, video_tokens: int, head_dim: int, text: Condition, device: torch.device) -> dict:
    """Peak memory and kernels of one SDPA call of the model's shape for the guided batch (2, heads, N, N)."""
    batch, n_txt = text.txt.shape[:2]
    tokens = video_tokens + n_txt
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g).to(device) for _ in range(3))
    mask = None
    if text.txt_mask is not None:  # as MMDiT.forward builds it: every video key, the unpadded text keys
        video = torch.ones(batch, video_tokens, dtype=torch.bool, device=device)
        mask = torch.cat([video, text.txt_mask.to(device)], dim=1)[:, None, None, :]

    def call() -> None:
        with torch.inference_mode():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    call()
    with torch.profiler.profile() as prof:
        call()
    kernels = sorted({e.key for e in prof.key_averages() if "attention" in e.key or "softmax" in e.key})
    return {"peak_bytes": peak_memory(call, device), "ops": kernels,
            "materialises": any("math" in k or "softmax" in k for k in kernels)}


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    mc = config.model
    torch.manual_seed(0)
    model = MMDiT(mc).to(device).eval()
    pipe = Pipeline(model, config, load_text_encoder(config.text.encoder, config.text.max_length, device), device)
    text = guided_text(pipe)
    n_txt, masked = text.txt.shape[1], text.txt_mask is not None
    per_frame = (config.data.height // mc.patch_size) * (config.data.width // mc.patch_size)

    # One guided forward of batch 2 per step, whatever the config's sample section adds (skip-layer guidance since
    # 2026-12-07): the figures in docs/benchmarks.md are of that.
    def image() -> None:
        pipe.generate([PROMPT], steps=args.steps, cfg=CFG_SCALE, seed=0, skip_scale=0.0)

    def clip(frames: int) -> Callable[[], None]:
        return lambda: pipe.generate_video([PROMPT], frames=frames, fps=FPS, steps=args.steps, cfg=CFG_SCALE, seed=0,
                                           skip_scale=0.0)

    jobs: dict[str, tuple[int, Callable[[], None]]] = {"image": (1, image)}
    jobs.update({f"{f} frames": (f, clip(f)) for f in FRAMES})
    names = list(jobs)
    for name in names:  # warm-up round
        jobs[name][1]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate, so no job always runs first
        for name in order:
            times[name].append(timed(jobs[name][1], device))
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))

    meta = {"device": device.type, "device_name": device_description(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds, "cfg": CFG_SCALE,
            "fps": FPS, "prompt": PROMPT, "config": str(args.config), "text_tokens": n_txt, "text_mask": masked,
            "params": sum(p.numel() for p in model.parameters()), "hidden_size": mc.hidden_size,
            "num_heads": mc.num_heads, "depth": mc.depth, "depth_single": mc.depth_single,
            "memory_source": {"cuda": "cuda_max_memory_allocated_growth", "cpu": "rss_peak_growth"}.get(device.type),
            "command": "python benchmarks/video_generation.py " + shlex.join(sys.argv[1:])}
    rows = []
    for name in names:
        frames = jobs[name][0]
        video_tokens = frames // mc.temporal_patch * per_frame
        tokens = video_tokens + n_txt
        to_8 = [a / b for a, b in zip(times[name], times["8 frames"])]
        to_image = [a / b for a, b in zip(times[name], times["image"])]
        seconds = statistics.median(times[name])
        probe = attention_probe(mc.num_heads, video_tokens, mc.head_dim, text, device)
        rows.append({
            "job": name, "frames": frames, "video_tokens": video_tokens, "total_tokens": tokens,
            "seconds_per_clip": seconds, "seconds_all": times[name], "seconds_per_step": seconds / args.steps,
            "frames_per_s": frames / seconds, "gflop_per_step": forward_flops(mc, video_tokens, n_txt, batch=2) / 1e9,
            "ratio_to_8_frames": statistics.median(to_8), "ratio_to_8_frames_iqr": _iqr(to_8),
            "ratio_to_image": statistics.median(to_image), "ratio_to_image_iqr": _iqr(to_image),
            "peak_bytes": peak_memory(jobs[name][1], device),
            "attention_scores_bytes": 2 * mc.num_heads * tokens**2 * 4,
            "sdpa_peak_bytes": probe["peak_bytes"], "sdpa_ops": probe["ops"],
            "sdpa_materialises_scores": probe["materialises"],
        })
    return meta, rows


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def print_rows(rows: list[dict]) -> None:
    def mib(b: int | None) -> str:
        return "n/a" if b is None else f"{b / 2**20:.1f}"

    print(f"{'job':<10} {'tokens':>12} {'GFLOP/step':>10} {'s/clip':>7} {'s/step':>7} {'frames/s':>8} {'vs 8 fr':>12} "
          f"{'vs image':>13} {'peak MiB':>8} {'scores MiB':>10} {'SDPA MiB':>8}")
    for r in rows:
        print(f"{r['job']:<10} {r['video_tokens']:>5} + {r['total_tokens'] - r['video_tokens']:<4} "
              f"{r['gflop_per_step']:>10.2f} {r['seconds_per_clip']:>7.2f} {r['seconds_per_step']:>7.3f} "
              f"{r['frames_per_s']:>8.2f} "
              f"{r['ratio_to_8_frames']:>6.2f}±{r['ratio_to_8_frames_iqr']:<5.2f} "
              f"{r['ratio_to_image']:>7.2f}±{r['ratio_to_image_iqr']:<5.2f} {mib(r['peak_bytes']):>8} "
              f"{mib(r['attention_scores_bytes']):>10} {mib(r['sdpa_peak_bytes']):>8}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    meta, rows = run(args)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\n{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads, {meta['params'] / 1e6:.2f} M "
          f"parameters, {args.steps} steps, CFG {CFG_SCALE:g} (batch 2), {meta['text_tokens']} text tokens "
          f"(mask: {meta['text_mask']}), {args.rounds} rounds ({meta['seconds']:.0f} s); ratios = median per round")
    print_rows(rows)
    ops = {op for r in rows for op in r["sdpa_ops"]}
    print(f"SDPA kernels seen: {', '.join(sorted(ops))}; materialises the score matrix: "
          f"{any(r['sdpa_materialises_scores'] for r in rows)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
