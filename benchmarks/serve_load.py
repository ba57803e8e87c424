"""Load test for ``omnidit serve``: N concurrent clients against one client sending the same requests one
after another, on loopback, each for a bounded time.

The server runs in this process (uvicorn in a thread, the shipped shapes model unless --model) or is an
already running one (--url). Each client posts ``POST /v1/images/generations`` requests back to back (one
image each, seed = a counter, the model's default settings unless --steps) until --seconds have passed;
requests that are in flight then finish and count. Reported per phase: requests/s, images/s, latency
p50 / p95 / p99, the mean batch size (from the server's /metrics), errors, and the server process's
resident memory at the start and end of the phase (in-process server only). The ratio row is images/s of N
clients over one client: dynamic batching's gain (the issue's target: >= 3x at 8 clients, zero errors).

Example:
    python benchmarks/serve_load.py --clients 8 --seconds 60 --json benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
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


def run_phase(url: str, clients: int, seconds: float, steps: int | None, seed_base: int) -> dict:
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
    rss_before = rss_mib()
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
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
            "rss_mib_start": rss_before, "rss_mib_end": rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start one in this process)")
    parser.add_argument("--model", default="shapes", help="model for the in-process server (default: shapes)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the second phase (default: 8)")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of each phase (default: 60)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps per request (default: the model's)")
    parser.add_argument("--max-batch", type=int, default=16, help="the in-process server's --max-batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    server = None
    url = args.url
    if url is None:
        import uvicorn

        from omnidit.pipeline import load_pipeline
        from omnidit.serve.app import build_app

        app = build_app({args.model: load_pipeline(args.model, device="cpu")}, max_batch=args.max_batch)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPTS[0], "steps": 2}, timeout=600)  # warm-up

    one = run_phase(url, 1, args.seconds, args.steps, seed_base=0)
    many = run_phase(url, args.clients, args.seconds, args.steps, seed_base=10**6)
    ratio = many["images_per_s"] / one["images_per_s"] if one["images_per_s"] else float("nan")
    print(f"{'clients':>8} {'req/s':>7} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'batch':>6} "
          f"{'errors':>6} {'RSS MiB start->end':>19}")
    for row in (one, many):
        rss = (f"{row['rss_mib_start']:.0f} -> {row['rss_mib_end']:.0f}" if row["rss_mib_start"] else "n/a")
        print(f"{row['clients']:>8} {row['requests_per_s']:>7.2f} {row['images_per_s']:>7.2f} {row['p50_s']:>7.2f} "
              f"{row['p95_s']:>7.2f} {row['p99_s']:>7.2f} {row['mean_batch'] or 0:>6.2f} {row['errors']:>6} "
              f"{rss:>19}")
    print(f"images/s, {args.clients} clients / 1 client: {ratio:.2f}x")
    result = {"device": device_description(torch.device("cpu")), "torch_threads": torch.get_num_threads(),
              "model": args.model, "steps": args.steps, "seconds_per_phase": args.seconds,
              "one_client": one, "many_clients": many, "ratio_images_per_s": ratio,
              "command": "python " + " ".join(sys.argv)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if server is not None:
        server.should_exit = True


if __name__ == "__main__":
    main()
