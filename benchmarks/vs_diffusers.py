"""omnidit's MMDiT against the diffusers transformer that holds the same weights.

For each config, builds omnidit's ``MMDiT`` and the matching diffusers model (``FluxTransformer2DModel`` or
``SD3Transformer2DModel``, constructed from ``omnidit_config_to_<family>`` and loaded strictly from
``omnidit_to_<family>`` of the omnidit weights), checks that one forward matches to 1e-4 (relative to the
largest output), then times both, interleaved A B A B after warm-up, and reports median times:

- ``forward``: one forward under ``torch.inference_mode``;
- ``train_step``: ``omnidit.flow.training_loss`` forward, backward and an AdamW step (one optimizer per side,
  the same fused AdamW on both);
- ``sample``: ``omnidit.sampling.euler`` with ``classifier_free_guidance`` (cond and uncond batched in one
  call). Both sides run this same loop; only the velocity function inside it differs, so the comparison
  is of the transformers. No diffusers pipeline is used (they need text encoders).

Each row has ratio = median omnidit / median diffusers and spread = the interquartile range of the
per-pair ratios (pairs are timed back to back, so load from other jobs hits both sides of a pair). Peak
memory per phase is measured once per side after timing: ``torch.cuda.max_memory_allocated`` growth on
CUDA; on Linux CPUs the growth of the process's peak RSS (``getrusage`` ``ru_maxrss``) after resetting the
peak through ``/proc/self/clear_refs``, else null.

Example:
    python benchmarks/vs_diffusers.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from omnidit.condition import Condition
from omnidit.convert.flux import omnidit_config_to_flux, omnidit_to_flux
from omnidit.convert.sd3 import omnidit_config_to_sd3, omnidit_to_sd3
from omnidit.flow import training_loss
from omnidit.model.mmdit import PRESETS, MMDiT, MMDiTConfig
from omnidit.pipeline import resolve_device
from omnidit.sampling import classifier_free_guidance, euler, initial_noise, timestep_schedule
from omnidit.tokens import image_position_ids, patchify, unpatchify
from omnidit.train import make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import _rss_bytes, _sync, device_description  # noqa: E402

LATENT_CHANNELS = 16  # Flux and SD3 latents
PARITY_TOLERANCE = 1e-4  # max |omnidit - diffusers| / max |diffusers| on one forward
CFG_SCALE = 4.0

# name -> (family, config). The first two run on any device; "sd3-medium" only with --full, on CUDA.
CONFIGS: dict[str, tuple[str, MMDiTConfig]] = {
    "tiny-flux": ("flux", replace(PRESETS["tiny"], in_channels=LATENT_CHANNELS)),
    "S-sd3": ("sd3", replace(PRESETS["S"], in_channels=LATENT_CHANNELS, qk_norm=False, rope=False,
                             pos_table_size=32)),
    "sd3-medium": ("sd3", MMDiTConfig(in_channels=LATENT_CHANNELS, hidden_size=1536, num_heads=24, depth=24,
                                      depth_single=0, context_dim=4096, pooled_dim=2048, qk_norm=False,
                                      rope=False, pos_table_size=192)),
}
METRICS = ("forward", "train_step", "sample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="under 2 minutes on a CPU: 3 repeats, 1 warm-up pair, 10 sampling steps")
    p.add_argument("--full", action="store_true", help="also the SD3-medium-shaped config (skipped on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = CUDA autocast on both sides")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every transformer block on both sides (regional compilation)")
    p.add_argument("--repeats", type=int, default=None, help="timed pairs per metric (default 5, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed pairs first (default 2, --quick 1, --compile 3)")
    p.add_argument("--latent-size", type=int, default=32, help="latent side (32 with patch 2 = 256 tokens)")
    p.add_argument("--text-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=None, help="Euler steps (default 20, --quick 10)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (torch.set_num_threads)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops for one forward")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/vs_diffusers.json"),
                   help="results file: a JSON list of rows (overwritten)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    # torch.compile recompiles once a shape turns out to vary (the CFG batch), so it needs more warm-up.
    args.warmup = args.warmup if args.warmup is not None else (3 if args.compile else 1 if args.quick else 2)
    args.sample_steps = args.sample_steps or (10 if args.quick else 20)
    return args


@dataclass
class Pair:
    """The two models and their velocity functions over one shared input form.

    fn(x, t, cond) -> v: x is (B, N, token_dim) packed tokens for Flux and (B, C, H, W) latents for SD3,
    the form each diffusers model takes; t is (B,) or 0-d in [0, 1].
    """

    omnidit: MMDiT
    diffusers: nn.Module
    omnidit_fn: Callable[[Tensor, Tensor, Condition], Tensor]
    diffusers_fn: Callable[[Tensor, Tensor, Condition], Tensor]
    x_shape: tuple[int, ...]


def build_pair(family: str, cfg: MMDiTConfig, args: argparse.Namespace, device: torch.device) -> Pair:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    model = MMDiT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # leave adaLN-Zero's zero init, else every block is the identity and parity is vacuous
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    state = model.state_dict()
    side, p = args.latent_size, cfg.patch_size
    ids = image_position_ids(side // p, side // p, len(cfg.axes_dim), device=device)
    if family == "flux":
        peer = FluxTransformer2DModel(**omnidit_config_to_flux(cfg))
        peer.load_state_dict(omnidit_to_flux(state, cfg), strict=True)
        txt_ids = torch.zeros(args.text_tokens, len(cfg.axes_dim), device=device)

        def omnidit_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:
            return model(x, ids, t, c)

        def diffusers_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:
            return peer(hidden_states=x, encoder_hidden_states=c.txt, pooled_projections=c.pooled,
                        timestep=t.expand(x.shape[0]), img_ids=ids[0], txt_ids=txt_ids, return_dict=False)[0]

        x_shape = (args.batch, (side // p) ** 2, cfg.token_dim)
    else:
        peer = SD3Transformer2DModel(**omnidit_config_to_sd3(cfg))
        peer.load_state_dict(omnidit_to_sd3(state, cfg), strict=True)

        def omnidit_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:
            return unpatchify(model(patchify(x, p), ids, t, c), side, side, p)

        def diffusers_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:
            # SD3's pipeline passes timestep = 1000 t; omnidit scales t itself.
            return peer(hidden_states=x, encoder_hidden_states=c.txt, pooled_projections=c.pooled,
                        timestep=1000 * t.expand(x.shape[0]), return_dict=False)[0]

        x_shape = (args.batch, cfg.in_channels, side, side)
    return Pair(model.to(device), peer.to(device), omnidit_fn, diffusers_fn, x_shape)


def inputs(cfg: MMDiTConfig, pair: Pair, args: argparse.Namespace, device: torch.device,
           ) -> tuple[Tensor, Condition, Condition, Tensor, Tensor]:
    """x0, cond, null cond (zeros, batch 1), t (B,) and noise; drawn on the CPU from seed 0, then moved."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(pair.x_shape, generator=g)
    cond = Condition(txt=torch.randn(args.batch, args.text_tokens, cfg.context_dim, generator=g),
                     pooled=torch.randn(args.batch, cfg.pooled_dim, generator=g))
    null = Condition(txt=torch.zeros(1, args.text_tokens, cfg.context_dim), pooled=torch.zeros(1, cfg.pooled_dim))
    t = torch.rand(args.batch, generator=g)
    noise = torch.randn(pair.x_shape, generator=g)
    return x0.to(device), cond.to(device), null.to(device), t.to(device), noise.to(device)


