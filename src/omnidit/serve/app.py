"""The HTTP API: OpenAI's images interface (``POST /v1/images/generations``, and ``/v1/images/edits`` by
inpainting: serve/edits.py) for every omnidit model, a video endpoint in the same style, models, health,
Prometheus metrics, per-step progress as server-sent events, and the web page at ``/``.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a request the model
cannot honour, 401 for a missing or wrong API key, 404 for an unknown model, 422 for a field of the wrong
type or range (``param`` names it), 429 with ``Retry-After`` when the queue is full, 504 past the timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnidit.errors import OmniditError
from omnidit.layout import Box, box_metadata, check_box, check_layout
from omnidit.serve.batching import Batcher, Cancelled, Job, QueueFull
from omnidit.tokens import check_frame_count, check_image_size
from omnidit.validate import parse_size, random_seed

PAGE = Path(__file__).with_name("page.html")
MAX_SEED = 2**63 - 16  # image i uses seed + i


@dataclass
class Limits:
    """What one request may ask for (``omnidit serve`` flags)."""

    max_n: int = 10
    max_pixels: int = 512 * 512  # width x height of one image or frame
    max_steps: int = 200
    max_prompt_chars: int = 1000
    max_frames: int = 64
    timeout: float = 300.0  # seconds from arrival to answer
    url_ttl: float = 600.0  # seconds a response_format=url file stays available


class LayoutBox(BaseModel):
    """A phrase and its box (x0, y0, x1, y1) in fractions of the width and height, y down (omnidit.layout)."""

    model_config = ConfigDict(extra="forbid")
    phrase: str
    box: list[float] = Field(min_length=4, max_length=4)


class ImageRequest(BaseModel):
    """OpenAI's image generation request; ``seed``, ``steps``, ``guidance_scale``, ``negative_prompt``, ``boxes``
    (models with a layout adapter) and ``progress_id`` are omnidit's extensions. Unknown fields are refused (as
    OpenAI does), so a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    model: str | None = Field(None, max_length=256)
    n: int = Field(1, ge=1)
    size: str | None = None  # "WxH"; None or "auto": the model's own size
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: Literal["auto", "standard"] | None = None  # accepted for compatibility: there is one quality
    user: str | None = Field(None, max_length=256)  # accepted for compatibility: OpenAI's end-user id, unused here
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    negative_prompt: str = ""
    speed: Literal["default", "fast", "faster"] | None = None  # omnidit's --speed presets, per request
    boxes: list[LayoutBox] | None = None  # layout boxes, for a model with a layout adapter
    progress_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")


class VideoRequest(ImageRequest):
    """The image request for clips: ``frames`` and ``fps`` (default: the model's), MP4 / GIF / WebP out."""

    output_format: Literal["mp4", "gif", "webp"] = "mp4"  # type: ignore[assignment]
    frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0, le=240)


class AudioRequest(ImageRequest):
    """The image request for sound alone, from a model with a sound stream: ``seconds`` (default: the model's),
    16-bit PCM WAV out at the model's sample rate. ``size`` and ``boxes`` do not apply."""

    output_format: Literal["wav"] = "wav"  # type: ignore[assignment]
    seconds: float | None = Field(None, gt=0)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status,
                                                                        "server_error" if status >= 500 else
                                                                        "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class FileStore:
    """response_format=url: encoded outputs kept in memory for ``ttl`` seconds (nothing is written to disk),
    at most ``max_bytes`` in all (the oldest go first)."""

    def __init__(self, ttl: float, max_bytes: int = 256 * 2**20) -> None:
        self.ttl, self.max_bytes = ttl, max_bytes
        self._files: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        name = secrets.token_urlsafe(16)
        with self._lock:
            self._expire()
            self._files[name] = (data, media_type, time.monotonic() + self.ttl)
            while sum(len(d) for d, _, _ in self._files.values()) > self.max_bytes and len(self._files) > 1:
                self._files.popitem(last=False)
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        with self._lock:
            self._expire()
            found = self._files.get(name)
        return None if found is None else found[:2]

    def _expire(self) -> None:
        now = time.monotonic()
        for name in [k for k, (_, _, until) in self._files.items() if until < now]:
            del self._files[name]


