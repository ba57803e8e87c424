"""``omnidit serve --replicas N``: N copies of the same server behind Ray Serve's HTTP proxy (the ``ray``
extra), on this machine or on a Ray cluster (``--ray-address``).

Each replica is a whole omnidit server in its own process: it loads the models itself, batches the requests
that reach it and keeps its own limits and metrics. Ray's proxy spreads requests over the replicas, so what a
second request must find (a ``response_format=url`` file, the progress events of an image that another replica
draws) lives in one more actor, ``SharedState``, that every replica reaches through ``RemoteFiles`` and
``RemoteProgress`` (the interfaces of the single server's ``FileStore`` and ``ProgressHub``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.actor import ActorHandle

from omnidit.errors import OmniditError

APP_NAME = "omnidit"
POLL_SECONDS = 0.1  # how often a replica asks the shared state for a listener's new progress events


class SharedState:
    """What every replica must see alike, held in one Ray actor: the url results (a ``FileStore``: in memory,
    for the url ttl, bounded in bytes) and the progress events of each ``progress_id``, numbered from 0 in the
    order they arrive and kept for ``events_ttl`` seconds after the last one, so that a listener on any replica
    reads them (at most ``max_ids`` ids and the last ``max_events`` events of each: the oldest go first). Its
    methods are quick and run one at a time, so the events one replica sends arrive in the order it sent them."""

    def __init__(self, url_ttl: float, events_ttl: float = 300.0, max_ids: int = 4096, max_events: int = 1024
                 ) -> None:
        from omnidit.serve.app import FileStore

        self.files = FileStore(url_ttl)
        self.events_ttl, self.max_ids, self.max_events = events_ttl, max_ids, max(1, max_events)
        # id -> (number of the first event kept, the events kept, expiry); the most recently published id last
        self._events: OrderedDict[str, tuple[int, list[dict], float]] = OrderedDict()

    def put(self, data: bytes, media_type: str) -> str:
        return self.files.put(data, media_type)

    def get(self, name: str) -> tuple[bytes, str] | None:
        return self.files.get(name)

    def publish(self, progress_id: str, event: dict) -> None:
        now = time.monotonic()
        first, events, _ = self._events.pop(progress_id, (0, [], 0.0))
        events = [*events, event]
        dropped = max(0, len(events) - self.max_events)
        self._events[progress_id] = (first + dropped, events[dropped:], now + self.events_ttl)
        while self._events and (len(self._events) > self.max_ids or next(iter(self._events.values()))[2] < now):
            self._events.popitem(last=False)

    def end(self, progress_id: str) -> int:
        """The number the next event of ``progress_id`` will have: a new listener reads from there."""
        first, events, _ = self._events.get(progress_id, (0, [], 0.0))
        return first + len(events)

    def events_after(self, progress_id: str, seen: int) -> tuple[list[dict], int]:
        """(the kept events numbered ``seen`` and on, the number after them)."""
        first, events, _ = self._events.get(progress_id, (0, [], 0.0))
        return events[max(0, seen - first):], first + len(events)


class RemoteFiles:
    """``FileStore``'s interface over the shared actor (called from worker threads, never the event loop)."""

    def __init__(self, shared: ActorHandle) -> None:
        self.shared = shared

    def put(self, data: bytes, media_type: str) -> str:
        import ray

        return ray.get(self.shared.put.remote(data, media_type))

    def get(self, name: str) -> tuple[bytes, str] | None:
        import ray

        return ray.get(self.shared.get.remote(name))


class RemoteProgress:
    """``ProgressHub``'s interface over the shared actor: ``publish`` sends an event without waiting (from the
    sampling thread or the event loop); a listener starts at the id's current end (a reused id does not replay an
    earlier request's events) and its queue is filled by a task that asks the actor for new events every
    ``POLL_SECONDS`` until the listener leaves. At most ``max_subscribers`` listeners per replica."""

    def __init__(self, shared: ActorHandle, max_subscribers: int = 256) -> None:
        self.shared, self.max_subscribers = shared, max_subscribers
        self._pollers: dict[int, asyncio.Task] = {}

    def publish(self, progress_id: str, event: dict) -> None:
        self.shared.publish.remote(progress_id, event)

    async def subscribe(self, progress_id: str) -> asyncio.Queue:
        from omnidit.serve.app import check_listeners

        check_listeners(len(self._pollers), self.max_subscribers)
        start = await self.shared.end.remote(progress_id)  # before the listener hears anything, so before its request
        queue: asyncio.Queue = asyncio.Queue(maxsize=1024)
        self._pollers[id(queue)] = asyncio.get_running_loop().create_task(self._poll(progress_id, queue, start))
        return queue

    def unsubscribe(self, progress_id: str, queue: asyncio.Queue) -> None:
        poller = self._pollers.pop(id(queue), None)
        if poller is not None:
            poller.cancel()

    async def _poll(self, progress_id: str, queue: asyncio.Queue, seen: int) -> None:
        from omnidit.serve.app import offer

        try:
            while True:
                events, seen = await self.shared.events_after.remote(progress_id, seen)
                for event in events:
                    offer(queue, event)
                await asyncio.sleep(POLL_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the shared actor is gone: end the stream rather than hang it
            offer(queue, {"state": "error", "message": f"progress is unavailable: {type(error).__name__}"})


def replica_builder(models: dict[str, str], loras: list[str] | None, speed: str | None, device: str,
                    threads: int | None, app_options: dict, shared: ActorHandle | None = None
                    ) -> Callable[[], object]:
    """A function of no arguments that loads the models and returns the server's ASGI app; Ray runs it in
    each replica (it is pickled with what it closes over, so it holds only names, paths, numbers and the
    handle of the ``SharedState`` actor, when given, whose url files and progress events the app uses)."""

    def build():
        import torch

        from omnidit.serve.command import build_served_app

        if threads:
            torch.set_num_threads(threads)  # before reserve_torch_threads reads it
        stores = {"files": RemoteFiles(shared), "hub": RemoteProgress(shared)} if shared is not None else {}
        return build_served_app(models, loras, speed, device, **app_options, **stores)

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
    limits = app_options.get("limits")
    shared = ray.remote(SharedState).options(num_cpus=0).remote(limits.url_ttl if limits else 600.0)
    build = replica_builder(models, loras, speed, device, max(1, int(replica_cpus)), app_options, shared)
    # A replica batches the requests it holds, so Ray must let it hold as many as its own queue admits; past
    # that its 429 answers, as a single server's do.
    ongoing = app_options.get("max_queue", 64) + app_options.get("max_batch", 16)
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
