"""Step caching against diffusers' cache hooks on the same weights, scored by the same exact judge.

**Peer: diffusers** (``FluxTransformer2DModel`` holding the shipped shapes model's weights through
``omnidit.convert.flux``, with ``FirstBlockCacheConfig`` / ``TaylorSeerCacheConfig`` from ``enable_cache``).
Both sides run the same sampling loop (``Pipeline.generate``: the model's Euler schedule, classifier-free
guidance with the conditional and unconditional rows in one call, one candidate, no skip-layer guidance),
the same prompts and seeds, and the shapes suite judges their images. Only the velocity network differs:
omnidit's ``MMDiT`` with its own step cache, or the diffusers model (text padding passed as its attention
mask) with a diffusers cache hook, reset before each sampling run. Before timing, one uncached run of each
side must agree to 1e-3 in pixels (they hold the same weights).

Each job's images/s is over the suite's whole sampling and judging (the judging is the same for every job);
jobs alternate sides, and ``--repeats`` rounds keep each job's best time. "At equal quality" picks, per side,
the fastest job whose score is at least that side's uncached score minus ``--tolerance``.

Example:
    python benchmarks/cache_vs_diffusers.py --limit 4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from omnidit.condition import Condition
from omnidit.convert.flux import omnidit_config_to_flux, omnidit_to_flux
from omnidit.evaluate.runner import evaluate_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cache import calibrated_copy  # noqa: E402
from train_throughput import run_meta, write_report  # noqa: E402

PLAIN = {"candidates": 1, "skip_scale": 0.0}
PARITY_TOLERANCE = 1e-3  # max |omnidit - diffusers| pixel difference of one uncached sampling run
OURS = {  # job -> Pipeline.generate cache arguments
    "none": {},
    "first_block 0.05": {"cache": "first_block", "cache_threshold": 0.05},
    "first_block 0.12": {"cache": "first_block", "cache_threshold": 0.12},
    "teacache": {"cache": "teacache"},
    "interval 2 + taylor": {"cache": "interval", "cache_forecast": "taylor"},
}


def peer_jobs() -> dict:
    """job -> a diffusers cache config (None: no cache)."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    return {"none": None, "FirstBlockCache 0.05": FirstBlockCacheConfig(threshold=0.05),
            "FirstBlockCache 0.12": FirstBlockCacheConfig(threshold=0.12),
            "TaylorSeer": TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32)}


