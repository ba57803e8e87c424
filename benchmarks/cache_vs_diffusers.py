"""Step caching against diffusers' cache hooks on the same weights, scored by the same exact judge.

**Peer: diffusers** (``FluxTransformer2DModel`` holding the shipped shapes model's weights through
``omnidit.convert.flux``, with ``FirstBlockCacheConfig`` / ``TaylorSeerCacheConfig`` from ``enable_cache``).
Both sides run the same sampling loop (``Pipeline.generate``: the model's Euler schedule, classifier-free
guidance with the conditional and unconditional rows in one call, one candidate, no skip-layer guidance),
the same prompts and seeds, and the shapes suite judges their images. Only the velocity network differs:
omnidit's ``MMDiT`` with its own step cache, or the diffusers model (text padding passed as its attention
mask) with a diffusers cache hook, reset before each sampling run. Before timing, one uncached run of each
side must agree to 1e-3 in pixels (they hold the same weights).

Quantization rides along on both sides: omnidit's w8a8 (``quantize_in_memory``: torch's dynamic int8 linears
in the blocks) and the peer's torchao ``Int8DynamicActivationInt8WeightConfig`` on the same block linears, each
alone and with the first-block cache. A model with a guidance-distilled twin (``--speed fast``'s) adds one more
omnidit row, the twin at w8a8 at the same plain settings: that row holds other weights (distilled from these),
so it is reported apart from the same-weights comparison.

Each job's images/s is over the suite's whole sampling and judging (the judging is the same for every job);
jobs alternate sides, and ``--repeats`` rounds keep each job's best time. "At equal quality" picks, per side,
the fastest job whose score is at least that side's uncached score minus ``--tolerance``.

Example:
    python benchmarks/cache_vs_diffusers.py --limit 4
"""

from __future__ import annotations

import argparse
import copy
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
from omnidit.pipeline import load_pipeline
from omnidit.quantize import apply_speed, fast_twin, quantize_in_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cache import calibrated_copy  # noqa: E402
from train_throughput import run_meta, write_report  # noqa: E402

PLAIN = {"candidates": 1, "skip_scale": 0.0}
PARITY_TOLERANCE = 1e-3  # max |omnidit - diffusers| pixel difference of one uncached sampling run
FIRST_BLOCK = {"cache": "first_block", "cache_threshold": 0.12}
OURS = {  # job -> (which of our pipelines: float / w8a8 / twin, its Pipeline.generate cache arguments)
    "none": ("float", {}),
    "first_block 0.05": ("float", {"cache": "first_block", "cache_threshold": 0.05}),
    "first_block 0.12": ("float", FIRST_BLOCK),
    "teacache": ("float", {"cache": "teacache"}),
    "interval 2 + taylor": ("float", {"cache": "interval", "cache_forecast": "taylor"}),
    "w8a8": ("w8a8", {}),
    "w8a8 + first_block 0.12": ("w8a8", FIRST_BLOCK),
}
TWIN_JOB = "twin at w8a8 (--speed fast)"