class Files(Protocol):
    """Where url results live: ``FileStore`` here, ``serve.replicas.RemoteFiles`` shared by replicas."""

    def put(self, data: bytes, media_type: str) -> str: ...

    def get(self, name: str) -> tuple[bytes, str] | None: ...


class Progress(Protocol):
    """Where progress events go: ``ProgressHub`` here, ``serve.replicas.RemoteProgress`` shared by replicas. A
    listener gets the events published after ``subscribe`` returns, in order."""

    async def subscribe(self, progress_id: str) -> asyncio.Queue: ...

    def unsubscribe(self, progress_id: str, queue: asyncio.Queue) -> None: ...

    def publish(self, progress_id: str, event: dict) -> None: ...


def check_listeners(count: int, limit: int) -> None:
    """The 429 for one progress listener too many."""
    if count >= limit:
        raise ApiError(429, "too many progress listeners", code="too_many_listeners", headers={"Retry-After": "1"})


def offer(queue: asyncio.Queue, event: dict) -> None:
    """Put ``event`` on a listener's queue unless it is full (a listener that stopped reading loses events)."""
    if not queue.full():
        queue.put_nowait(event)


class ProgressHub:
    """Per-step progress for the page: subscribers listen on a ``progress_id`` the page chose, the worker
    thread publishes into their asyncio queues. Bounded: ``max_subscribers`` ids, events without a listener
    are dropped."""

    def __init__(self, max_subscribers: int = 256) -> None:
        self.max_subscribers = max_subscribers
        self._queues: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = {}
        self._lock = threading.Lock()

    async def subscribe(self, progress_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=1024)
        with self._lock:
            check_listeners(sum(len(v) for v in self._queues.values()), self.max_subscribers)
            self._queues.setdefault(progress_id, []).append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, progress_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            listeners = [q for q in self._queues.get(progress_id, []) if q[1] is not queue]
            if listeners:
                self._queues[progress_id] = listeners
            else:
                self._queues.pop(progress_id, None)

    def publish(self, progress_id: str, event: dict) -> None:
        with self._lock:
            listeners = list(self._queues.get(progress_id, []))
        for loop, queue in listeners:
            loop.call_soon_threadsafe(offer, queue, event)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("omnidit_requests", "Requests answered, by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.outputs = Counter("omnidit_outputs", "Images and clips generated", registry=r)
        self.latency = Histogram("omnidit_request_seconds", "Generation request latency, arrival to answer",
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300), registry=r)
        self.batch_size = Histogram("omnidit_batch_size", "Outputs per sampling call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("omnidit_queue_depth", "Requests waiting for a sampling call", registry=r)


class _Guard:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the endpoints):
    checks the API key on /v1/ (but /v1/files/ and /v1/progress/, whose ids are the credential) and counts
    answers by endpoint and status, with every path outside the fixed endpoints counted as "other" so that the
    series stay bounded."""

    ENDPOINTS = ("/v1/images/generations", "/v1/videos/generations", "/v1/audio/generations", "/v1/models",
                 "/health", "/metrics", "/")

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith(("/v1/files/", "/v1/progress/")):
            return await self.app(scope, receive, send)
        label = path if path in self.ENDPOINTS else "other"
        if self.api_key and path.startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                self.metrics.requests.labels(label, "401").inc()
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        status = ["500"]

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(label, status[0]).inc()


def build_app(pipelines: dict, limits: Limits | None = None, api_key: str | None = None, max_batch: int = 16,
              batch_window: float = 0.02, max_queue: int = 64, threads: int | None = None,
              speed: str | None = None, files: Files | None = None, hub: Progress | None = None) -> FastAPI:
    """The ASGI app serving ``pipelines`` (name -> loaded ``Pipeline``; the first is the default model).
    ``threads``: torch threads of the sampling worker (``batching.reserve_torch_threads``); ``speed``: the
    --speed preset the pipelines already run at (a request may ask for that one or a faster one). ``files`` and
    ``hub``: where url results and progress events live (default: in this process; replicas pass stores that
    every replica shares, omnidit.serve.replicas)."""
    if not pipelines:
        raise OmniditError("no model to serve", hint="pass --model shapes (or a model folder)")
    limits = limits or Limits()
    metrics = Metrics()
    batcher = Batcher(pipelines, max_batch=max_batch, window=batch_window, max_queue=max_queue, threads=threads)
    batcher.stats.on_batch = lambda size, seconds: metrics.batch_size.observe(size)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    files = files if files is not None else FileStore(limits.url_ttl)
    hub = hub if hub is not None else ProgressHub()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="omnidit", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.batcher, app.state.limits, app.state.metrics = batcher, limits, metrics

    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field '{param}'"
        elif first.get("type") == "missing":
            message = f"the field '{param}' is required"
        else:
            message = f"{param}: {message}" if param else message
        return error_response(422, message, param=param, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), code="not_found" if error.status_code == 404
                              else None, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(error).__name__}: {error}"[:500], code="internal_error")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code, error.headers)

    @app.exception_handler(OmniditError)
    async def _omnidit_error(request: Request, error: OmniditError) -> JSONResponse:
        return error_response(400, str(error), code="invalid_request")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        # pid: which process answered (replicas behind Ray Serve are separate processes)
        return {"status": "ok", "models": list(pipelines), "queue_depth": batcher.depth, "pid": os.getpid()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(name, pipe) for name, pipe in pipelines.items()]}

    @app.get("/v1/files/{name}")
    async def stored(name: str) -> Response:
        found = await asyncio.to_thread(files.get, name.split(".")[0])  # a replica's store is another process
        if found is None:
            raise ApiError(404, "no such file: it expired or never existed", code="file_not_found")
        return Response(found[0], media_type=found[1])

    @app.get("/v1/progress/{progress_id}")
    async def progress(progress_id: str, request: Request) -> StreamingResponse:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", progress_id):
            raise ApiError(422, "progress_id: 1-64 letters, digits, '-' or '_'", param="progress_id")
        queue = await hub.subscribe(progress_id)

        async def events():
            try:
                yield ": listening\n\n"
                while not await request.is_disconnected():
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield f"data: {json.dumps(event)}\n\n"
                    if event.get("state") in ("done", "error"):
                        break
            finally:
                hub.unsubscribe(progress_id, queue)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def generate(body: ImageRequest, request: Request, video: bool, inpaint: tuple | None = None,
                       sound: bool = False) -> dict:
        """``video``: the clips endpoint; ``sound``: the sound endpoint (sound alone, drawn as a clip job)."""
        started = time.monotonic()
        name = body.model or next(iter(pipelines))
        if name not in pipelines:
            raise ApiError(404, f"the model '{name}' is not served here; served: {', '.join(pipelines)}",
                           param="model", code="model_not_found")
        pipe = pipelines[name]
        makes_clips = pipe.config.data.frames > 1
        if sound and "audio" not in pipe.model.config.extra_streams:
            where = "/v1/videos/generations" if makes_clips else "/v1/images/generations"
            raise ApiError(400, f"the model '{name}' makes no sound: use {where}", param="model",
                           code="wrong_endpoint")
        if makes_clips != video and not sound:
            where = "/v1/videos/generations" if makes_clips else "/v1/images/generations"
            raise ApiError(400, f"the model '{name}' makes {'clips' if makes_clips else 'images'}: use {where}",
                           param="model", code="wrong_endpoint")
        job = _sound_job(body, name, pipe, limits) if sound else _job(body, name, pipe, limits, video)
        job.speed, job.inpaint = _request_speed(body.speed, speed), inpaint
        progress_id = body.progress_id
        if progress_id:
            job.progress = lambda event: hub.publish(progress_id, event)
        try:
            future = batcher.submit(job)
        except QueueFull as full:
            raise ApiError(429, f"{full}", code="queue_full", headers={"Retry-After": str(full.retry_after)}) from None
        outputs = await _wait(future, job, request, started + limits.timeout, limits.timeout)
        metrics.outputs.inc(len(job.seeds))
        data = await asyncio.to_thread(_encode, body, name, pipe, job, outputs, files, str(request.base_url))
        metrics.latency.observe(time.monotonic() - started)
        job.notify({"state": "done", "step": job.kwargs["steps"], "steps": job.kwargs["steps"]})
        return {"created": int(time.time()), "data": data}

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest, request: Request) -> dict:
        return await _publishing_errors(generate(body, request, video=False), body, hub)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> dict:
        from omnidit.serve.edits import read_edit_request

        body, given = await read_edit_request(request, limits.max_pixels)
        return await _publishing_errors(generate(body, request, video=False, inpaint=given), body, hub)

    @app.post("/v1/videos/generations")
    async def videos(body: VideoRequest, request: Request) -> dict:
        return await _publishing_errors(generate(body, request, video=True), body, hub)

    @app.post("/v1/audio/generations")
    async def audio(body: AudioRequest, request: Request) -> dict:
        return await _publishing_errors(generate(body, request, video=True, sound=True), body, hub)

    return app


def _request_speed(asked: str | None, served: str | None) -> str | None:
    """The preset a job runs at beyond the server's own (None: the served pipeline as it is). A preset cannot
    be undone on a copy of an already quantized model, so a request may not ask for a slower one."""
    from omnidit.quantize import SPEEDS

    served = served or "default"
    if asked is None or asked == served:
        return None
    if SPEEDS.index(asked) < SPEEDS.index(served):
        raise ApiError(400, f"this server runs at --speed {served}; a request may ask for "
                            f"{' or '.join(SPEEDS[SPEEDS.index(served):])}", param="speed", code="speed_unavailable")
    return asked


async def _publishing_errors(work, body: ImageRequest, hub: Progress) -> dict:
    try:
        return await work
    except Exception as error:
        if body.progress_id:
            hub.publish(body.progress_id, {"state": "error", "message": getattr(error, "message", str(error))})
        raise


def _model_card(name: str, pipe) -> dict:
    data = pipe.config.data
    sound = "audio" in pipe.model.config.extra_streams  # clips with sound; /v1/audio/generations draws it alone
    return {"id": name, "object": "model", "created": 0, "owned_by": "omnidit",
            "kind": "video" if data.frames > 1 else "image", "size": f"{data.width}x{data.height}",
            "frames": data.frames, "fps": data.fps, "steps": pipe.config.sample.steps, "cfg": pipe.config.sample.cfg,
            "sound": sound, **({"sample_rate": data.sample_rate, "seconds": data.seconds} if sound else {}),
            "layout_boxes": pipe.config.train.layout_boxes}  # how many boxes `boxes` may hold (0: no layout adapter)


def _common_checks(body: ImageRequest, pipe, limits: Limits) -> tuple[int, int]:
    """The limits every request meets (n, prompt lengths, steps); (steps, seed)."""
    if body.n > limits.max_n:
        raise ApiError(422, f"n must be <= {limits.max_n}, got {body.n}", param="n")
    for field_name, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise ApiError(422, f"{field_name} has {len(text)} characters; the limit is {limits.max_prompt_chars}",
                           param=field_name)
    if not body.prompt.strip():
        raise ApiError(422, "prompt is empty", param="prompt")
    steps = pipe.config.sample.steps if body.steps is None else body.steps
    if steps > limits.max_steps:
        raise ApiError(422, f"steps must be <= {limits.max_steps}, got {steps}", param="steps")
    return steps, random_seed() if body.seed is None else body.seed


def _sound_job(body: AudioRequest, name: str, pipe, limits: Limits) -> Job:
    """Check a sound request: ``seconds`` within the clips' time limit (``max_frames`` at the model's frame rate)
    and a whole number of the model's sound tokens; the job draws sound alone (``generate_av(audio_only=True)``)."""
    from omnidit.codecs import load_audio_codec
    from omnidit.tokens import audio_frame_size

    for field_name, given in (("size", body.size not in (None, "auto")), ("boxes", bool(body.boxes)),
                              ("output_compression", body.output_compression is not None)):
        if given:
            raise ApiError(422, f"{field_name} does not apply to sound", param=field_name)
    steps, seed = _common_checks(body, pipe, limits)
    data = pipe.config.data
    seconds = data.seconds if body.seconds is None else body.seconds
    longest = limits.max_frames / data.fps
    if seconds > longest:
        raise ApiError(422, f"seconds must be <= {longest:g} (this server's {limits.max_frames} frames at "
                            f"{data.fps:g} fps), got {seconds:g}", param="seconds")
    frame = audio_frame_size(pipe.model.config, load_audio_codec(data))  # samples per sound token
    tokens = seconds * data.sample_rate / frame
    if abs(tokens - round(tokens)) > 1e-9 or round(tokens) < 1:
        raise ApiError(422, f"seconds must be a multiple of {frame / data.sample_rate:g} (one sound token of {frame} "
                            f"samples at {data.sample_rate} Hz), got {seconds:g}", param="seconds")
    kwargs = {"steps": steps, "cfg": body.guidance_scale, "negative_prompt": body.negative_prompt,
              "audio_only": True, "seconds": round(tokens) * frame / data.sample_rate}
    return Job(name, body.prompt, [seed + i for i in range(body.n)], kwargs, video=True)


