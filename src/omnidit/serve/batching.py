"""Dynamic batching: one worker thread draws every image, and concurrent requests whose settings match share
one sampling call.

Requests never touch shared state: each ``Job`` carries its own prompt, seeds and settings, and the worker
hands each its own slice of the batch. Image i of a request comes from seed SEED+i (``Pipeline.generate`` with
one seed per image), so an image is the same whether it was batched with others or drawn alone (eagerly: with
``--compile`` another batch size runs another graph, whose roundings may differ).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from omnidit.errors import OmniditError

ProgressFn = Callable[[dict], None]  # receives {"state": "queued" | "running", "step": k, "steps": n}


def reserve_torch_threads() -> int:
    """Give the calling thread one torch thread and return how many it had, for ``Batcher(threads=...)``.

    Call it before loading the models. With the OpenMP runtime of torch's CPU builds (libgomp), every thread
    that runs a parallel region keeps its own team of helper threads; once the helpers outnumber the cores,
    libgomp stops spinning at barriers and sleeps instead, so sampling in the worker thread ran 40-60 %
    slower on 2 cores when the main thread had loaded the model with 2 threads. A single-threaded main thread
    (loading, the event loop, encoding) never starts a team, and the worker keeps every core.
    """
    global _reserved_threads
    threads = torch.get_num_threads()
    if threads == 1 and _reserved_threads:  # called again from a thread it already reserved
        threads = _reserved_threads
    _reserved_threads = threads
    torch.set_num_threads(1)
    return threads


_reserved_threads: int | None = None  # what the first reserve_torch_threads call found


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already: answer 429 with ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """Every request of a batch went away (disconnected or timed out): stop sampling between steps."""


@dataclass
class Job:
    """One request: ``len(seeds)`` outputs of one prompt. ``key`` says what must match for two jobs to share
    a sampling call (model, size, frames, every sampling setting, the negative prompt); ``kwargs`` are
    ``Pipeline.generate`` (or ``generate_video`` when ``video``) keyword arguments without prompts and seeds.
    ``inpaint``: (image (1, C, H, W), mask (H, W) bool) for an edit request, drawn by ``Pipeline.inpaint``
    alone (its key is its own)."""

    model: str
    prompt: str
    seeds: list[int]
    kwargs: dict
    video: bool = False
    speed: str | None = None  # a --speed preset other than the server's (omnidit.quantize.speed_variant)
    progress: ProgressFn | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    inpaint: tuple | None = None

    @property
    def key(self) -> tuple:
        return (self.model, self.video, self.speed, tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())),
                None if self.inpaint is None else id(self))

    def notify(self, event: dict) -> None:
        if self.progress is not None:
            try:
                self.progress(event)
            except Exception:  # noqa: BLE001 - a listener's failure must not fail the batch
                pass


@dataclass
class BatchStats:
    """What the metrics read; updated by the worker thread."""

    batches: int = 0
    last_seconds_per_output: float = 1.0
    on_batch: Callable[[int, float], None] | None = None  # (outputs in the batch, seconds)


class Batcher:
    """Queue + one worker thread. ``pipelines`` maps a model name to a loaded ``Pipeline``.

    ``max_batch``: outputs per sampling call (a request larger than it runs alone); ``window``: seconds the
    worker waits after the first request of a batch for others to join it; ``max_queue``: requests waiting
    beyond which ``submit`` raises ``QueueFull``; ``threads``: torch threads for the worker (default: as the
    thread that starts it; see ``reserve_torch_threads``).
    """

    def __init__(self, pipelines: dict, max_batch: int = 16, window: float = 0.02, max_queue: int = 64,
                 threads: int | None = None) -> None:
        self.pipelines = pipelines
        self.max_batch, self.window, self.max_queue = max_batch, window, max_queue
        self.threads = threads
        self._variants: dict[tuple[str, str], object] = {}  # (model, speed) -> pipeline, made on first use
        self.stats = BatchStats()
        self._queue: list[Job] = []
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="omnidit-batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            for job in self._queue:
                job.future.cancel()
            self._queue.clear()
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a sampling call), not counting those whose clients went away."""
        with self._lock:
            return sum(not j.cancelled.is_set() for j in self._queue)

    def submit(self, job: Job) -> Future:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the batcher has stopped")
            self._queue = [j for j in self._queue if not self._drop_if_gone(j)]  # the gone free their places
            if len(self._queue) >= self.max_queue:
                waiting = sum(len(j.seeds) for j in self._queue)
                raise QueueFull(max(1, round(waiting * self.stats.last_seconds_per_output)))
            self._queue.append(job)
            self._lock.notify_all()
        job.notify({"state": "queued", "step": 0, "steps": job.kwargs.get("steps") or 0})
        return job.future

    # ---- the worker -------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        """Block until a job is waiting, then gather compatible ones for up to ``window`` seconds."""
        with self._lock:
            while not self._queue and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return []
            deadline = time.monotonic() + self.window
            while True:
                self._queue = [j for j in self._queue if not self._drop_if_gone(j)]
                if not self._queue:
                    return []
                first = self._queue[0]
                batch, size = [first], len(first.seeds)
                for job in self._queue[1:]:
                    if job.key == first.key and size + len(job.seeds) <= self.max_batch:
                        batch.append(job)
                        size += len(job.seeds)
                remaining = deadline - time.monotonic()
                if size >= self.max_batch or remaining <= 0:
                    break
                self._lock.wait(remaining)
            taken = {id(j) for j in batch}
            self._queue = [j for j in self._queue if id(j) not in taken]
            return batch

    @staticmethod
    def _drop_if_gone(job: Job) -> bool:
        if job.cancelled.is_set():
            job.future.cancel()
            return True
        return False

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # OpenMP's thread count is per calling thread
        while not self._stopping:
            batch = self._take_batch()
            if batch:
                self._draw(batch)

    def _draw(self, batch: list[Job]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if live:
            self._draw_live(live)

    def _pipeline(self, model: str, speed: str | None):
        """The served pipeline, or its copy at ``speed`` (made once, in this thread, on first use)."""
        if speed is None:
            return self.pipelines[model]
        if (model, speed) not in self._variants:
            from omnidit.quantize import speed_variant

            self._variants[model, speed] = speed_variant(self.pipelines[model], speed)
        return self._variants[model, speed]

    @staticmethod
    def _call(pipe, first: Job, prompts: list[str], seeds: list[int], on_step) -> torch.Tensor | list:
        """One sampling call for ``prompts`` / ``seeds`` with ``first``'s settings: images or clips (B, ...), or a
        list of (video, audio) for a clip with sound ((None, audio) for sound alone)."""
        if first.inpaint is not None:  # the image's own size
            kwargs = {k: v for k, v in first.kwargs.items() if k not in ("width", "height")}
            return pipe.inpaint(prompts, *first.inpaint, seed=seeds, on_step=on_step, **kwargs)
        if first.video and "audio" in pipe.model.config.extra_streams:  # a clip with its sound: (video, audio)
            made = pipe.generate_av(prompts, seed=seeds, on_step=on_step, **first.kwargs)
            return list(zip(made.video if made.video is not None else [None] * len(made.audio), made.audio))
        draw = pipe.generate_video if first.video else pipe.generate
        return draw(prompts, seed=seeds, on_step=on_step, **first.kwargs)

    def _draw_live(self, live: list[Job]) -> None:
        first = live[0]
        prompts = [j.prompt for j in live for _ in j.seeds]
        seeds = [s for j in live for s in j.seeds]

        def on_step(done: int, total: int) -> None:
            if all(j.cancelled.is_set() for j in live):
                raise Cancelled
            for j in live:
                j.notify({"state": "running", "step": done, "steps": total})

        start = time.monotonic()
        try:
            pipe = self._pipeline(first.model, first.speed)
            outputs, results, at = self._call(pipe, first, prompts, seeds, on_step), [], 0
            for j in live:  # each job's rows of the one call
                results.append(outputs[at:at + len(j.seeds)])
                at += len(j.seeds)
        except Cancelled:
            for j in live:
                j.future.set_exception(Cancelled())
            return
        except OmniditError as error:
            if len(live) > 1:  # one request's problem (its prompt, the batch's memory) must not fail the others
                for j in live:
                    self._draw_live([j])
                return
            first.future.set_exception(error)
            return
        except Exception as error:  # noqa: BLE001 - every waiting request gets the error, the worker goes on
            for j in live:
                j.future.set_exception(RuntimeError(f"{type(error).__name__}: {error}"))
            return
        seconds = time.monotonic() - start
        self.stats.batches += 1
        self.stats.last_seconds_per_output = seconds / len(seeds)
        if self.stats.on_batch is not None:
            self.stats.on_batch(len(seeds), seconds)
        for j, result in zip(live, results):
            j.future.set_result(result)
