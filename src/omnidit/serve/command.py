"""``omnidit serve``: its flags, their checks, loading the models and running uvicorn."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omnidit.errors import OmniditError

if TYPE_CHECKING:
    from fastapi import FastAPI
from omnidit.validate import check_number, parse_size

API_KEY_VARIABLE = "OMNIDIT_API_KEY"


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve models over HTTP: OpenAI's images API, a video endpoint and a web page",
        description="Serve one or more models over HTTP: POST /v1/images/generations (OpenAI's images API; "
                    "the official openai client works unchanged), POST /v1/videos/generations for video models, "
                    "GET /v1/models, /health, /metrics (Prometheus) and a web page at /. Concurrent requests "
                    "with matching settings are drawn in one batch; an image is the same batched or alone (without "
                    "--compile). "
                    "Needs the serve extra: pip install -e '.[serve]'.")
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]MODEL",
                   help="a shipped model's name (shapes, shapes-video) or a model folder, optionally named "
                        "(mine=runs/x); repeat to serve several; the first is the default "
                        "(default: shapes, and shapes-video when it is installed)")
    p.add_argument("--lora", action="append", default=None, metavar="[NAME=]FILE[:WEIGHT]",
                   help="apply a LoRA adapter file to the served model NAME (default: the first) at WEIGHT "
                        "(default 1); repeatable (docs/lora.md)")
    p.add_argument("--speed", default=None, choices=["default", "fast", "faster"],
                   help="serve every model at a --speed preset (docs/sampling.md): fast = the model's "
                        "guidance-distilled twin where one is shipped (shapes; no negative prompt) in int8 on a "
                        "CPU (bf16 on a GPU), else the model in int8 with step caching; faster = int8, step caching "
                        "and one candidate")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                                                       "(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_VARIABLE} if set, else "
                        "no key)")
    p.add_argument("--max-batch", type=int, default=16, help="outputs per sampling call (default: 16)")
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long the first request of a batch waits for others to join it (default: 20)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond which new ones get 429 with Retry-After (default: 64)")
    p.add_argument("--max-n", type=int, default=10, help="outputs per request (default: 10, as OpenAI's API)")
    p.add_argument("--max-size", default="512x512",
                   help="the largest image or frame, as WIDTHxHEIGHT: its pixel count bounds every request's size "
                        "(default: 512x512)")
    p.add_argument("--max-steps", type=int, default=200, help="sampling steps per request (default: 200)")
    p.add_argument("--max-frames", type=int, default=64, help="frames per clip (default: 64)")
    p.add_argument("--max-prompt-chars", type=int, default=1000, help="characters per prompt (default: 1000)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds from a request's arrival to its answer; past it, 504 and its work is dropped "
                        "(default: 300)")
    p.add_argument("--url-ttl", type=float, default=600.0,
                   help="seconds a response_format=url result stays downloadable (kept in memory; default: 600)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model's transformer blocks (regional compilation) before serving; the "
                        "first request at each size pays for compiling (docs/sampling.md)")
    p.add_argument("--replicas", type=int, default=1,
                   help="run N copies of the server behind Ray Serve's proxy, each in its own process with its own "
                        "batching, sharing url files and progress events through one more Ray actor (needs the ray "
                        "extra: pip install -e '.[ray]') (default: 1, no Ray)")
    p.add_argument("--ray-address", default=None,
                   help="run the replicas on this Ray cluster (e.g. 'auto' after 'ray start --head' here, or "
                        "HOST:6379) instead of a Ray started for this command; every machine needs the models")
    p.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs Ray reserves for each replica, also its torch threads (default: this machine's "
                        "cores shared by the replicas; 1 on a --ray-address cluster)")


def parse_models(values: list[str] | None) -> dict[str, str]:
    """--model values -> {name: model path or shipped name}, checked for duplicates."""
    from omnidit.checkpoint import SHIPPED_MODELS, shipped_model_dir

    if not values:
        values = ["shapes"]
        try:
            if "shapes-video" in SHIPPED_MODELS and shipped_model_dir("shapes-video").is_dir():
                values.append("shapes-video")
        except OmniditError:
            pass
    models: dict[str, str] = {}
    for value in values:
        if "=" in value and not Path(value).exists():  # NAME=PATH (a folder named runs/lr=1e-4 stays a path)
            name, _, path = (part.strip() for part in value.partition("="))
            if not name or not path:
                raise OmniditError(f"--model {value!r} is empty on one side of '='",
                                   hint="e.g. --model mine=runs/x")
        else:
            name, path = (value if value in SHIPPED_MODELS else Path(value).resolve().name), value
            if not name:
                raise OmniditError(f"--model {value!r} has no folder name to serve it under",
                                   hint="name it: --model mine=PATH")
        if name in models:
            raise OmniditError(f"two models are named '{name}'", hint="name them: --model a=PATH --model b=PATH")
        models[name] = path
    return models


def check_port_free(host: str, port: int) -> None:
    """An OmniditError naming the port when something already listens there (uvicorn would log and exit)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror as error:  # the host, not the port
            raise OmniditError(f"cannot listen on {host}:{port}: --host {host} is not an address here "
                               f"({error.strerror})", hint="e.g. --host 127.0.0.1, or 0.0.0.0 for every interface") \
                from None
        except OSError as error:
            hint = ("choose another --port, or stop what uses it" if error.errno == errno.EADDRINUSE
                    else "check --host (an address of this machine) and --port")
            raise OmniditError(f"cannot listen on {host}:{port}: {error.strerror}", hint=hint) from None