def _job(body: ImageRequest, name: str, pipe, limits: Limits, video: bool) -> Job:
    """Check the request against the limits and the model; the job that draws it."""
    steps, seed = _common_checks(body, pipe, limits)
    width, height = pipe.config.data.width, pipe.config.data.height
    if body.size not in (None, "auto"):
        try:
            width, height = parse_size(body.size)
        except OmniditError:
            raise ApiError(422, f"size must be 'WIDTHxHEIGHT' (e.g. '{width}x{height}') or 'auto', got {body.size!r}",
                           param="size") from None
    try:
        check_image_size(height, width, pipe.model.config.patch_size * (pipe.codec.downsample if pipe.codec else 1))
    except OmniditError as error:
        raise ApiError(422, f"size: {error}", param="size") from None
    if width * height > limits.max_pixels:
        raise ApiError(422, f"size {width}x{height} is above this server's limit of {limits.max_pixels} pixels",
                       param="size")
    kwargs = {"width": width, "height": height, "steps": steps, "cfg": body.guidance_scale,
              "negative_prompt": body.negative_prompt}
    if body.boxes:  # part of the job's key: only requests with the same boxes share a sampling call
        try:
            kwargs["boxes"] = [check_box(Box(b.phrase, *b.box)) for b in body.boxes]
            check_layout(pipe.model, pipe.config.data.frames, kwargs["boxes"])
        except OmniditError as error:
            raise ApiError(422, f"boxes: {error}", param="boxes") from None
    if video:
        frames = pipe.config.data.frames if body.frames is None else body.frames
        if frames > limits.max_frames:
            raise ApiError(422, f"frames must be <= {limits.max_frames}, got {frames}", param="frames")
        try:
            check_frame_count(frames, pipe.model.config.temporal_patch)
        except OmniditError as error:
            raise ApiError(422, f"frames: {error}", param="frames") from None
        kwargs.update(frames=frames, fps=pipe.config.data.fps if body.fps is None else body.fps)
    return Job(name, body.prompt, [seed + i for i in range(body.n)], kwargs, video=video)


