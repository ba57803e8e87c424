"""``omnidit serve --replicas N``: N copies of the same server behind Ray Serve's HTTP proxy (the ``ray``
extra), on this machine or on a Ray cluster (``--ray-address``).

Each replica is a whole omnidit server in its own process: it loads the models itself, batches the requests
that reach it and keeps its own limits and metrics. Ray's proxy spreads requests over the replicas, so
anything that needs a second request to reach the same replica cannot work: ``response_format=url`` is
refused with a 400 naming ``b64_json`` instead, and the page's live progress bar only moves when its event
stream happens to reach the replica drawing the image (the image itself always arrives).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from omnidit.errors import OmniditError

APP_NAME = "omnidit"


def replica_builder(models: dict[str, str], loras: list[str] | None, speed: str | None, device: str,
                    threads: int | None, app_options: dict) -> Callable[[], object]:
    """A function of no arguments that loads the models and returns the server's ASGI app; Ray runs it in
    each replica (it is pickled with what it closes over, so it holds only names, paths and numbers)."""

    def build():
        import torch

        from omnidit.serve.command import build_served_app

        if threads:
            torch.set_num_threads(threads)  # before reserve_torch_threads reads it
        return build_served_app(models, loras, speed, device, **app_options)

    return build


def serve_replicas(models: dict[str, str], loras: list[str] | None, speed: str | None, device: str,
                   app_options: dict, host: str, port: int, replicas: int, address: str | None = None,
                   replica_cpus: float | None = None, block: bool = True) -> None:
    """Start Ray (or join the cluster at ``address``), run ``replicas`` copies of the server behind Ray
    Serve's proxy on ``host:port`` and, when ``block``, serve until Ctrl-C. ``replica_cpus``: CPUs Ray
    reserves for each replica, which is also its torch thread count (default: this machine's cores shared
    evenly on a local Ray; 1 on a cluster)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise OmniditError("--replicas needs Ray Serve", hint="pip install -e '.[ray]'") from None
    local = address is None
    if replica_cpus is None:
        replica_cpus = max(1.0, (os.cpu_count() or 1) / replicas) if local else 1.0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines would bury ours
    try:
        if local:
            ray.init(num_cpus=max(replicas * replica_cpus, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as error:  # noqa: BLE001 - a wrong address, a RAY_ADDRESS clash: one line, not Ray's traceback
        raise OmniditError(f"Ray did not start: {_last_line(error)}",
                           hint="check --ray-address (e.g. 'auto' after 'ray start --head')") from None
    # Ray gives each replica the GPU it reserved as cuda:0 (CUDA_VISIBLE_DEVICES), and a replica that asks for a
    # GPU the cluster lacks would wait for ever, so both are settled here.
    have = ray.cluster_resources().get("GPU", 0)
    gpus = 1 if device.startswith("cuda") or (device == "auto" and have) else 0
    if gpus and have < replicas:
        stop_replicas(local)
        raise OmniditError(f"{replicas} replicas need {replicas} GPUs; the Ray cluster has {have:g}",
                           hint="use fewer --replicas, or --device cpu")
    device = "cuda" if gpus else device
    options = dict(app_options, url_results=False)
    build = replica_builder(models, loras, speed, device, max(1, int(replica_cpus)), options)
    # A replica batches the requests it holds, so Ray must let it hold as many as its own queue admits; past
    # that its 429 answers, as a single server's do.
    ongoing = options.get("max_queue", 64) + options.get("max_batch", 16)
    deployment = serve.deployment(serve.ingress(build)(), name=APP_NAME, num_replicas=replicas,
                                  max_ongoing_requests=ongoing,
                                  ray_actor_options={"num_cpus": replica_cpus, "num_gpus": gpus})
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")
    except Exception as error:  # noqa: BLE001 - a replica's failure reaches us as Ray's error with its traceback
        stop_replicas(local)
        raise OmniditError(f"the replicas did not start: {_last_line(error)}",
                           hint="run without --replicas to see the error in full") from None
    if not block:
        return
    print(f"serving {', '.join(models)} on http://{host}:{port}/ with {replicas} replicas (Ray Serve); "
          "Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `kill` also shuts the replicas down
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_replicas(local)


def stop_replicas(local: bool = True) -> None:
    """Remove the omnidit application, and when Ray was started for it (``local``), Serve and Ray themselves; on
    a shared cluster the other applications keep running. A no-op when Ray is not running."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if local:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    ray.shutdown()


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "OmniditError" in line or "Error:" in line]
    return (named or lines or [type(error).__name__])[-1][:300]