def check_parity(pair: Pair, x: Tensor, t: Tensor, cond: Condition) -> float:
    """Relative max difference of one fp32 forward; exits if above PARITY_TOLERANCE."""
    with torch.inference_mode():
        ours, theirs = pair.omnidit_fn(x, t, cond).float(), pair.diffusers_fn(x, t, cond).float()
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    if not rel <= PARITY_TOLERANCE:
        raise SystemExit(f"outputs differ: relative max difference {rel:.2e} > {PARITY_TOLERANCE:g}")
    return rel


def phases(pair: Pair, cfg: MMDiTConfig, args: argparse.Namespace, device: torch.device,
           autocast: contextlib.AbstractContextManager) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """metric -> (omnidit callable, diffusers callable), each running one measured unit of work."""
    x0, cond, null, t, noise = inputs(cfg, pair, args, device)
    ts = timestep_schedule(args.sample_steps, device=device)
    sample_noise = initial_noise(pair.x_shape, seed=0).to(device)

    def make(model: nn.Module, fn: Callable[[Tensor, Tensor, Condition], Tensor]) -> dict[str, Callable[[], None]]:
        # The trainer's optimizer (fused AdamW) on both sides, so that train_step compares the
        # transformers and not the optimizers.
        optimizer = make_optimizer(model, 1e-4, 0.0, device)
        guided = classifier_free_guidance(fn, cond, null, CFG_SCALE)

        def forward() -> None:
            model.eval()
            with torch.inference_mode(), autocast:
                fn(x0, t, cond)

        def train_step() -> None:
            model.train()
            with autocast:
                loss = training_loss(fn, x0, cond, t, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def sample() -> None:
            model.eval()
            with torch.inference_mode(), autocast:
                euler(guided, sample_noise, ts)

        return {"forward": forward, "train_step": train_step, "sample": sample}

    ours, theirs = make(pair.omnidit, pair.omnidit_fn), make(pair.diffusers, pair.diffusers_fn)
    return {m: (ours[m], theirs[m]) for m in METRICS}


def timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(a: Callable[[], None], b: Callable[[], None], repeats: int, warmup: int,
                device: torch.device) -> tuple[list[float], list[float]]:
    """Times of a and b, run A B A B ... after ``warmup`` untimed pairs."""
    for _ in range(warmup):
        a()
        b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(a, device))
        times_b.append(timed(b, device))
    return times_a, times_b


