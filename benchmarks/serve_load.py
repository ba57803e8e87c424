"""Load test for ``omnidit serve``: N concurrent clients against one client sending the same requests one
after another, on loopback, each for a bounded time.

The server runs in this process (uvicorn in a thread, the shipped shapes model unless --model) or is an
already running one (--url). Each client posts ``POST /v1/images/generations`` requests back to back (one
image each, seed = a counter, the model's default settings unless --steps, or a preset with --speed) until
--seconds have passed;
requests that are in flight then finish and count. Reported per phase: requests/s, images/s, latency
p50 / p95 / p99, the mean batch size (from the server's /metrics; with replicas, of whichever replica answers
the scrape), errors, and the server process's resident memory sampled through the phase (in-process server
only). The ratio row is images/s of N clients over one client: dynamic batching's gain (the issue's target:
>= 3x at 8 clients, zero errors). ``--ceiling`` also times the pipeline itself, in this process and without
HTTP, at batch 1 and at --max-batch: the most that batching can give on this machine.

``--replicas N`` serves through ``omnidit serve --replicas N`` (Ray Serve) started from this process.

Examples:
    python benchmarks/serve_load.py --clients 8 --seconds 60 --ceiling --json benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --clients 8 --seconds 300 --only-many   # the 5-minute memory run
    python benchmarks/serve_load.py --clients 8 --seconds 60 --speed fast --ceiling \
        --json benchmarks/results/serve_load_fast.json
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import device_description  # noqa: E402

PROMPTS = ["a red circle above a blue square", "a green triangle", "a small yellow diamond left of a purple circle",
           "two blue squares"]


def rss_mib() -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024 if found else None


def batch_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the server's omnidit_batch_size histogram."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = re.search(r"^omnidit_batch_size_sum ([0-9.e+]+)$", text, re.M)
    count = re.search(r"^omnidit_batch_size_count ([0-9.e+]+)$", text, re.M)
    return float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def run_phase(url: str, clients: int, seconds: float, steps: int | None, seed_base: int,
              rss_every: float = 15.0, in_process: bool = True, speed: str | None = None) -> dict:
    """One phase; the memory columns only when the server runs in this process (``in_process``)."""
    latencies: list[float] = []
    errors: list[str] = []
    images = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    counter = [seed_base]

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as session:
            while time.monotonic() < stop_at:
                with lock:
                    seed = counter[0]
                    counter[0] += 1
                body = {"prompt": PROMPTS[seed % len(PROMPTS)], "seed": seed}
                if steps:
                    body["steps"] = steps
                if speed:
                    body["speed"] = speed
                start = time.monotonic()
                try:
                    reply = session.post(f"{url}/v1/images/generations", json=body)
                except httpx.HTTPError as error:
                    with lock:
                        errors.append(repr(error))
                    continue
                with lock:
                    if reply.status_code == 200:
                        latencies.append(time.monotonic() - start)
                        images[0] += len(reply.json()["data"])
                    else:
                        errors.append(f"{reply.status_code} {reply.text[:200]}")

    batch_before = batch_totals(url)
    rss_before = rss_mib() if in_process else None
    rss_samples: list[tuple[float, float]] = []
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    next_sample = started + rss_every
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        if rss_before is not None and time.monotonic() >= next_sample:
            rss_samples.append((round(time.monotonic() - started, 1), rss_mib()))
            next_sample += rss_every
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    batch_after = batch_totals(url)
    batches = batch_after[1] - batch_before[1]
    return {"clients": clients, "wall_s": round(wall, 2), "requests": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "requests_per_s": len(latencies) / wall, "images_per_s": images[0] / wall,
            "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
            "p99_s": percentile(latencies, 0.99), "mean_latency_s": statistics.fmean(latencies) if latencies else None,
            "mean_batch": (batch_after[0] - batch_before[0]) / batches if batches else None,
            "rss_mib_start": rss_before, "rss_mib_end": rss_mib() if in_process else None,
            "rss_mib_samples": rss_samples}


def batching_ceiling(model: str, max_batch: int, steps: int | None, rounds: int = 3,
                     speed: str | None = None) -> dict:
    """The pipeline's images/s at batch 1 and at ``max_batch`` in this process (no HTTP, no queue), each the
    best of ``rounds`` after a warm-up: the most that dynamic batching can gain on this machine."""
    from omnidit.pipeline import load_pipeline
    from omnidit.quantize import speed_variant

    pipe = load_pipeline(model, device="cpu")
    pipe = speed_variant(pipe, speed) if speed else pipe
    pipe.generate(PROMPTS[:1], seed=[0], steps=steps)  # warm-up: prompt cache, kernels, int8 compilation
    best = {}
    for batch in (1, max_batch):
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            pipe.generate([PROMPTS[i % len(PROMPTS)] for i in range(batch)], seed=list(range(batch)), steps=steps)
            times.append(time.perf_counter() - start)
        best[batch] = batch / min(times)
    return {"images_per_s_batch_1": best[1], f"images_per_s_batch_{max_batch}": best[max_batch],
            "ratio": best[max_batch] / best[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start one in this process)")
    parser.add_argument("--model", default="shapes", help="model for the in-process server (default: shapes)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the second phase (default: 8)")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of each phase (default: 60)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps per request (default: the model's)")
    parser.add_argument("--speed", choices=("fast", "faster"), default=None,
                        help="the speed preset every request asks for (default: none, the model's settings)")
    parser.add_argument("--max-batch", type=int, default=16, help="the in-process server's --max-batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--replicas", type=int, default=None,
                        help="serve with omnidit serve --replicas N (Ray Serve) started from this process")
    parser.add_argument("--only-many", action="store_true", help="skip the one-client phase")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the pipeline alone at batch 1 and --max-batch (batching's ceiling)")
    parser.add_argument("--ceiling-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.ceiling_only:
        print(json.dumps(batching_ceiling(args.model, args.max_batch, args.steps, speed=args.speed)))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    server = None
    url = args.url
    threads = torch.get_num_threads()
    if url is None and args.replicas:
        from omnidit.serve.app import Limits
        from omnidit.serve.replicas import serve_replicas

        port = free_port()
        serve_replicas({args.model: args.model}, None, None, "cpu", {"limits": Limits(), "max_batch": args.max_batch},
                       "127.0.0.1", port, args.replicas, block=False)
        url = f"http://127.0.0.1:{port}"
    elif url is None:
        from omnidit.pipeline import load_pipeline
        from omnidit.serve.app import build_app
        from omnidit.serve.batching import reserve_torch_threads
        from omnidit.serve.command import BackgroundServer

        threads = reserve_torch_threads()  # as omnidit serve does: the sampling worker gets them
        app = build_app({args.model: load_pipeline(args.model, device="cpu")}, max_batch=args.max_batch,
                        threads=threads)
        server = BackgroundServer(app).start()
        url = server.url
    warm = {"prompt": PROMPTS[0], "steps": 2} | ({"speed": args.speed} if args.speed else {})
    httpx.post(f"{url}/v1/images/generations", json=warm, timeout=600)  # warm-up (and the preset's model copy)

    local = server is not None
    one = None if args.only_many else run_phase(url, 1, args.seconds, args.steps, seed_base=0, in_process=local,
                                                speed=args.speed)
    many = run_phase(url, args.clients, args.seconds, args.steps, seed_base=10**6, in_process=local, speed=args.speed)
    ratio = many["images_per_s"] / one["images_per_s"] if one and one["images_per_s"] else float("nan")
    print(f"{'clients':>8} {'req/s':>7} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'batch':>6} "
          f"{'errors':>6} {'RSS MiB start->end':>19}")
    for row in [r for r in (one, many) if r]:
        rss = (f"{row['rss_mib_start']:.0f} -> {row['rss_mib_end']:.0f}" if row["rss_mib_start"] else "n/a")
        print(f"{row['clients']:>8} {row['requests_per_s']:>7.2f} {row['images_per_s']:>7.2f} {row['p50_s']:>7.2f} "
              f"{row['p95_s']:>7.2f} {row['p99_s']:>7.2f} {row['mean_batch'] or 0:>6.2f} {row['errors']:>6} "
              f"{rss:>19}")
    print(f"images/s, {args.clients} clients / 1 client: {ratio:.2f}x")
    ceiling = None
    if args.ceiling:
        if server is not None:
            server.should_exit = True  # its worker must not share the cores with the timing
            time.sleep(1)
        # In a fresh process: torch threads used from two threads of one process slow each other (see
        # omnidit.serve.batching.reserve_torch_threads).
        command = [sys.executable, __file__, "--ceiling-only", "--model", args.model, "--max-batch",
                   str(args.max_batch)] + (["--steps", str(args.steps)] if args.steps else []) + \
            (["--speed", args.speed] if args.speed else [])
        ceiling = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(f"the pipeline alone, batch {args.max_batch} / batch 1: {ceiling['ratio']:.2f}x images/s "
              f"({ceiling['images_per_s_batch_1']:.2f} -> {ceiling[f'images_per_s_batch_{args.max_batch}']:.2f})")
    result = {"device": device_description(torch.device("cpu")), "torch_threads": threads,
              "model": args.model, "steps": args.steps, "speed": args.speed, "seconds_per_phase": args.seconds,
              "replicas": args.replicas, "one_client": one, "many_clients": many, "ratio_images_per_s": ratio,
              "batching_ceiling": ceiling,
              "command": "python " + shlex.join(sys.argv)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if server is not None:
        server.should_exit = True
    if args.replicas:
        from omnidit.serve.replicas import stop_replicas

        stop_replicas()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