def peer_jobs(with_torchao: bool) -> dict:
    """job -> (whether torchao quantizes the peer's block linears, a diffusers cache config or None)."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    jobs = {"none": (False, None), "FirstBlockCache 0.05": (False, FirstBlockCacheConfig(threshold=0.05)),
            "FirstBlockCache 0.12": (False, FirstBlockCacheConfig(threshold=0.12)),
            "TaylorSeer": (False, TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32)),
            "torchao int8": (True, None),
            "torchao int8 + FirstBlockCache 0.12": (True, FirstBlockCacheConfig(threshold=0.12))}
    return {job: v for job, v in jobs.items() if with_torchao or not v[0]}


def torchao_int8(peer: nn.Module) -> nn.Module:
    """A copy of the diffusers transformer whose block linears compute with torchao's dynamic int8 activations
    and int8 weights (the blocks only, as omnidit's w8a8; the embedders stay float)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized = copy.deepcopy(peer)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda m, name: isinstance(m, nn.Linear) and "transformer_blocks" in name)
    return quantized


class DiffusersVelocity(nn.Module):
    """The diffusers Flux transformer behind omnidit's ``model(x, ids, t, cond)`` call: x (B, N, token_dim),
    ids (1, N, axes), t a scalar or (B,), cond with txt (B or 1, L, D), its padding mask, pooled and, for a
    guidance-distilled model, the guidance scale (B,). A sampling
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
        if cond.guidance is not None and self.config.guidance_embed:  # a guidance-distilled model (Flux dev's input)
            extra["guidance"] = cond.guidance.reshape(-1).expand(batch) if cond.guidance.numel() == 1 else cond.guidance
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
        try:
            quantized_peer = torchao_int8(peer)
        except ImportError:
            print("torchao is not installed (pip install -e '.[bench]'): the peer runs without its int8 rows")
            quantized_peer = None
        pipes = {"float": ours, "w8a8": dataclasses.replace(ours, model=quantize_in_memory(
            copy.deepcopy(ours.model), "w8a8"))}
        ours_jobs = [("omnidit", name, pipes[which], kwargs) for name, (which, kwargs) in OURS.items()]
        twin = load_pipeline(args.model)
        if fast_twin(twin) is not None:
            apply_speed(twin, "fast")  # the twin at w8a8; PLAIN's one candidate, as every other job
            ours_jobs.append(("omnidit", TWIN_JOB, twin, {}))
        theirs_jobs = []
        for name, (quantize, cache) in peer_jobs(quantized_peer is not None).items():
            model = quantized_peer if quantize else peer
            theirs_jobs.append(("diffusers", name, dataclasses.replace(theirs, model=DiffusersVelocity(model, cfg)),
                                (model, cache)))
        jobs = ours_jobs + theirs_jobs
        order = [job for k in range(max(len(ours_jobs), len(theirs_jobs)))  # alternate the sides
                 for job in (ours_jobs[k:k + 1] + theirs_jobs[k:k + 1])]
        best: dict[tuple[str, str], float] = {}
        scores: dict[tuple[str, str], float] = {}
        for round_ in range(args.repeats):
            for side, name, pipe, setting in order:
                model, cache = setting if side == "diffusers" else (None, None)
                if cache is not None:
                    model.enable_cache(cache)
                t0 = time.perf_counter()
                report = evaluate_model(pipe, "shapes", n_per_prompt=1, limit=args.limit, progress=False,
                                        frechet=False, **PLAIN, **(setting if side == "omnidit" else {}))
                seconds = time.perf_counter() - t0
                if cache is not None:
                    model.disable_cache()
                best[side, name] = min(seconds, best.get((side, name), float("inf")))
                scores[side, name] = report.overall
                count = report.n_images
                print(f"round {round_ + 1} {side:<9} {name:<22} overall {report.overall:.3f}  {seconds:.1f} s",
                      flush=True)
    rows = []
    for side, name, _, _ in jobs:
        base = best[side, "none"]
        rows.append({"side": side, "job": name, "overall": scores[side, name], "seconds": best[side, name],
                     "images_per_s": count / best[side, name], "speedup": base / best[side, name]})
    equal = {}  # per side, the fastest job within the tolerance of its uncached float score
    for side, allowed in (("omnidit", lambda r: r["job"] != TWIN_JOB), ("diffusers", lambda r: True),
                          ("omnidit with its twin", lambda r: True)):
        floor = scores[side.split()[0], "none"] - args.tolerance
        fine = [r for r in rows if r["side"] == side.split()[0] and allowed(r) and r["overall"] >= floor]
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
    theirs_best = equal["diffusers"]
    ratios = {}
    print(f"at equal quality (score >= uncached - {args.tolerance}): diffusers {theirs_best['job']} "
          f"{theirs_best['speedup']:.2f}x")
    for side in ("omnidit", "omnidit with its twin"):
        ratios[side] = equal[side]["seconds"] / theirs_best["seconds"]
        print(f"  {side}: {equal[side]['job']} {equal[side]['speedup']:.2f}x; time / diffusers' = "
              f"{ratios[side]:.2f}")
    write_report(args.json, {**meta, "equal_quality": {s: r["job"] for s, r in equal.items()},
                             "omnidit_time_over_diffusers_at_equal_quality": ratios["omnidit"],
                             "twin_time_over_diffusers_at_equal_quality": ratios["omnidit with its twin"]}, rows)


if __name__ == "__main__":
    main()