def _reset_rss_peak() -> bool:
    """Return freed heap to the OS and reset this process's peak RSS to its current RSS (Linux only)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory(fn: Callable[[], None], device: torch.device) -> int | None:
    """Bytes by which one call of ``fn`` raises the peak over the memory in use before it (None: unmeasured)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu" or not _reset_rss_peak():
        return None
    base = _rss_bytes()
    fn()
    return max(0, _rss_bytes() - base)


def profile_forward(pair: Pair, cfg: MMDiTConfig, args: argparse.Namespace, device: torch.device) -> None:
    x0, cond, _, t, _ = inputs(cfg, pair, args, device)
    for name, fn in (("omnidit", pair.omnidit_fn), ("diffusers", pair.diffusers_fn)):
        with torch.inference_mode():
            fn(x0, t, cond)
            with torch.profiler.profile() as prof:
                fn(x0, t, cond)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"--- {name}: one forward, top ops by self time")
        print(prof.key_averages().table(sort_by=sort, row_limit=12))


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.dtype == "bf16" and device.type != "cuda":
        raise SystemExit("--dtype bf16 uses CUDA autocast; on this device use --dtype fp32")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())
    names = ["tiny-flux", "S-sd3"] + (["sd3-medium"] if args.full else [])
    if "sd3-medium" in names and device.type != "cuda":
        print("skipping sd3-medium on CPU: two fp32 copies of 2 B parameters, plus AdamW state for training, "
              "do not fit a small machine's memory, and one forward takes tens of seconds")
        names.remove("sd3-medium")
    memory_source = {"cuda": "cuda_max_memory_allocated_growth", "cpu": "rss_peak_growth"}.get(device.type)
    rows = []
    for name in names:
        family, cfg = CONFIGS[name]
        pair = build_pair(family, cfg, args, device)
        x0, cond, _, t, _ = inputs(cfg, pair, args, device)
        rel = check_parity(pair, x0, t, cond)
        print(f"{name}: {family} shape, {sum(p.numel() for p in pair.omnidit.parameters()) / 1e6:.2f} M parameters, "
              f"parity {rel:.1e}")
        if args.profile:
            profile_forward(pair, cfg, args, device)
        if args.compile:
            peer = pair.diffusers
            for block in [*pair.omnidit.double_blocks, *pair.omnidit.single_blocks,
                          *peer.transformer_blocks, *getattr(peer, "single_transformer_blocks", [])]:
                block.compile()
        for metric, (ours, theirs) in phases(pair, cfg, args, device, autocast).items():
            times_a, times_b = interleaved(ours, theirs, args.repeats, args.warmup, device)
            ratios = [a / b for a, b in zip(times_a, times_b)]
            q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (0, 0, 0)
            med_a, med_b = statistics.median(times_a), statistics.median(times_b)
            mem_a, mem_b = peak_memory(ours, device), peak_memory(theirs, device)
            rows.append({
                "config": name, "metric": metric, "device": device.type, "omnidit_s": med_a, "diffusers_s": med_b,
                "ratio": med_a / med_b, "spread": q3 - q1,
                "omnidit_peak_bytes": mem_a, "diffusers_peak_bytes": mem_b,
                "memory_source": memory_source if mem_a is not None else None,
                "family": family, "parity_rel": rel, "batch": args.batch, "latent_size": args.latent_size,
                "patch": cfg.patch_size, "text_tokens": args.text_tokens,
                "sample_steps": args.sample_steps if metric == "sample" else None,
                "dtype": args.dtype, "compile": args.compile, "repeats": args.repeats, "warmup": args.warmup,
                "threads": torch.get_num_threads(), "device_name": device_description(device),
                "torch": torch.__version__, "diffusers": _diffusers_version(),
                "command": "python benchmarks/vs_diffusers.py " + shlex.join(sys.argv[1:]),
            })
            print_rows(rows[-1:], header=False)
        del pair
    return rows


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def print_rows(rows: list[dict], header: bool = True) -> None:
    def mib(b: int | None) -> str:
        return "n/a" if b is None else f"{b / 2**20:.0f}"

    if header:
        print(f"{'config':<11} {'metric':<11} {'omnidit ms':>11} {'diffusers ms':>13} {'ratio':>6} {'IQR':>6} "
              f"{'omni MiB':>9} {'diff MiB':>9}")
    for r in rows:
        print(f"{r['config']:<11} {r['metric']:<11} {1e3 * r['omnidit_s']:>11.1f} {1e3 * r['diffusers_s']:>13.1f} "
              f"{r['ratio']:>6.3f} {r['spread']:>6.3f} {mib(r['omnidit_peak_bytes']):>9} "
              f"{mib(r['diffusers_peak_bytes']):>9}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    rows = run(args)
    if rows:
        r = rows[0]
        print(f"\n{r['device_name']}, torch {r['torch']}, diffusers {r['diffusers']}, {r['threads']} threads, "
              f"{r['dtype']}, batch {r['batch']}, {r['latent_size']}x{r['latent_size']} latents, "
              f"{r['text_tokens']} text tokens, {args.repeats} repeats; ratio = omnidit / diffusers "
              f"({time.perf_counter() - start:.0f} s)")
        print_rows(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
