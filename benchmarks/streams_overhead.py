"""What the multi-stream MMDiT costs on the uniform path: omnidit at HEAD against omnidit at a base commit.

Commit 67bd038 made ``MMDiT`` take named streams, per-token timesteps and fractional position ids. This
script loads the package as it was at ``--base-ref`` (default 6d159f7, the single-stream model) next to
the installed one, in the same process: ``git archive BASE src/omnidit`` is unpacked into a temporary
directory as the package ``omnidit_base`` (its ``omnidit`` imports rewritten). Both models hold the same
weights (random, perturbed so that adaLN-Zero does not make every block the identity; the base loads the
new model's state dict strictly), and one forward must match to 1e-6 (max |new - base| / max |base|)
with t per sample (B,), as a 0-d scalar, and per token (B, N) equal over each sample's tokens.

Metrics, each timed as new / base pairs after warm-up pairs, half of the pairs in each order (new first,
base first) so that neither side always runs second:

- ``forward``: one forward under ``torch.inference_mode``, t per sample (B,) on both sides;
- ``train_step``: each side's ``flow.training_loss`` forward, backward and the trainer's fused AdamW step
  (``train.make_optimizer``; one optimizer per side);
- ``forward_per_token_uniform``: the new model with t given per token, (B, N) equal over each sample's
  tokens (the path ``MMDiT.stream_times`` reduces to the per-sample one), against the base's forward.

ratio = median of the per-pair ratios new / base; IQR = their interquartile range; 95% CI = a
distribution-free confidence interval of that median (order statistics). Peak memory (growth of
the process's peak RSS on a Linux CPU, ``torch.cuda.max_memory_allocated`` growth on CUDA) is measured
once per side after timing. Configs: the shipped shapes model's architecture (batch 8, 32x32 RGB, patch 4
-> 64 tokens, 32 MiniLM-sized text tokens) and the ``tiny`` preset with Flux-like 16-channel 32x32
latents (batch 2, patch 2 -> 256 tokens, 16 text tokens), as in benchmarks/vs_diffusers.py.

Example:
    python benchmarks/streams_overhead.py --quick --threads 1
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from omnidit.condition import Condition
from omnidit.flow import training_loss
from omnidit.model.mmdit import PRESETS, MMDiT, MMDiTConfig
from omnidit.pipeline import resolve_device
from omnidit.tokens import image_position_ids
from omnidit.train import make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import device_description  # noqa: E402
from vs_diffusers import interleaved, peak_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARITY_TOLERANCE = 1e-6  # max |new - base| / max |base| on one forward
TEXT_DIM = 384  # MiniLM's token and pooled width


@dataclass
class Setup:
    """One benchmark config: the model architecture and its input sizes."""

    cfg: MMDiTConfig
    batch: int
    side: int  # image / latent side in pixels (cells)
    text_tokens: int


def shapes_config() -> MMDiTConfig:
    """The shipped default (shapes) model's architecture, from its config.json."""
    path = ROOT / "src/omnidit/default_model/config.json"
    return MMDiTConfig.from_dict(json.loads(path.read_text())["model"])


SETUPS: dict[str, Callable[[], Setup]] = {
    "shapes": lambda: Setup(shapes_config(), batch=8, side=32, text_tokens=32),
    "tiny-flux": lambda: Setup(replace(PRESETS["tiny"], in_channels=16), batch=2, side=32, text_tokens=16),
}
METRICS = ("forward", "train_step", "forward_per_token_uniform")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-ref", default="6d159f7", help="git ref of the single-stream omnidit to compare against")
    p.add_argument("--quick", action="store_true",
                   help="20 timed pairs, 2 warm-up pairs (about 40 s on a 2-CPU machine with --threads 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed pairs per metric (default 100, --quick 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed pairs first (default 4, --quick 2)")
    p.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=list(SETUPS))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (torch.set_num_threads)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one forward per side (torch.profiler top ops) and time MMDiT.stream_times")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/streams_overhead.json"),
                   help="results file: a JSON object with the machine, the command and the rows (overwritten)")
    args = p.parse_args(argv)
    args.repeats = max(2, args.repeats or (20 if args.quick else 100))  # quartiles need two pairs
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 4)
    return args


def load_base_package(ref: str, into: Path) -> str:
    """Unpack ``src/omnidit`` at git ``ref`` into ``into``/omnidit_base and put it on sys.path.

    Every ``from omnidit...`` / ``import omnidit...`` line is rewritten to ``omnidit_base`` so that the base
    package never reaches the installed one. Returns the full commit hash.
    """
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src/omnidit"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "omnidit_base"
    (into / "src/omnidit").rename(package)
    imports = re.compile(r"^(\s*)(from|import) omnidit\b", re.MULTILINE)
    for source in package.rglob("*.py"):
        source.write_text(imports.sub(r"\1\2 omnidit_base", source.read_text()))
    sys.path.insert(0, str(into))
    return commit