async def _wait(future, job: Job, request: Request, deadline: float, timeout: float):
    """The job's outputs; marks the job cancelled when the client goes away or the deadline passes, so the
    worker drops it from the queue or stops its batch between steps."""
    waiting = asyncio.wrap_future(future)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(504, f"the request took longer than the server's timeout of {timeout:g} s",
                               code="timeout")
            done, _ = await asyncio.wait({waiting}, timeout=min(0.25, remaining))
            if done:
                break
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the connection", code="client_closed")
        try:
            return waiting.result()
        except Cancelled:
            raise ApiError(504, "the request was cancelled", code="cancelled") from None
    finally:
        if not future.done():
            job.cancelled.set()
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it any more


def _encode(body: ImageRequest, name: str, pipe, job: Job, outputs, files: FileStore, base_url: str) -> list[dict]:
    """Each output as OpenAI's ``{"b64_json" | "url", "revised_prompt"}`` plus its ``seed``. Runs in an executor
    thread (``asyncio.to_thread``), which keeps one torch thread: with torch's default there, its tensor work would
    start a second OpenMP team beside the sampling worker's, and on 2 cores the worker then sampled about half as
    fast (0.43 s against 0.19-0.23 s for one image at ``--speed fast``; ``batching.reserve_torch_threads``)."""
    import torch

    from omnidit.images import image_bytes, to_pil

    torch.set_num_threads(1)  # OpenMP's thread count is per calling thread: the worker keeps its own

    data = []
    for seed, output in zip(job.seeds, outputs):
        settings = {"prompt": body.prompt, "negative_prompt": body.negative_prompt or None, "seed": seed,
                    "steps": job.kwargs["steps"], "cfg": pipe.config.sample.cfg if body.guidance_scale is None
                    else body.guidance_scale, "sampler": pipe.config.sample.sampler,
                    "size": f"{job.kwargs['width']}x{job.kwargs['height']}" if "width" in job.kwargs else None,
                    "model": name,
                    "speed": job.speed, "software": "omnidit", **box_metadata(job.kwargs.get("boxes", ()))}
        settings = {k: v for k, v in settings.items() if v is not None}
        if job.video and job.kwargs.get("audio_only"):  # sound alone: (None, sound)
            payload, media = _wav_bytes(output[1], pipe.config.data.sample_rate), "audio/wav"
        elif job.video:
            clip, sound = output if isinstance(output, tuple) else (output, None)  # a model with sound: both
            if sound is not None and body.output_format != "mp4":
                sound = None  # GIF and WebP carry no sound; MP4 gets an AAC track
            payload, media = _clip_bytes(clip, job.kwargs["fps"], body.output_format, settings, sound,
                                         pipe.config.data.sample_rate)
        else:
            payload = image_bytes(to_pil(output), body.output_format, settings, body.output_compression)
            media = f"image/{body.output_format}"
        item: dict = {"revised_prompt": body.prompt, "seed": seed}
        if body.response_format == "url":
            item["url"] = f"{base_url}v1/files/{files.put(payload, media)}.{body.output_format}"
        else:
            item["b64_json"] = base64.b64encode(payload).decode()
        data.append(item)
    return data


def _clip_bytes(clip, fps: float, output_format: str, settings: dict, audio=None,
                sample_rate: int | None = None) -> tuple[bytes, str]:
    """A clip (C, T, H, W), with its sound (1, S) when given, encoded through ``save_video`` in a temporary folder
    that is removed after."""
    from omnidit.video_io import save_video

    with tempfile.TemporaryDirectory(prefix="omnidit-serve-") as folder:
        path = save_video(clip, Path(folder) / f"clip.{output_format}", fps, settings, audio=audio,
                          sample_rate=sample_rate if audio is not None else None)
        media = {"mp4": "video/mp4", "gif": "image/gif", "webp": "image/webp"}[output_format]
        return path.read_bytes(), media


def _wav_bytes(sound, sample_rate: int) -> bytes:
    """Sound (1, S) in [-1, 1] as the bytes of a 16-bit PCM WAV file (``save_wav`` in a temporary folder)."""
    from omnidit.audio_io import save_wav

    with tempfile.TemporaryDirectory(prefix="omnidit-serve-") as folder:
        return save_wav(sound, Path(folder) / "sound.wav", sample_rate).read_bytes()
