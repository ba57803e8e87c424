"""Sampling speed against quality: every caching method, quantization, compilation and their combinations,
side by side with the peer, in one run, with a Pareto plot.

**Peer: diffusers**, ``FluxTransformer2DModel`` holding the shipped model's weights (through
``omnidit.convert.flux``), at its best settings on this machine: its FirstBlockCache hook at three thresholds,
TaylorSeer, and torchao's int8 dynamic quantization of the block linears, alone and with FirstBlockCache
(``cache_vs_diffusers.py`` holds the adapter), and torchao's int8 with the blocks compiled (``torch.compile``, as
omnidit's compiled rows), alone and with FirstBlockCache. Both sides run the same sampling loop
(``Pipeline.generate``: 30 Euler steps, guidance 4 with its two rows in one call, one candidate, no skip-layer
guidance) on the shapes
suite's prompts and noise seeds, and both sides' images go the way a foreign system's do: written into an
``omnidit eval-prompts`` manifest folder and judged by ``evaluate_folder`` (the same detector as ``omnidit eval``).

Per row: images/s over the suite (rendering only, best of ``--repeats``; rows alternate sides), the latency of
one image drawn alone (best of ``--repeats``), the peak resident memory of a fresh process that loads the row's
model (changed in place, as a user's is) and draws one batch of ``--batch-size`` images, and the suite's score
on ``--seed`` (0: settings were chosen on seed 1). A model with a guidance-distilled twin (``--speed fast``'s
model, distilled from these weights and shipped beside them) gets a second set of rows on the twin's weights,
for both sides: the twin takes the guidance scale as an input (as FLUX.1-dev does, which the diffusers model
reads the same way), so a step is one pass instead of guidance's two; at these plain settings ``fast`` is the twin
at w8a8 and ``faster`` adds first-block caching. "At equal quality" compares the sides on the same weights.
Writes a table, ``benchmarks/results/sampling_speed.json`` and the Pareto plot (score against images/s)
``docs/images/sampling_speed.png`` (a run with ``--rows``, ``--quick`` or another ``--json``: its plot beside its JSON).

Example:
    python benchmarks/sampling_speed.py --quick        # 2 prompts per category, one threshold per method
    python benchmarks/sampling_speed.py --limit 8 --repeats 2
    python benchmarks/sampling_speed.py --limit 16 --weights twin --no-memory --json twin.json --plot twin.png
    python benchmarks/sampling_speed.py --limit 16 --repeats 2 --profile   # and where each side's time goes
    python benchmarks/sampling_speed.py --weights model --limit 32 --seed 2 --rows "w8a8 compiled" \\
        "torchao int8 compiled" --json seed2.json     # only these jobs (and each side's uncached one); seed2.png
    python benchmarks/sampling_speed.py --pool seed0.json seed2.json seed3.json   # several runs' rows pooled
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from omnidit.convert.flux import omnidit_config_to_flux, omnidit_to_flux
from omnidit.evaluate.runner import evaluate_folder, write_suite_prompts
from omnidit.images import to_pil
from omnidit.pipeline import Pipeline, load_pipeline
from omnidit.quantize import FAST_TWINS, quantize_in_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_vs_diffusers import PLAIN, DiffusersVelocity, torchao_int8  # noqa: E402
from step_cache import calibrated_copy  # noqa: E402
from train_throughput import _rss_bytes, run_meta, write_report  # noqa: E402

DEFAULT_JSON = "benchmarks/results/sampling_speed.json"
FIRST_BLOCK = {"cache": "first_block", "cache_threshold": 0.12}
TAYLOR = {"cache": "interval", "cache_forecast": "taylor"}
# first_block with TaylorSeer's forecast instead of a copy: at 0.3 it kept the uncached score on the validation seed
# 1 on both weights (104 images), at 0.4 it lost four to five images (docs/benchmarks.md)
FIRST_BLOCK_TAYLOR = {"cache": "first_block", "cache_forecast": "taylor"}
# (row, model variant, Pipeline.generate cache settings, in --quick), on the model's weights
OURS = [
    ("none", "float", {}, True),
    ("first_block 0.08", "float", {"cache": "first_block", "cache_threshold": 0.08}, False),
    ("first_block 0.12", "float", FIRST_BLOCK, True),
    ("first_block 0.2", "float", {"cache": "first_block", "cache_threshold": 0.2}, False),
    ("teacache 0.1", "float", {"cache": "teacache", "cache_threshold": 0.1}, True),
    ("teacache 0.2", "float", {"cache": "teacache", "cache_threshold": 0.2}, False),
    ("magcache 0.05", "float", {"cache": "magcache", "cache_threshold": 0.05}, True),
    ("magcache 0.1", "float", {"cache": "magcache", "cache_threshold": 0.1}, False),
    ("interval 2", "float", {"cache": "interval"}, False),
    ("interval 2 + taylor", "float", TAYLOR, True),
    ("w8a8", "w8a8", {}, True),
    ("w8a8 + first_block 0.12", "w8a8", FIRST_BLOCK, True),
    ("w8a8 + interval 2 + taylor", "w8a8", TAYLOR, False),
    ("w8a8 + first_block 0.2 + taylor", "w8a8", {**FIRST_BLOCK_TAYLOR, "cache_threshold": 0.2}, False),
    ("w8a8 + first_block 0.3 + taylor", "w8a8", {**FIRST_BLOCK_TAYLOR, "cache_threshold": 0.3}, True),
    ("compiled", "compiled", {}, False),
    ("compiled + first_block 0.12", "compiled", FIRST_BLOCK, False),
    ("w8a8 compiled", "w8a8 compiled", {}, False),
    ("w8a8 compiled + first_block 0.12 + taylor", "w8a8 compiled", {**FIRST_BLOCK_TAYLOR, "cache_threshold": 0.12},
     False),
    ("w8a8 compiled + first_block 0.2 + taylor", "w8a8 compiled", {**FIRST_BLOCK_TAYLOR, "cache_threshold": 0.2},
     False),
    ("w8a8 compiled + first_block 0.3 + taylor", "w8a8 compiled", {**FIRST_BLOCK_TAYLOR, "cache_threshold": 0.3},
     False),
    ("bf16", "bf16", {}, False),  # only with --bf16: emulated (slow) on CPUs without AVX-512 BF16
]
# The same on the weights of the model's guidance-distilled twin (--speed fast's), where it has one: both sides
# then run the twin, one pass per step (the scale is its input), so the comparison is again on the same weights.
TWIN_PREFIX = "twin: "
OURS_TWIN = [
    ("none", "float", {}, True),
    ("first_block 0.12", "float", FIRST_BLOCK, False),
    ("interval 2 + taylor", "float", TAYLOR, False),
    ("w8a8 (--speed fast's model)", "w8a8", {}, True),
    ("w8a8 + first_block 0.12 (--speed faster's)", "w8a8", FIRST_BLOCK, True),
    ("w8a8 + interval 2 + taylor", "w8a8", TAYLOR, False),
    ("w8a8 + first_block 0.2", "w8a8", {"cache": "first_block", "cache_threshold": 0.2}, False),
    ("w8a8 + interval 3 + taylor", "w8a8", {**TAYLOR, "cache_interval": 3}, False),
    ("w8a8 + first_block 0.2 + taylor", "w8a8", {**FIRST_BLOCK_TAYLOR, "cache_threshold": 0.2}, False),
    ("w8a8 + first_block 0.3 + taylor", "w8a8", {**FIRST_BLOCK_TAYLOR, "cache_threshold": 0.3}, True),
    ("w8a8 compiled", "w8a8 compiled", {}, False),
    ("w8a8 compiled + interval 3 + taylor", "w8a8 compiled", {**TAYLOR, "cache_interval": 3}, False),
    ("w8a8 compiled + first_block 0.3 + taylor", "w8a8 compiled", {**FIRST_BLOCK_TAYLOR, "cache_threshold": 0.3},
     False),
]
# (row, torchao int8 on the block linears, its blocks compiled (torch.compile, as ours), diffusers cache: None,
# ("first_block", threshold) or ("taylorseer",), in --quick), on either weights. torchao's int8 is meant to run
# compiled (Inductor fuses its activation quantization), so its compiled rows are the peer's best.
PEER = [
    ("none", False, False, None, True),
    ("FirstBlockCache 0.08", False, False, ("first_block", 0.08), False),
    ("FirstBlockCache 0.12", False, False, ("first_block", 0.12), True),
    ("FirstBlockCache 0.2", False, False, ("first_block", 0.2), False),
    ("TaylorSeer", False, False, ("taylorseer",), True),
    ("torchao int8", True, False, None, True),
    ("torchao int8 + FirstBlockCache 0.12", True, False, ("first_block", 0.12), True),
    ("FirstBlockCache 0.3", False, False, ("first_block", 0.3), False),
    ("torchao int8 + FirstBlockCache 0.2", True, False, ("first_block", 0.2), False),
    ("FirstBlockCache 0.4", False, False, ("first_block", 0.4), False),
    ("torchao int8 compiled", True, True, None, False),
    ("torchao int8 compiled + FirstBlockCache 0.12", True, True, ("first_block", 0.12), False),
    ("torchao int8 compiled + FirstBlockCache 0.2", True, True, ("first_block", 0.2), False),
    ("torchao int8 compiled + FirstBlockCache 0.3", True, True, ("first_block", 0.3), False),
]


def peer_cache_config(spec: tuple | None):
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if spec is None:
        return None
    if spec[0] == "first_block":
        return FirstBlockCacheConfig(threshold=spec[1])
    return TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32)


def ours_pipeline(base: Pipeline, variant: str, in_place: bool = False) -> Pipeline:
    """The base pipeline (the model's calibrated float pipeline, or its twin's) as the row's model variant; shares
    the text encoder. ``in_place``: change the base's own model (the memory runs, which hold one model as a user
    would)."""
    if variant == "float":
        return base
    model = base.model if in_place else copy.deepcopy(base.model)
    scheme, _, compiled = variant.partition(" ")  # "w8a8", "compiled", "w8a8 compiled"...
    if scheme != "compiled":
        quantize_in_memory(model, scheme)
    if "compiled" in (scheme, compiled):
        model.compile_blocks()
    return dataclasses.replace(base, model=model)


def peer_pipeline(base: Pipeline, int8: bool, compiled: bool = False) -> tuple[Pipeline, torch.nn.Module]:
    """The base pipeline with the diffusers transformer (torchao int8 on its block linears when ``int8``; each
    block compiled by ``torch.compile`` when ``compiled``, as ``MMDiT.compile_blocks`` does ours)."""
    from diffusers import FluxTransformer2DModel

    cfg = base.model.config
    peer = FluxTransformer2DModel(**omnidit_config_to_flux(cfg))
    peer.load_state_dict(omnidit_to_flux(base.model.state_dict(), cfg), strict=True)
    peer = torchao_int8(peer.eval()) if int8 else peer.eval()
    if compiled:
        for block in [*peer.transformer_blocks, *peer.single_transformer_blocks]:
            block.compile()
    return dataclasses.replace(base, model=DiffusersVelocity(peer, cfg)), peer


@dataclasses.dataclass
class Row:
    side: str
    name: str
    pipe: Pipeline
    sampling: dict
    peer: torch.nn.Module | None = None  # the diffusers model, whose cache hook is switched per render
    cache: object = None

    def render(self, prompts: list[str], seeds: list[int], batch_size: int) -> torch.Tensor:
        """The row's images for ``prompts`` (B, C, H, W) in [-1, 1], with the peer's cache hook on meanwhile."""
        if self.cache is not None:
            self.peer.enable_cache(self.cache)
        try:
            return torch.cat([self.pipe.generate(prompts[k:k + batch_size], seed=seeds[k:k + batch_size],
                                                 **PLAIN, **self.sampling)
                              for k in range(0, len(prompts), batch_size)])
        finally:
            if self.cache is not None:
                self.peer.disable_cache()


# Where a render's CPU time goes (--profile): torch profiler's self time per op, summed into these groups.
PROFILE_GROUPS = (("matmuls", ("aten::addmm", "aten::mm", "aten::bmm", "aten::_int_mm", "aten::_scaled_mm")),
                  ("attention", ("aten::_scaled_dot_product",)))


def profile_row(row: Row, prompts: list[str], seeds: list[int], batch_size: int) -> dict:
    """Milliseconds per image of one render of ``prompts`` under torch's profiler (self CPU time): in
    ``PROFILE_GROUPS``, the rest (norms, modulation, GELU, RoPE, copies, activation quantization, the caches' own
    work) and the eight most costly ops. The profiler's own overhead is in every op alike."""
    from torch.profiler import profile

    row.render(prompts, seeds, batch_size)  # warm: one-time costs (prompts, kernel packing, compiling) stay out
    with profile() as prof:
        row.render(prompts, seeds, batch_size)
    ms = {label: 0.0 for label, _ in PROFILE_GROUPS} | {"rest": 0.0}
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    for event in ops:
        label = next((lab for lab, prefixes in PROFILE_GROUPS if event.key.startswith(prefixes)), "rest")
        ms[label] += event.self_cpu_time_total / 1e3 / len(prompts)
    top = {e.key: e.self_cpu_time_total / 1e3 / len(prompts) for e in ops[:8]}
    return {"ms_per_image": ms, "total_ms_per_image": sum(ms.values()), "top_ops_ms_per_image": top}