class DiffusersVelocity(nn.Module):
    """The diffusers Flux transformer behind omnidit's ``model(x, ids, t, cond)`` call: x (B, N, token_dim),
    ids (1, N, axes), t a scalar or (B,), cond with txt (B or 1, L, D), its padding mask and pooled. A sampling
    run starts at t = 1, where the cache hook's state is reset (it would otherwise compare with the last run)."""

    def __init__(self, peer: nn.Module, config) -> None:
        super().__init__()
        self.peer, self.config = peer, config

    def forward(self, x: Tensor, ids: Tensor, t: Tensor, cond: Condition, **_) -> Tensor:
        batch = x.shape[0]
        txt, pooled, mask = (v.expand(batch, *v.shape[1:]) if v is not None and v.shape[0] == 1 else v
                             for v in (cond.txt, cond.pooled, cond.txt_mask))
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        if self.peer.is_cache_enabled and float(t.max()) >= 1.0:
            self.peer._reset_stateful_cache()
        extra = {}
        if mask is not None:  # omnidit masks text padding; diffusers takes it as the joint attention mask
            keep = torch.cat([mask, torch.ones(batch, x.shape[1], dtype=torch.bool, device=x.device)], dim=1)
            extra["joint_attention_kwargs"] = {"attention_mask": keep[:, None, None, :]}
        with self.peer.cache_context("sample"):
            return self.peer(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                             img_ids=ids.reshape(-1, ids.shape[-1]), txt_ids=torch.zeros(txt.shape[1], ids.shape[-1]),
                             return_dict=False, **extra)[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="a shipped model name or model folder (default shapes)")
    p.add_argument("--limit", type=int, default=4, help="prompts per suite category (default 4)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds, best kept (default 2)")
    p.add_argument("--tolerance", type=float, default=0.01, help="score loss allowed at 'equal quality' (0.01)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/cache_vs_diffusers.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import diffusers
    from diffusers import FluxTransformer2DModel

    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ours = calibrated_copy(args.model, Path(tmp) / "model")  # TeaCache's fit, as omnidit calibrate
        cfg = ours.model.config
        peer = FluxTransformer2DModel(**omnidit_config_to_flux(cfg))
        peer.load_state_dict(omnidit_to_flux(ours.model.state_dict(), cfg), strict=True)
        theirs = dataclasses.replace(ours, model=DiffusersVelocity(peer.eval(), cfg))
        prompts = ["a red circle above a blue square", "two green triangles"]
        gap = float((ours.generate(prompts, seed=[1, 2], **PLAIN) - theirs.generate(prompts, seed=[1, 2], **PLAIN))
                    .abs().max())
        if gap > PARITY_TOLERANCE:
            raise SystemExit(f"the two sides disagree uncached: max pixel difference {gap:.2e}")
        jobs = [("omnidit", name, kwargs) for name, kwargs in OURS.items()]
        jobs += [("diffusers", name, config) for name, config in peer_jobs().items()]
        theirs_jobs = jobs[len(OURS):]
        order = [job for k in range(max(len(OURS), len(theirs_jobs)))  # alternate the sides
                 for job in (jobs[:len(OURS)][k:k + 1] + theirs_jobs[k:k + 1])]
        best: dict[tuple[str, str], float] = {}
        scores: dict[tuple[str, str], float] = {}
        for round_ in range(args.repeats):
            for side, name, setting in order:
                if side == "diffusers" and setting is not None:
                    peer.enable_cache(setting)
                t0 = time.perf_counter()
                report = evaluate_model(ours if side == "omnidit" else theirs, "shapes", n_per_prompt=1,
                                        limit=args.limit, progress=False, frechet=False, **PLAIN,
                                        **(setting if side == "omnidit" else {}))
                seconds = time.perf_counter() - t0
                if side == "diffusers" and setting is not None:
                    peer.disable_cache()
                best[side, name] = min(seconds, best.get((side, name), float("inf")))
                scores[side, name] = report.overall
                count = report.n_images
                print(f"round {round_ + 1} {side:<9} {name:<22} overall {report.overall:.3f}  {seconds:.1f} s",
                      flush=True)
    rows = []
    for side, name, _ in jobs:
        base = best[side, "none"]
        rows.append({"side": side, "job": name, "overall": scores[side, name], "seconds": best[side, name],
                     "images_per_s": count / best[side, name], "speedup": base / best[side, name]})
    equal = {}
    for side in ("omnidit", "diffusers"):
        floor = scores[side, "none"] - args.tolerance
        fine = [r for r in rows if r["side"] == side and r["overall"] >= floor]
        equal[side] = max(fine, key=lambda r: r["speedup"])
    meta = run_meta("cache_vs_diffusers.py", argv, torch.device("cpu"), start, limit=args.limit,
                    repeats=args.repeats, tolerance=args.tolerance, diffusers=diffusers.__version__,
                    parity_max_pixel_difference=gap, images=count)
    print(f"\n{meta['device_name']}, torch {meta['torch']}, diffusers {diffusers.__version__}, {meta['threads']} "
          f"threads; shapes suite at --limit {args.limit} ({count} images), one candidate, no skip-layer guidance; "
          f"uncached sides agree to {gap:.1e}")
    print(f"{'side':<10} {'job':<22} {'overall':>8} {'seconds':>8} {'speedup':>8}")
    for r in rows:
        print(f"{r['side']:<10} {r['job']:<22} {r['overall']:>8.3f} {r['seconds']:>8.1f} {r['speedup']:>7.2f}x")
    ratio = best["diffusers", equal["diffusers"]["job"]] / best["omnidit", equal["omnidit"]["job"]]
    print(f"at equal quality (score >= uncached - {args.tolerance}): omnidit {equal['omnidit']['job']} "
          f"{equal['omnidit']['speedup']:.2f}x, diffusers {equal['diffusers']['job']} "
          f"{equal['diffusers']['speedup']:.2f}x; omnidit's time / diffusers' = {1 / ratio:.2f}")
    write_report(args.json, {**meta, "equal_quality": {s: r["job"] for s, r in equal.items()},
                             "omnidit_time_over_diffusers_at_equal_quality": 1 / ratio}, rows)


if __name__ == "__main__":
    main()