def split_serve_lora(spec: str, served: list[str]) -> tuple[str, str]:
    """--lora [NAME=]FILE[:WEIGHT] -> (served model's name, FILE[:WEIGHT]); NAME defaults to the first model."""
    name, sep, rest = spec.partition("=")
    if sep and name in served:
        return name, rest
    if sep and not Path(spec).is_file() and Path(rest.rpartition(":")[0] or rest).is_file():
        raise OmniditError(f"--lora {spec}: no served model is named '{name}'",
                           hint=f"name one of {', '.join(served)}, or drop '{name}='")
    return served[0], spec


def apply_serve_loras(pipelines: dict, specs: list[str] | None) -> dict[str, list[str]]:
    """--lora [NAME=]FILE[:WEIGHT]: each adapter onto the named served model (default: the first one)."""
    from omnidit.lora import apply_lora_specs

    applied: dict[str, list[str]] = {}
    for spec in specs or []:
        name, rest = split_serve_lora(spec, list(pipelines))
        applied.setdefault(name, []).extend(apply_lora_specs(pipelines[name].model, [rest]))
    return applied


def build_served_app(models: dict[str, str], loras: list[str] | None, speed: str | None, device: str,
                     compile_blocks: bool = False, **app_options) -> FastAPI:
    """Load ``models`` (name -> shipped name or folder) with their LoRA adapters at a --speed preset (and
    compiled, with ``compile_blocks``) and return the server's ASGI app; ``app_options`` go to ``build_app``.
    The calling thread keeps one torch thread and the sampling worker gets the rest (``reserve_torch_threads``)."""
    from omnidit.pipeline import load_pipeline
    from omnidit.quantize import apply_speed
    from omnidit.serve.app import build_app
    from omnidit.serve.batching import reserve_torch_threads

    threads = reserve_torch_threads()
    pipelines = {name: load_pipeline(path, device=device) for name, path in models.items()}
    apply_serve_loras(pipelines, loras)
    for pipe in pipelines.values():
        apply_speed(pipe, speed)
        if compile_blocks:
            pipe.model.compile_blocks()
    return build_app(pipelines, threads=threads, speed=speed, **app_options)


def _check_for_replicas(models: dict[str, str], loras: list[str] | None) -> tuple[dict[str, str], list[str]]:
    """What the replicas will load, checked here first (a replica's error would reach us buried in Ray's):
    models resolve to folders with a readable config and LoRA files exist. Returns the models and --lora specs
    with absolute paths, since a replica's process need not share this one's working folder."""
    from omnidit.checkpoint import SHIPPED_MODELS, read_config, resolve_model_dir
    from omnidit.lora import parse_lora_spec

    resolved = {}
    for name, path in models.items():
        folder = resolve_model_dir(path)
        read_config(folder)
        resolved[name] = path if path in SHIPPED_MODELS and not Path(path).exists() else str(folder.resolve())
    specs = []
    for spec in loras or []:
        name, rest = split_serve_lora(spec, list(models))
        file, weight = parse_lora_spec(rest)
        if not Path(file).is_file():
            raise OmniditError(f"--lora {spec}: no such file {file}", hint="check the path")
        specs.append(f"{name}={Path(file).resolve()}:{weight:g}")
    return resolved, specs


def cmd_serve(args: argparse.Namespace) -> None:
    check_number("--port", args.port, low=0, high=65535, integer=True)
    check_number("--replicas", args.replicas, low=1, high=1024, integer=True)
    if args.replica_cpus is not None:
        check_number("--replica-cpus", args.replica_cpus, low=0, low_open=True, high=4096)
        if args.replicas == 1 and not args.ray_address:
            raise OmniditError("--replica-cpus applies to replicas", hint="add --replicas N (or --ray-address)")
    for flag in ("max_batch", "max_queue", "max_n", "max_steps", "max_frames", "max_prompt_chars"):
        check_number(f"--{flag.replace('_', '-')}", getattr(args, flag), low=1, high=10**6, integer=True)
    check_number("--batch-window-ms", args.batch_window_ms, low=0, high=10_000)
    check_number("--timeout", args.timeout, low=0, low_open=True, high=86_400)
    check_number("--url-ttl", args.url_ttl, low=0, low_open=True, high=86_400)
    width, height = parse_size(args.max_size)
    try:
        import uvicorn

        from omnidit.serve.app import Limits
    except ImportError as error:
        raise OmniditError(f"omnidit serve needs {error.name}", hint="pip install -e '.[serve]'") from None
    models = parse_models(args.model)
    check_port_free(args.host, args.port)
    limits = Limits(max_n=args.max_n, max_pixels=width * height, max_steps=args.max_steps,
                    max_prompt_chars=args.max_prompt_chars, max_frames=args.max_frames, timeout=args.timeout,
                    url_ttl=args.url_ttl)
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    app_options = {"limits": limits, "api_key": api_key, "max_batch": args.max_batch,
                   "batch_window": args.batch_window_ms / 1000, "max_queue": args.max_queue,
                   "compile_blocks": args.compile}
    if args.replicas > 1 or args.ray_address:
        from omnidit.serve.replicas import serve_replicas

        resolved, loras = _check_for_replicas(models, args.lora)
        serve_replicas(resolved, loras, args.speed, args.device, app_options, args.host, args.port, args.replicas,
                       args.ray_address, args.replica_cpus)
        return
    app = build_served_app(models, args.lora, args.speed, args.device, **app_options)
    print(f"serving {', '.join(models)} on http://{args.host}:{args.port}/ "
          f"({'API key required' if api_key else 'no API key'}); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


class BackgroundServer:
    """An ASGI app under uvicorn on a free loopback port, in a daemon thread: for load tests, scripts and tests.
    ``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``; ``start()`` alone leaves it running
    until ``stop()`` or the process ends."""

    def __init__(self, app, timeout: float = 60.0) -> None:
        import uvicorn

        self.app, self.timeout = app, timeout
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start within {self.timeout:g} s")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