def suite_jobs(folder: Path, limit: int, seed: int, held_out) -> tuple[list[str], list[int], list[str]]:
    """Write the suite's eval-prompts manifest into ``folder``: (prompts, noise seeds, file names), one image
    per prompt, with the seeds ``omnidit eval --seed`` gives them."""
    from omnidit.evaluate.runner import _seeds

    manifest, _ = write_suite_prompts(folder, 1, limit, held_out=held_out)
    entries = json.loads(manifest.read_text())["images"]
    return [e["prompt"] for e in entries], _seeds(seed, len(entries)), [e["file"] for e in entries]


def peak_memory(model: str, side: str, name: str, batch_size: int, bf16: bool) -> float:
    """MiB: the peak resident memory of a fresh process that loads the row's model and draws ``batch_size``
    images (this script with --memory-of)."""
    out = subprocess.run([sys.executable, __file__, "--model", model, "--memory-of", side, name, "--batch-size",
                          str(batch_size)] + (["--bf16"] if bf16 else []), capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"the memory run of {side} {name} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def weights_prefix(job: str) -> str:
    """Which weights a row ran: TWIN_PREFIX for the twin's, "" for the model's."""
    return TWIN_PREFIX if job.startswith(TWIN_PREFIX) else ""


def build_rows(base: Pipeline, args: argparse.Namespace, only: tuple[str, str] | None = None) -> list[Row]:
    """The run's rows (or only the one named ``only``: (side, name)): the model's weights, then its twin's."""
    named = getattr(args, "rows", None)  # --rows: these jobs, and the uncached rows of the weights they are on
    on_twin = named is None or any(j.startswith(TWIN_PREFIX) for j in named)
    on_model = named is None or any(not j.startswith(TWIN_PREFIX) for j in named)
    weights = [("", base, OURS)] if args.weights in ("model", "both") and on_model else []
    if args.model in FAST_TWINS and args.weights in ("twin", "both") and on_twin and (only is None or
                                                                                     only[1].startswith(TWIN_PREFIX)):
        weights.append((TWIN_PREFIX, load_pipeline(FAST_TWINS[args.model]), OURS_TWIN))
    def wanted(side: str, name: str, quick: bool) -> bool:
        if only:
            return only == (side, name)
        if named is not None:
            return name in named or name == weights_prefix(name) + "none"
        return quick or not args.quick

    rows = []
    for prefix, pipe, ours in weights:
        for name, variant, sampling, quick in ours:
            if (variant != "bf16" or args.bf16) and wanted("omnidit", prefix + name, quick):
                rows.append(Row("omnidit", prefix + name, ours_pipeline(pipe, variant, in_place=only is not None),
                                sampling))
    for prefix, pipe, _ in weights:
        peers: dict[tuple, tuple] = {}
        for name, int8, compiled, cache, quick in PEER:
            if not wanted("diffusers", prefix + name, quick):
                continue
            if (int8, compiled) not in peers:
                peers[int8, compiled] = peer_pipeline(pipe, int8, compiled)
            peer_pipe, peer = peers[int8, compiled]
            rows.append(Row("diffusers", prefix + name, peer_pipe, {}, peer, peer_cache_config(cache)))
    return rows


def check_rows(jobs: list[str] | None) -> None:
    """--rows: every name must be a job of the tables (either side, either weights), checked before anything loads."""
    names = {n for n, *_ in OURS + PEER} | {TWIN_PREFIX + n for n, *_ in OURS_TWIN + PEER}
    unknown = [j for j in jobs or [] if j not in names]
    if unknown:
        raise SystemExit(f"--rows: no job is named {unknown[0]!r}; the jobs are: {', '.join(sorted(names))}")


def check_built(rows: list[Row], jobs: list[str] | None) -> None:
    """--rows: a named job that this run does not build (bf16 without --bf16, the twin's with --weights model or
    for a model without one) stops the run before anything renders."""
    built = {r.name for r in rows}
    missing = [j for j in jobs or [] if j not in built]
    if missing:
        raise SystemExit(f"--rows: {missing[0]!r} is not built in this run (bf16 needs --bf16, the twin's jobs "
                         "--weights twin or both and a model with a twin)")


def memory_main(args: argparse.Namespace) -> None:
    """--memory-of SIDE NAME: load that row alone, draw one batch, print the peak resident MiB. A twin row loads
    the model first, as --speed fast does, and then its twin."""
    side, name = args.memory_of
    calibrated = any(n == name and s.get("cache") in ("teacache", "magcache") for n, _, s, _ in OURS)
    with tempfile.TemporaryDirectory() as tmp:
        base = calibrated_copy(args.model, Path(tmp) / "model") if side == "omnidit" and calibrated else \
            load_pipeline(args.model)
        (row,) = build_rows(base, args, only=(side, name))
        del base  # the diffusers rows hold only the transformer converted from it
        prompts, _, _ = suite_jobs(Path(tmp) / "suite", 1, 0, row.pipe.config.data.held_out)
        with torch.inference_mode():
            row.render((prompts * args.batch_size)[:args.batch_size], list(range(args.batch_size)), args.batch_size)
    print(own_peak_rss() / 2**20)


def own_peak_rss() -> int:
    """Bytes: this process's peak resident set. Linux's VmHWM belongs to the process's own address space; the
    rusage maximum would carry the parent's peak over from the fork that started it."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _rss_bytes()


def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    """Score against images/s, a colour per side (omnidit's twin apart), each one's Pareto front drawn as a step
    line and its points named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    twin = lambda r: weights_prefix(r["job"]) == TWIN_PREFIX  # noqa: E731
    groups = (("omnidit, the model's weights", "tab:blue", lambda r: r["side"] == "omnidit" and not twin(r)),
              ("diffusers, the model's weights", "tab:orange", lambda r: r["side"] == "diffusers" and not twin(r)),
              ("omnidit, its guidance-distilled twin's", "tab:green", lambda r: r["side"] == "omnidit" and twin(r)),
              ("diffusers, the twin's", "tab:red", lambda r: r["side"] == "diffusers" and twin(r)))
    for label, colour, member in groups:
        mine = sorted((r for r in rows if member(r)), key=lambda r: -r["images_per_s"])
        ax.scatter([r["images_per_s"] for r in mine], [r["overall"] for r in mine], color=colour, label=label, zorder=3)
        front, best = [], -1.0
        for r in mine:  # fastest first: a row is on the front when no faster row scores as well
            if r["overall"] > best:
                front.append(r)
                best = r["overall"]
        for r in front + [r for r in mine if r["job"].endswith("none") and r not in front]:  # the table names the rest
            ax.annotate(r["job"], (r["images_per_s"], r["overall"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color=colour)
        ax.step([r["images_per_s"] for r in front], [r["overall"] for r in front], where="post", color=colour,
                alpha=0.5)
    ax.set_xlabel("images/s (suite rendering, best of the rounds)")
    ax.set_ylabel("shapes suite overall")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="a shipped model name or model folder (default shapes)")
    p.add_argument("--quick", action="store_true", help="2 prompts per category, one round, one setting a method")
    p.add_argument("--limit", type=int, default=None, help="prompts per suite category (default 8; --quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, best kept (default 2; --quick 1)")
    p.add_argument("--seed", type=int, default=0, help="the suite's noise seed (default 0; settings were chosen "
                                                       "on seed 1)")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampling call (default 16)")
    p.add_argument("--weights", choices=("model", "twin", "both"), default="both",
                   help="rows on the model's weights, its twin's or both (default both)")
    p.add_argument("--bf16", action="store_true", help="add the bf16 row (slow where the CPU lacks AVX-512 BF16)")
    p.add_argument("--pool", nargs="+", type=Path, metavar="JSON", default=None,
                   help="print the rows of finished runs (their --json, one per seed, of the same model and weights) "
                        "pooled: each job's score over all their images and images/s over all their seconds, and the "
                        "equal-quality picks; jobs that not every run has are named and left out")
    p.add_argument("--rows", nargs="+", metavar="JOB", default=None,
                   help="run only these jobs (names from either side's table; the uncached 'none' rows of each side "
                        "on the named jobs' weights always run, for the speedups and the equal-quality rule)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes (a minute or two)")
    p.add_argument("--profile", action="store_true",
                   help="profile each side's uncached row and its pick at equal quality (one batch each): where the "
                        "time goes, per image: matmuls, attention, the rest, and the costliest ops")
    p.add_argument("--json", type=Path, default=Path(DEFAULT_JSON))
    p.add_argument("--plot", type=Path, default=None,
                   help="the Pareto plot (default: docs/images/sampling_speed.png when --json is its default and "
                        "every row runs; otherwise the --json path with .png, so that other runs leave the docs' "
                        "plot alone)")
    p.add_argument("--memory-only", action="store_true", help="measure the peak memory of the rows already in "
                                                                 "--json again and write them back (nothing timed)")
    p.add_argument("--profile-only", action="store_true", help="profile the rows of the run already in --json "
                                                                  "(as --profile) and write them back (nothing timed)")
    p.add_argument("--memory-of", nargs=2, metavar=("SIDE", "ROW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plot is None:  # the docs' plot only for the docs' JSON; any other run's plot goes beside its JSON
        docs_json = args.json == Path(DEFAULT_JSON) and not args.rows and not args.quick
        args.plot = Path("docs/images/sampling_speed.png") if docs_json else args.json.with_suffix(".png")
    args.limit = args.limit or (2 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.pool:  # reads finished runs' JSON only
        return pool_runs(args.pool)
    import diffusers

    # The compiled rows share their compiled blocks between thresholds (and the peer's between cache hooks): room
    # for every form they compile, and an error, not a silent fall back to eager, if that is not enough.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if args.memory_of:
        return memory_main(args)
    if args.memory_only:
        report = json.loads(args.json.read_text())
        for r in report["rows"]:
            r["peak_memory_mib"] = peak_memory(args.model, r["side"], r["job"], report["batch_size"], args.bf16)
            print(f"{r['side']:<10} {r['job']:<48} {r['peak_memory_mib']:8.0f} MiB", flush=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
        return pareto_plot(report["rows"], args.plot, plot_title(report))
    if args.profile_only:
        return profile_only(args)
    check_rows(args.rows)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = calibrated_copy(args.model, Path(tmp) / "model")  # TeaCache's and MagCache's fit, as omnidit calibrate
        rows = build_rows(base, args)
        check_built(rows, args.rows)
        if not rows:
            raise SystemExit(f"{args.model} has no guidance-distilled twin: use --weights model or both")
        folder = Path(tmp) / "suite"
        prompts, seeds, files = suite_jobs(folder, args.limit, args.seed, base.config.data.held_out)
        ours = [r for r in rows if r.side == "omnidit"]
        theirs = [r for r in rows if r.side == "diffusers"]
        order = [r for k in range(max(len(ours), len(theirs))) for r in ours[k:k + 1] + theirs[k:k + 1]]
        results = {(r.side, r.name): {"seconds": float("inf"), "latency": float("inf")} for r in rows}
        with torch.inference_mode():
            last = len(prompts) % args.batch_size or args.batch_size
            for r in rows:  # warm-up: kernels, the text encoder's prompts, and compilation for each size timed
                for count, batch in ((args.batch_size, args.batch_size), (last, last), (1, 1)):
                    r.render(prompts[:count], seeds[:count], batch)
            for round_ in range(args.repeats):
                for r in order:
                    res = results[r.side, r.name]
                    t0 = time.perf_counter()
                    images = r.render(prompts, seeds, args.batch_size)
                    res["seconds"] = min(res["seconds"], time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    r.render(prompts[:1], seeds[:1], 1)
                    res["latency"] = min(res["latency"], time.perf_counter() - t0)
                    if round_ == 0:  # the images are the same every round: judge them once
                        for image, name in zip(images, files):
                            to_pil(image).save(folder / name)
                        report = evaluate_folder(folder, progress=False, frechet=False)
                        res["overall"], res["categories"] = report.overall, report.categories
                    print(f"round {round_ + 1} {r.side:<9} {r.name:<48} overall {res['overall']:.3f}  "
                          f"{res['seconds']:.1f} s", flush=True)
    count = len(prompts)
    out = []
    for r in rows:
        res = results[r.side, r.name]
        base_seconds = results[r.side, weights_prefix(r.name) + "none"]["seconds"]  # the same weights uncached
        memory = None if args.no_memory else peak_memory(args.model, r.side, r.name, args.batch_size, args.bf16)
        out.append({"side": r.side, "job": r.name, "overall": res["overall"], "categories": res["categories"],
                    "seconds": res["seconds"], "images_per_s": count / res["seconds"],
                    "latency_s": res["latency"], "speedup": base_seconds / res["seconds"],
                    "peak_memory_mib": memory})
    meta = run_meta("sampling_speed.py", argv, torch.device("cpu"), start, model=args.model, weights=args.weights,
                    limit=args.limit, repeats=args.repeats, seed=args.seed, batch_size=args.batch_size, images=count,
                    diffusers=diffusers.__version__)
    print(f"\n{meta['device_name']}, torch {meta['torch']}, diffusers {diffusers.__version__}, {meta['threads']} "
          f"threads; shapes suite at --limit {args.limit} ({count} images, seed {args.seed}), 30 steps, guidance 4, "
          "one candidate, no skip-layer guidance; judged through eval-prompts manifests")
    print(f"{'side':<10} {'job':<48} {'overall':>7} {'img/s':>6} {'speedup':>7} {'latency':>8} {'peak MiB':>8}")
    for r in out:
        memory = f"{r['peak_memory_mib']:8.0f}" if r["peak_memory_mib"] is not None else f"{'-':>8}"
        print(f"{r['side']:<10} {r['job']:<48} {r['overall']:>7.3f} {r['images_per_s']:>6.2f} {r['speedup']:>6.2f}x "
              f"{r['latency_s']:>7.2f}s {memory}")
    summary = equal_quality(out, 0.01)
    for line in summary["lines"]:
        print(line)
    write_report(args.json, {**meta, "equal_quality": summary["picks"]}, out)
    pareto_plot(out, args.plot, plot_title(meta))
    if args.profile:  # after the report is written, with the rows built afresh (their calibration is gone)
        profile_only(args)


def plot_title(meta: dict) -> str:
    return (f"{meta['device_name']}, {meta['threads']} threads, {meta['images']} images (seed {meta['seed']}); "
            "30 steps, guidance 4, one candidate")


def profile_only(args: argparse.Namespace) -> None:
    """--profile-only (and --profile, after the run): the profile of a finished run's uncached rows and picks (its
    --json), written into it."""
    report = json.loads(args.json.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        base = calibrated_copy(args.model, Path(tmp) / "model")
        rows = build_rows(base, args)
        prompts, seeds, _ = suite_jobs(Path(tmp) / "suite", report["limit"], report["seed"], base.config.data.held_out)
        size = report["batch_size"]
        report["profile"] = profile_report(rows, report["equal_quality"], prompts[:size], seeds[:size], size)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


def profile_report(rows: list[Row], picks: dict[str, str], prompts: list[str], seeds: list[int],
                   batch_size: int) -> list[dict]:
    """``profile_row`` for each side's uncached rows and picks at equal quality, printed as a table."""
    wanted = {(r.side, r.name) for r in rows if r.name.endswith("none")}
    wanted |= {(group.split(",")[0], job) for group, job in picks.items()}
    missing = wanted - {(r.side, r.name) for r in rows}
    if missing:
        print(f"not profiled (not among this command's rows: give it the run's --weights): {sorted(missing)}")
    report = []
    with torch.inference_mode():
        for r in rows:
            if (r.side, r.name) in wanted:
                report.append({"side": r.side, "job": r.name, **profile_row(r, prompts, seeds, batch_size)})
    groups = [label for label, _ in PROFILE_GROUPS] + ["rest"]
    print(f"\nprofile, ms per image of one batch of {len(prompts)} (self CPU time):")
    print(f"{'side':<10} {'job':<48} " + " ".join(f"{g:>9}" for g in groups) + f" {'total':>7}  most costly op")
    for p in report:
        top = next(iter(p["top_ops_ms_per_image"].items()))
        print(f"{p['side']:<10} {p['job']:<48} " + " ".join(f"{p['ms_per_image'][g]:>9.1f}" for g in groups)
              + f" {p['total_ms_per_image']:>7.1f}  {top[0]} {top[1]:.1f}")
    return report


def pool_runs(paths: list[Path]) -> None:
    """--pool: the jobs that every run in ``paths`` has, each scored over all the runs' images (the runs' overalls
    weighted by their image counts) at all their images over all their best seconds; then the equal-quality rule
    on the pooled rows."""
    reports = [json.loads(p.read_text()) for p in paths]
    seeds = [rep["seed"] for rep in reports]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"--pool: two runs of seed {next(s for s in seeds if seeds.count(s) > 1)}: each seed's "
                         "images would count twice; give one run per seed")
    for key in ("model", "weights", "limit"):  # model and weights are recorded since --pool exists
        if len({str(rep.get(key)) for rep in reports}) > 1:
            raise SystemExit(f"--pool: the runs differ in {key}; pool runs of one model, weights and --limit")
    by_job = [{(r["side"], r["job"]): r for r in rep["rows"]} for rep in reports]  # per run: (side, job) -> row
    common = set.intersection(*(set(rows) for rows in by_job))
    jobs = [j for j in by_job[0] if j in common]  # in the first run's order
    dropped = sorted(set.union(*(set(rows) for rows in by_job)) - common)
    if dropped:
        print(f"left out, not in every run: {'; '.join(f'{side} {job}' for side, job in dropped)}")
    prefixes = {weights_prefix(job) for _, job in jobs}
    if not all((side, prefix + "none") in jobs for side in ("omnidit", "diffusers") for prefix in prefixes):
        raise SystemExit("--pool: every run needs both sides' uncached 'none' rows on each weights it has")
    total = sum(rep["images"] for rep in reports)
    pooled = []
    for side, job in jobs:
        runs = [(rep["images"], rows[side, job]) for rep, rows in zip(reports, by_job)]
        pooled.append({"side": side, "job": job, "overall": sum(n * r["overall"] for n, r in runs) / total,
                       "images_per_s": total / sum(r["seconds"] for _, r in runs),
                       "per_run": [f"{r['overall']:.3f} / {r['images_per_s']:.2f}" for _, r in runs]})
    print(f"{len(reports)} runs (seeds {', '.join(map(str, seeds))}), {total} images; per run: overall / images/s")
    print(f"{'side':<10} {'job':<48} {'overall':>7} {'img/s':>6}  per run")
    for r in pooled:
        print(f"{r['side']:<10} {r['job']:<48} {r['overall']:>7.3f} {r['images_per_s']:>6.2f}  "
              f"{'; '.join(r['per_run'])}")
    for line in equal_quality(pooled, 0.01)["lines"]:
        print(line)


def equal_quality(rows: list[dict], tolerance: float) -> dict:
    """Per weights (the model's; its twin's, where it has one) and side, the fastest row within ``tolerance`` of
    that side's uncached float score on those weights, and the ratio of omnidit's images/s to the peer's."""
    picks, lines = {}, []
    for prefix, weights in (("", "the model's weights"), (TWIN_PREFIX, "the twin's weights")):
        for side in ("omnidit", "diffusers"):
            mine = [r for r in rows if r["side"] == side and weights_prefix(r["job"]) == prefix]
            if not mine:
                continue
            floor = next(r["overall"] for r in mine if r["job"] == prefix + "none") - tolerance
            picks[f"{side}, {weights}"] = max((r for r in mine if r["overall"] >= floor),
                                              key=lambda r: r["images_per_s"])
        if f"omnidit, {weights}" not in picks:
            continue
        ours, theirs = picks[f"omnidit, {weights}"], picks[f"diffusers, {weights}"]
        lines.append(f"{weights}, at equal quality (score >= the side's uncached - {tolerance}): omnidit {ours['job']} "
                     f"{ours['images_per_s']:.2f} images/s ({ours['overall']:.3f}), diffusers {theirs['job']} "
                     f"{theirs['images_per_s']:.2f} ({theirs['overall']:.3f}): "
                     f"{ours['images_per_s'] / theirs['images_per_s']:.2f}x")
    return {"picks": {g: r["job"] for g, r in picks.items()}, "lines": lines}


if __name__ == "__main__":
    main()