def base_modules() -> dict[str, ModuleType]:
    names = ("condition", "flow", "model.mmdit", "tokens", "train")
    return {n: importlib.import_module(f"omnidit_base.{n}") for n in names}


def base_config(cfg: MMDiTConfig, base: dict[str, ModuleType]) -> object:
    """The base's MMDiTConfig for ``cfg``; the fields the base lacks must be at their (single-stream) defaults."""
    base_cls = base["model.mmdit"].MMDiTConfig
    known = {f.name for f in fields(base_cls)}
    new = cfg.to_dict()
    defaults = MMDiTConfig().to_dict()
    extra = {k: v for k, v in new.items() if k not in known and v != defaults[k]}
    if extra:
        raise SystemExit(f"the base model has no equivalent of {extra}")
    return base_cls.from_dict({k: v for k, v in new.items() if k in known})


@dataclass
class Side:
    """One model with the callables that run its measured units of work."""

    model: nn.Module
    forward: Callable[[Tensor], Tensor]  # t -> v, under inference mode
    units: dict[str, Callable[[], None]]


def build_sides(setup: Setup, base: dict[str, ModuleType], device: torch.device) -> tuple[Side, Side, dict]:
    """(new side, base side, inputs) holding the same weights and the same fixed batch."""
    cfg = setup.cfg
    torch.manual_seed(0)
    new_model = MMDiT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # leave adaLN-Zero's zero init, else every block is the identity and parity is vacuous
        for p in new_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    base_model = base["model.mmdit"].MMDiT(base_config(cfg, base))
    base_model.load_state_dict(new_model.state_dict(), strict=True)
    new_model, base_model = new_model.to(device), base_model.to(device)

    grid = setup.side // cfg.patch_size
    n = grid * grid
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(setup.batch, n, cfg.token_dim, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    txt = torch.randn(setup.batch, setup.text_tokens, cfg.context_dim, generator=g).to(device)
    pooled = torch.randn(setup.batch, cfg.pooled_dim, generator=g).to(device)
    t = torch.rand(setup.batch, generator=g).to(device)
    inputs = {"x0": x0, "t": t, "t_token": t[:, None].expand(-1, n).contiguous(), "tokens": n}

    def side(model: nn.Module, cond: object, ids: Tensor, loss_fn: Callable, optimizer: torch.optim.Optimizer,
             ) -> Side:
        def forward(tt: Tensor) -> Tensor:
            if model.training:  # switch only between metrics: Module.eval() walks every submodule
                model.eval()
            with torch.inference_mode():
                return model(x0, ids, tt, cond)

        def train_step() -> None:
            if not model.training:
                model.train()
            loss = loss_fn(lambda x, tt, c: model(x, ids, tt, c), x0, cond, t, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        units = {"forward": lambda: forward(t), "train_step": train_step,
                 "forward_per_token_uniform": lambda: forward(inputs["t_token"])}
        return Side(model, forward, units)

    axes = len(cfg.axes_dim)
    new = side(new_model, Condition(txt=txt, pooled=pooled), image_position_ids(grid, grid, axes, device=device),
               training_loss, make_optimizer(new_model, 1e-4, 0.0, device))
    base_side = side(base_model, base["condition"].Condition(txt=txt, pooled=pooled),
                     base["tokens"].image_position_ids(grid, grid, axes, device=device),
                     base["flow"].training_loss, base["train"].make_optimizer(base_model, 1e-4, 0.0, device))
    return new, base_side, inputs


def check_parity(new: Side, base: Side, inputs: dict) -> dict[str, float]:
    """Relative max difference of the new forward (t per sample, 0-d, per token) to the base's; exits above 1e-6."""
    t = inputs["t"]
    reference = base.forward(t).float()
    out = {}
    for name, tt, ref in (("per_sample", t, reference), ("per_token_uniform", inputs["t_token"], reference),
                          ("scalar", t[0], base.forward(t[0]).float())):
        out[name] = ((new.forward(tt).float() - ref).abs().max() / ref.abs().max()).item()
    if not all(v <= PARITY_TOLERANCE for v in out.values()):  # also catches NaN (0 / 0 from an all-zero output)
        raise SystemExit(f"outputs differ: relative max differences {out} (tolerance {PARITY_TOLERANCE:g})")
    return out


def measure(new: Callable[[], None], base: Callable[[], None], args: argparse.Namespace,
            device: torch.device) -> tuple[list[float], list[float]]:
    """Times of new and base, half of the pairs with new first and half with base first."""
    first = args.repeats // 2
    new_a, base_a = interleaved(new, base, first, args.warmup, device)
    base_b, new_b = interleaved(base, new, args.repeats - first, 1, device)
    return new_a + new_b, base_a + base_b


def profile(new: Side, base: Side, model: MMDiT, inputs: dict, device: torch.device) -> None:
    """torch.profiler top ops of one forward per side, and the time of the new model's stream_times."""
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, side in (("new", new), ("base", base)):
        side.forward(inputs["t"])
        with torch.profiler.profile() as prof:
            side.forward(inputs["t"])
        print(f"--- {name}: one forward (t per sample), top ops by self time")
        print(prof.key_averages().table(sort_by=sort, row_limit=15))
    lengths = {"img": inputs["tokens"]}
    for label, tt in (("per sample", inputs["t"]), ("per token uniform", inputs["t_token"])):
        start, calls = time.perf_counter(), 200
        for _ in range(calls):
            model.stream_times(tt, tt.shape[0], lengths)
        print(f"stream_times, t {label}: {1e6 * (time.perf_counter() - start) / calls:.1f} us per call")


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    memory_source = {"cuda": "cuda_max_memory_allocated_growth", "cpu": "rss_peak_growth"}.get(device.type)
    tmp = tempfile.TemporaryDirectory(prefix="omnidit_base_")
    commit = load_base_package(args.base_ref, Path(tmp.name))
    base = base_modules()
    meta = {"base_ref": args.base_ref, "base_commit": commit, "head_commit": _head_commit(),
            "device": device.type, "device_name": device_description(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
            "memory_source": memory_source,
            "command": "python benchmarks/streams_overhead.py " + shlex.join(sys.argv[1:])}
    rows = []
    for name in args.configs:
        setup = SETUPS[name]()
        new, base_side, inputs = build_sides(setup, base, device)
        parity = check_parity(new, base_side, inputs)
        params = sum(p.numel() for p in new.model.parameters())
        print(f"{name}: {params / 1e6:.2f} M parameters, batch {setup.batch}, {inputs['tokens']} image + "
              f"{setup.text_tokens} text tokens; parity (max |new - base| / max |base|) "
              + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()))
        if args.profile:
            profile(new, base_side, new.model, inputs, device)
        for metric in METRICS:
            # The per-token metric is compared with the base's ordinary (per-sample) forward.
            base_unit = base_side.units["forward" if metric == "forward_per_token_uniform" else metric]
            times_new, times_base = measure(new.units[metric], base_unit, args, device)
            ratios = [a / b for a, b in zip(times_new, times_base)]
            q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            new_s, base_s = statistics.median(times_new), statistics.median(times_base)
            rows.append({
                "config": name, "metric": metric, "new_s": new_s, "base_s": base_s, "ratio": median,
                "spread": q3 - q1, "ratio_q1": q1, "ratio_q3": q3, "ratio_ci95": median_interval(ratios),
                "ratio_of_medians": new_s / base_s,
                "new_peak_bytes": peak_memory(new.units[metric], device),
                "base_peak_bytes": peak_memory(base_unit, device),
                "parity_rel": parity, "params": params, "batch": setup.batch, "side": setup.side,
                "patch": setup.cfg.patch_size, "image_tokens": inputs["tokens"], "text_tokens": setup.text_tokens,
            })
            print_rows(rows[-1:], header=False)
        del new, base_side
    return meta, rows


def median_interval(values: list[float]) -> list[float]:
    """Distribution-free 95% confidence interval of the median: the order statistics n/2 -+ 0.98 sqrt(n)."""
    ordered, n = sorted(values), len(values)
    half = 0.98 * n**0.5
    return [ordered[max(0, int(n / 2 - half))], ordered[min(n - 1, int(n / 2 + half))]]


def _head_commit() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def print_rows(rows: list[dict], header: bool = True) -> None:
    def mib(b: int | None) -> str:
        return "n/a" if b is None else f"{b / 2**20:.0f}"

    if header:
        print(f"{'config':<10} {'metric':<26} {'new ms':>8} {'base ms':>8} {'ratio':>6} {'IQR':>6} "
              f"{'95% CI':>13} {'new MiB':>8} {'base MiB':>8}")
    for r in rows:
        print(f"{r['config']:<10} {r['metric']:<26} {1e3 * r['new_s']:>8.2f} {1e3 * r['base_s']:>8.2f} "
              f"{r['ratio']:>6.3f} {r['spread']:>6.3f} {r['ratio_ci95'][0]:>6.3f}-{r['ratio_ci95'][1]:<6.3f} "
              f"{mib(r['new_peak_bytes']):>8} {mib(r['base_peak_bytes']):>8}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    meta, rows = run(args)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\n{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads, new = HEAD "
          f"{meta['head_commit'][:7]}, base = {meta['base_commit'][:7]}, {args.repeats} pairs per metric; "
          f"ratio = median per-pair new / base ({meta['seconds']:.0f} s)")
    print_rows(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
