"""What the server adds to one image: single requests timed along three paths, each in a fresh process.

- ``pipeline``: ``Pipeline.generate`` at batch 1 in the process's main thread (what ``benchmarks/serve_load.py
  --ceiling`` times, there as the best of three);
- ``batcher``: the same request as a ``Job`` through the server's ``Batcher`` and its worker thread, with the
  loading thread reserved as ``omnidit serve`` reserves it (``reserve_torch_threads``), no HTTP;
- ``http``: ``POST /v1/images/generations`` to the server's app under uvicorn in the same process, PNG answer.

Rounds alternate the paths, each run in its own process (an OpenMP team left in one thread slows another's:
``omnidit.serve.batching.reserve_torch_threads``). Prints the mean, median and best seconds per request of every
path and round, and their means over the rounds; ``--json`` writes them.

    python scripts/serve_overhead.py --requests 10 --rounds 2 --json overhead.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["a red circle above a blue square", "a green triangle", "a small yellow diamond left of a purple circle",
           "two blue squares"]
PATHS = ("pipeline", "batcher", "http")


def time_requests(path: str, model: str, requests: int, steps: int | None = None,
                  threads: int | None = None) -> list[float]:
    """Seconds of each of ``requests`` single-image requests (prompt i % 4, seed i, the model's own settings unless
    ``steps``) along ``path``, after one warm-up request per prompt at 2 steps. ``threads``: the sampling worker's
    torch threads (``batcher`` and ``http``; the caller reserves them, as ``omnidit serve`` does)."""
    if path not in PATHS:
        raise SystemExit(f"serve_overhead: unknown path {path!r}; choose one of {', '.join(PATHS)}")
    from omnidit.pipeline import load_pipeline

    pipe = load_pipeline(model, device="cpu")
    settings = {} if steps is None else {"steps": steps}
    times = []
    if path == "pipeline":
        call = lambda prompt, seed, extra: pipe.generate([prompt], seed=[seed], **extra)  # noqa: E731
    elif path == "batcher":
        from omnidit.serve.batching import Batcher, Job

        batcher = Batcher({model: pipe}, threads=threads).start()
        call = lambda prompt, seed, extra: batcher.submit(Job(model, prompt, [seed], extra)).result()  # noqa: E731
    elif path == "http":
        import httpx

        from omnidit.serve.app import build_app
        from omnidit.serve.command import BackgroundServer

        server = BackgroundServer(build_app({model: pipe}, threads=threads)).start()
        url = f"{server.url}/v1/images/generations"
        client = httpx.Client(timeout=600)

        def call(prompt: str, seed: int, extra: dict) -> None:
            client.post(url, json={"prompt": prompt, "seed": seed, **extra}).raise_for_status()
    try:
        for prompt in PROMPTS:
            call(prompt, 0, {"steps": 2})
        for i in range(requests):
            start = time.perf_counter()
            call(PROMPTS[i % len(PROMPTS)], i, settings)
            times.append(time.perf_counter() - start)
    finally:
        if path == "batcher":
            batcher.stop()
        elif path == "http":
            client.close()
            server.stop()
    return times


def summary(times: list[float]) -> dict:
    return {"mean_s": statistics.mean(times), "median_s": statistics.median(times), "best_s": min(times),
            "times_s": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--requests", type=int, default=10, help="timed requests per path and round")
    p.add_argument("--rounds", type=int, default=2, help="times each path runs, alternating, each in a fresh process")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # the child process: one path, JSON on stdout
    args = p.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        print("serve_overhead: error: --requests and --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.one:
        from omnidit.errors import OmniditError
        from omnidit.serve.batching import reserve_torch_threads

        threads = reserve_torch_threads() if args.one != "pipeline" else None
        try:
            print(json.dumps(time_requests(args.one, args.model, args.requests, args.steps, threads)))
        except OmniditError as error:  # a model that does not load: one line, as the CLI says it
            print(f"serve_overhead: error: {error}", file=sys.stderr)
            return 2
        return 0
    rows = []
    for round_ in range(1, args.rounds + 1):
        for path in PATHS:
            command = [sys.executable, __file__, "--one", path, "--model", args.model, "--requests", str(args.requests)]
            command += ["--steps", str(args.steps)] if args.steps else []
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 2:  # bad input, said in one line
                print(done.stderr.strip().splitlines()[-1], file=sys.stderr)
                return 2
            if done.returncode:
                print(f"serve_overhead: the {path} process failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            out = done.stdout
            row = {"round": round_, "path": path, **summary(json.loads(out.strip().splitlines()[-1]))}
            if not rows:  # the header once the first path has run, so that a bad --model prints its error alone
                print(f"{'round':>5} {'path':<9} {'mean s':>7} {'median s':>8} {'best s':>7}")
            rows.append(row)
            print(f"{round_:>5} {path:<9} {row['mean_s']:>7.3f} {row['median_s']:>8.3f} {row['best_s']:>7.3f}",
                  flush=True)
    means = {path: statistics.mean(r["mean_s"] for r in rows if r["path"] == path) for path in PATHS}
    print("mean over rounds: " + ", ".join(f"{path} {s:.3f} s" for path, s in means.items())
          + f"; http / pipeline {means['http'] / means['pipeline']:.2f}x")
    if args.json:
        command = "python scripts/serve_overhead.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        report = {"command": command, "model": args.model, "requests": args.requests, "rounds": args.rounds,
                  "steps": args.steps, "rows": rows, "mean_s": means}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
