"""omnidit serve: the OpenAI images API with the official client, batching that does not change an image,
limits and malformed requests, API keys, progress events, the video endpoint and the command line.

Requests use 2 sampling steps of the shipped shapes model, so each costs a fraction of a second.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from helpers import Live, ProgressListener  # noqa: E402
from PIL import Image  # noqa: E402

from omnidit.cli import main  # noqa: E402
from omnidit.pipeline import load_pipeline  # noqa: E402
from omnidit.serve.app import Limits, _wait, build_app  # noqa: E402
from omnidit.serve.batching import Batcher, Job, QueueFull  # noqa: E402

PROMPT = "a red circle above a blue square"
FAST = {"steps": 2}


@pytest.fixture(scope="module")
def shapes():
    return load_pipeline("shapes", device="cpu")


@pytest.fixture(scope="module")
def live(shapes):
    with Live(build_app({"shapes": shapes}, batch_window=0.3)) as server:
        yield server


def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_the_official_openai_client_gets_pngs_with_their_settings(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="shapes", prompt=PROMPT, n=2, size="32x32",
                                    extra_body={"seed": 5, **FAST})
    assert len(result.data) == 2 and result.created > 0
    images = [decode(item.model_dump()) for item in result.data]
    assert all(im.size == (32, 32) and im.format == "PNG" for im in images)
    assert images[0].text["prompt"] == PROMPT and images[0].text["seed"] == "5" and images[1].text["seed"] == "6"
    assert images[0].text["parameters"].splitlines()[0] == PROMPT  # AUTOMATIC1111's chunk, read by other tools
    assert "Seed: 5" in images[0].text["parameters"] and "Steps: 2" in images[0].text["parameters"]
    assert result.data[0].revised_prompt == PROMPT
    assert images[0].tobytes() != images[1].tobytes()


def test_an_image_is_the_same_batched_or_alone(live):
    def post(seed: int, n: int = 1) -> list[dict]:
        reply = httpx.post(f"{live.url}/v1/images/generations", timeout=60,
                           json={"prompt": PROMPT, "n": n, "seed": seed, **FAST})
        assert reply.status_code == 200, reply.text
        return reply.json()["data"]

    alone = post(11)[0]["b64_json"]
    batches_before = live.app.state.batcher.stats.batches
    results: dict[int, list[dict]] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, post(s, 2))) for s in (10, 20, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert live.app.state.batcher.stats.batches - batches_before < 3  # some requests shared a sampling call
    assert results[10][1]["b64_json"] == alone  # image 1 of seed 10 is seed 11, here drawn in a batch
    assert post(11)[0]["b64_json"] == alone  # and the same request again gives the same bytes


def test_a_batch_holds_requests_with_the_same_settings_only(shapes):
    done = threading.Event()
    batches: list[int] = []
    batcher = Batcher({"shapes": shapes}, max_batch=4, window=0.5)
    batcher.stats.on_batch = lambda size, seconds: (batches.append(size), len(batches) == 2 and done.set())
    jobs = [Job("shapes", PROMPT, [i], {"steps": 2, "width": 32, "height": 32}) for i in range(3)]
    jobs.append(Job("shapes", PROMPT, [7], {"steps": 3, "width": 32, "height": 32}))
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    assert done.wait(60)
    batcher.stop()
    assert batches == [3, 1]
    assert all(tuple(j.future.result().shape) == (1, 3, 32, 32) for j in jobs)


class SlowPipe:
    """A pipeline whose sampling waits for ``release`` before each step: for queue and timeout tests."""

    def __init__(self, pipe) -> None:
        self.pipe, self.config, self.release, self.steps_run = pipe, pipe.config, threading.Event(), 0

    def __getattr__(self, name):  # model, codec, ...: the real pipeline's
        return getattr(self.pipe, name)

    def generate(self, prompts, on_step=None, **kwargs):
        def waiting(done, total):
            self.steps_run += 1
            self.release.wait(5)
            on_step(done, total)

        return self.pipe.generate(prompts, on_step=waiting, **kwargs)


def test_a_full_queue_answers_429_with_retry_after_and_admitted_requests_finish(shapes):
    slow = SlowPipe(shapes)
    with Live(build_app({"shapes": slow}, max_queue=1, max_batch=1, batch_window=0)) as server:
        results: list = []
        post = lambda: results.append(httpx.post(f"{server.url}/v1/images/generations", timeout=60,  # noqa: E731
                                                 json={"prompt": PROMPT, "seed": 1, **FAST}))
        first = threading.Thread(target=post)
        first.start()
        deadline = time.monotonic() + 60
        while slow.steps_run == 0:  # the first request is being drawn
            assert time.monotonic() < deadline and not results, results
            time.sleep(0.01)
        second = threading.Thread(target=post)
        second.start()
        while server.app.state.batcher.depth == 0:  # the second waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        flood = [httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT, **FAST}, timeout=10)
                 for _ in range(5)]
        assert all(r.status_code == 429 for r in flood)
        assert int(flood[0].headers["retry-after"]) >= 1 and flood[0].json()["error"]["code"] == "queue_full"
        slow.release.set()
        first.join()
        second.join()
        assert [r.status_code for r in results] == [200, 200]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'omnidit_requests_total{endpoint="/v1/images/generations",status="429"} 5.0' in metrics


def _steps_settle(slow: SlowPipe, wait: float = 0.6) -> int:
    """steps_run once it stops changing (the worker has dropped the work)."""
    before = -1
    while before != slow.steps_run:
        before = slow.steps_run
        time.sleep(wait)
    return before


def test_past_the_timeout_a_request_gets_504_and_its_sampling_stops(shapes):
    slow = SlowPipe(shapes)
    app = build_app({"shapes": slow}, Limits(timeout=0.5), batch_window=0)
    with TestClient(app) as client:
        reply = client.post("/v1/images/generations", json={"prompt": PROMPT, "steps": 50})
        assert reply.status_code == 504 and "timeout of 0.5 s" in reply.json()["error"]["message"]
        slow.release.set()
        assert _steps_settle(slow) <= 3  # the worker stopped between steps once nobody waited


def test_a_client_that_disconnects_stops_its_work(shapes):
    slow = SlowPipe(shapes)
    slow.release.set()  # steps at full speed: 200 of them take many seconds
    with Live(build_app({"shapes": slow}, batch_window=0)) as server:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT, "steps": 200, "n": 4},
                       timeout=1.0)
        assert _steps_settle(slow) < 200
        reply = httpx.get(f"{server.url}/health")
        assert reply.json()["queue_depth"] == 0


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": PROMPT, "n": 11}, 422, "n"),
    ({"prompt": PROMPT, "n": 0}, 422, "n"),
    ({"prompt": PROMPT, "size": "1024x1024"}, 422, "size"),
    ({"prompt": PROMPT, "size": "big"}, 422, "size"),
    ({"prompt": PROMPT, "steps": 201}, 422, "steps"),
    ({"prompt": "x" * 1001}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": PROMPT, "n": "two"}, 422, "n"),
    ({"prompt": PROMPT, "guidance_scale": -1}, 422, "guidance_scale"),
    ({"prompt": PROMPT, "response_format": "file"}, 422, "response_format"),
    ({"prompt": PROMPT, "sizes": "32x32"}, 422, "sizes"),
    ({"n": 1}, 422, "prompt"),
    ({"prompt": PROMPT, "model": "dall-e-3"}, 404, "model"),
    ({"prompt": PROMPT, "size": "30x30"}, 422, "size"),  # not a multiple of the model's patch
    ({"prompt": PROMPT, "size": "\u00b2x32"}, 422, "size"),  # a superscript two is a digit to str.isdigit
    ({"prompt": PROMPT, "user": "u" * 300}, 422, "user"),
])
def test_every_limit_and_malformed_field_has_its_status_and_names_the_field(shapes, body, status, param):
    with TestClient(build_app({"shapes": shapes})) as client:
        reply = client.post("/v1/images/generations", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_is_400(shapes):
    with TestClient(build_app({"shapes": shapes})) as client:
        reply = client.post("/v1/images/generations", content=b'{"prompt": ', headers={"content-type":
                                                                                      "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"


def test_the_api_key_is_checked_only_when_set(shapes):
    with TestClient(build_app({"shapes": shapes}, api_key="sesame")) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert client.get("/health").status_code == 200  # health checks need no key
    with TestClient(build_app({"shapes": shapes})) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "shapes"


def test_the_command_takes_its_api_key_from_the_flag_or_else_the_environment(monkeypatch, capsys):
    import torch

    from omnidit.serve import batching

    # the command gives this thread one torch thread (reserve_torch_threads): put everything back after
    monkeypatch.setattr(batching, "_reserved_threads", batching._reserved_threads)
    threads = torch.get_num_threads()
    try:
        serve_three_ways(monkeypatch, capsys)
    finally:
        torch.set_num_threads(threads)


def serve_three_ways(monkeypatch, capsys) -> None:
    """omnidit serve with the key in the environment, with --api-key, and with neither (uvicorn not started)."""
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    monkeypatch.setattr("omnidit.serve.command.check_port_free", lambda host, port: None)
    monkeypatch.setenv("OMNIDIT_API_KEY", "from-env")
    assert main(["serve", "--port", "8765"]) == 0
    assert main(["serve", "--port", "8765", "--api-key", "from-flag"]) == 0
    monkeypatch.delenv("OMNIDIT_API_KEY")
    assert main(["serve", "--port", "8765"]) == 0
    out = capsys.readouterr().out
    assert out.count("(API key required)") == 2 and out.count("(no API key)") == 1
    for app, key, other in zip(served, ("from-env", "from-flag"), ("from-flag", "from-env")):
        with TestClient(app) as client:
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {other}"}).status_code == 401
    with TestClient(served[2]) as client:
        assert client.get("/v1/models").status_code == 200


def test_url_results_expire_and_the_store_keeps_its_byte_limit(monkeypatch):
    from omnidit.serve.app import FileStore

    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    store = FileStore(ttl=60, max_bytes=25)
    first = store.put(b"x" * 10, "image/png")
    now[0] += 30
    second = store.put(b"y" * 10, "image/png")
    assert store.get(first) == (b"x" * 10, "image/png")
    now[0] += 31  # the first is 61 s old, the second 31 s
    assert store.get(first) is None and store.get(second) == (b"y" * 10, "image/png")
    third, fourth = store.put(b"z" * 10, "image/png"), store.put(b"w" * 10, "image/png")
    assert store.get(second) is None  # 30 bytes would pass the 25-byte limit: the oldest went
    assert store.get(third) is not None and store.get(fourth) is not None


def test_url_results_are_served_and_other_formats_encode(shapes):
    with TestClient(build_app({"shapes": shapes})) as client:
        png = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 3, **FAST}).json()
        by_url = client.post("/v1/images/generations",
                             json={"prompt": PROMPT, "seed": 3, "response_format": "url", **FAST}).json()
        url = by_url["data"][0]["url"]
        assert url.endswith(".png") and "b64_json" not in by_url["data"][0]
        fetched = client.get(url)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert fetched.content == base64.b64decode(png["data"][0]["b64_json"])
        assert client.get("/v1/files/nothing.png").status_code == 404
        jpeg = client.post("/v1/images/generations", json={"prompt": PROMPT, "output_format": "jpeg", **FAST})
        assert decode(jpeg.json()["data"][0]).format == "JPEG"


def test_the_answers_are_encoded_on_one_torch_thread(shapes, monkeypatch):
    # The encoding runs in an executor thread; with torch's default thread count there it would start a second
    # OpenMP team beside the sampling worker's, which on 2 cores halved the worker's speed.
    import torch

    import omnidit.images

    seen = []
    to_pil = omnidit.images.to_pil

    def recording(image):
        seen.append(torch.get_num_threads())
        return to_pil(image)

    monkeypatch.setattr(omnidit.images, "to_pil", recording)
    with TestClient(build_app({"shapes": shapes})) as client:
        assert client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, **FAST}).status_code == 200
    assert seen == [1, 1]


def test_negative_prompt_changes_the_image_and_is_recorded(shapes):
    with TestClient(build_app({"shapes": shapes})) as client:
        plain = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 4, **FAST}).json()
        steered = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 4, **FAST,
                                                               "negative_prompt": "a blue square"}).json()
        fast = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 4, **FAST, "speed": "fast",
                                                           "negative_prompt": "a blue square"})
    # At fast, shapes samples through its guidance-distilled twin, which has no unconditional row to steer.
    assert fast.status_code == 400 and "cannot follow a negative prompt" in fast.json()["error"]["message"]
    image = decode(steered["data"][0])
    assert image.tobytes() != decode(plain["data"][0]).tobytes()
    assert "Negative prompt: a blue square" in image.text["parameters"]


def test_a_request_can_ask_for_a_faster_preset_without_changing_the_served_model(shapes):
    import torch

    from omnidit.images import to_pil
    from omnidit.quantize import speed_variant

    body = {"prompt": PROMPT, "seed": 4, **FAST}
    with TestClient(build_app({"shapes": shapes})) as client:
        before = client.post("/v1/images/generations", json=body).json()["data"][0]
        fast = client.post("/v1/images/generations", json={**body, "speed": "faster"}).json()["data"][0]
        after = client.post("/v1/images/generations", json=body).json()["data"][0]
    assert before["b64_json"] == after["b64_json"] != fast["b64_json"]  # the served model is untouched
    assert isinstance(shapes.model.single_blocks[0].linear1, torch.nn.Linear) and shapes.config.sample.candidates == 2
    expected = speed_variant(shapes, "faster").generate([PROMPT], seed=[4], steps=2)[0]
    assert decode(fast).tobytes() == to_pil(expected).tobytes()
    assert "speed" in decode(fast).text and "speed" not in decode(before).text
    fast_pipe = speed_variant(shapes, "fast")  # quantizes: its own model
    faster = speed_variant(fast_pipe, "faster")  # already int8: shares that model, only the settings change
    assert fast_pipe.model is not shapes.model and faster.model is fast_pipe.model
    assert faster.config.sample.candidates == 1 and fast_pipe.config.sample.candidates == 2
    assert Job("m", "p", [0], {}, speed="fast").key != Job("m", "p", [0], {}).key  # never batched together
    with TestClient(build_app({"shapes": shapes}, speed="fast")) as client:
        slower = client.post("/v1/images/generations", json={**body, "speed": "default"})
    assert slower.status_code == 400 and slower.json()["error"]["param"] == "speed"
    assert "fast or faster" in slower.json()["error"]["message"]


def test_at_the_fast_preset_outputs_share_a_batch_and_a_seed_gives_one_image(shapes):
    # int8 layers quantize each token on its own and sum in integers, so an output at fast (int8, the step cache)
    # does not depend on its batch: requests share one sampling call and a seed gives the image it gives alone.
    import torch

    from omnidit.quantize import has_int8_layers, speed_variant

    fast = speed_variant(shapes, "fast")
    assert has_int8_layers(fast.model)
    alone = [fast.generate([PROMPT], seed=[s], steps=3)[0] for s in (12, 13)]
    events: list[dict] = []
    batcher = Batcher({"shapes": shapes}, max_batch=4, window=0.3)
    settings = {"steps": 3, "width": 32, "height": 32}
    jobs = [Job("shapes", PROMPT, [11, 12], settings, speed="fast", progress=events.append),
            Job("shapes", PROMPT, [13], settings, speed="fast")]
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    outputs = [job.future.result(timeout=120) for job in jobs]
    batcher.stop()
    assert batcher.stats.batches == 1 and torch.equal(outputs[0][1], alone[0])  # one call to the batcher
    assert torch.equal(outputs[1][0], alone[1])
    steps = [(e["step"], e["steps"]) for e in events if e["state"] == "running"]
    assert steps == [(k, 3) for k in range(1, 4)]  # one sampling call of 3 steps


def test_progress_events_reach_a_listener(live):
    with ProgressListener(f"{live.url}/v1/progress/p1") as listener:
        reply = httpx.post(f"{live.url}/v1/images/generations", timeout=60,
                           json={"prompt": PROMPT, "steps": 3, "progress_id": "p1"})
    assert reply.status_code == 200
    assert listener.states == ["queued", "running", "running", "running", "done"]
    assert [e["step"] for e in listener.events if e["state"] == "running"] == [1, 2, 3]


def test_the_page_is_served(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "/v1/images/generations" in page.text and "EventSource" in page.text


def test_a_disconnected_client_cancels_its_job():
    import asyncio
    from concurrent.futures import Future

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    job = Job("m", PROMPT, [0], {})
    with pytest.raises(Exception, match="closed the connection"):
        asyncio.run(_wait(Future(), job, Gone(), time.monotonic() + 60, 60))
    assert job.cancelled.is_set()


def test_the_queue_bound_counts_waiting_requests(shapes):
    batcher = Batcher({"shapes": shapes}, max_queue=2)  # not started: nothing leaves the queue
    for seed in range(2):
        batcher.submit(Job("shapes", PROMPT, [seed], FAST))
    with pytest.raises(QueueFull):
        batcher.submit(Job("shapes", PROMPT, [9], FAST))


def test_video_models_answer_on_the_video_endpoint(shapes):
    video = load_pipeline("shapes-video", device="cpu")
    with TestClient(build_app({"shapes": shapes, "shapes-video": video})) as client:
        reply = client.post("/v1/videos/generations", json={"model": "shapes-video", "prompt": "a red circle "
                                                            "moving to the right", "frames": 4, **FAST})
        assert reply.status_code == 200, reply.text
        clip = base64.b64decode(reply.json()["data"][0]["b64_json"])
        assert clip[4:8] == b"ftyp"  # an MP4
        wrong = client.post("/v1/images/generations", json={"model": "shapes-video", "prompt": PROMPT})
        assert wrong.status_code == 400 and "/v1/videos/generations" in wrong.json()["error"]["message"]
        wrong = client.post("/v1/videos/generations", json={"model": "shapes", "prompt": PROMPT})
        assert wrong.status_code == 400


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be"),
    (["--max-size", "big"], "size"),
    (["--timeout", "0"], "--timeout must be"),
    (["--model", "a=shapes", "--model", "a=shapes"], "two models are named 'a'"),
])
def test_serve_flags_are_checked_before_anything_loads(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_port_in_use(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "shapes"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a1111_parameters_read_back_as_other_tools_expect():
    from omnidit.images import a1111_parameters

    text = a1111_parameters({"prompt": "a red circle", "negative_prompt": "a square", "steps": 30, "sampler": "euler",
                             "cfg": 4.0, "seed": 12, "size": "32x32", "model": "shapes"})
    prompt, negative, pairs = text.split("\n")
    assert prompt == "a red circle" and negative == "Negative prompt: a square"
    assert dict(p.split(": ") for p in pairs.split(", ")) == {"Steps": "30", "Sampler": "euler", "CFG scale": "4.0",
                                                              "Seed": "12", "Size": "32x32", "Model": "shapes"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(port: int, tmp_path, *extra: str, wait: float = 60):
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "omnidit", "serve", "--model", "shapes", "--port", str(port),
                                *extra], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the server did not start: {process.stdout.read().decode()[-2000:]}")


def test_kill_9_mid_request_is_a_clean_connection_error_and_a_restart_serves_at_once(tmp_path):
    import signal

    port = _free_port()
    server = _start_server(port, tmp_path)
    errors: list[Exception] = []

    def slow_request() -> None:
        try:
            httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=60,
                       json={"prompt": PROMPT, "steps": 200, "n": 10, "progress_id": "k9"})
        except httpx.HTTPError as error:
            errors.append(error)

    with httpx.stream("GET", f"http://127.0.0.1:{port}/v1/progress/k9", timeout=60) as progress:
        lines = progress.iter_lines()
        next(lines)  # listening
        client = threading.Thread(target=slow_request)
        client.start()
        while '"running"' not in next(lines):  # wait until the request is being drawn
            pass
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    client.join(10)
    assert len(errors) == 1 and isinstance(errors[0], (httpx.RemoteProtocolError, httpx.ReadError,
                                                       httpx.ConnectError))
    restarted = _start_server(port, tmp_path)
    try:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=60,
                           json={"prompt": PROMPT, **FAST})
        assert reply.status_code == 200
    finally:
        restarted.terminate()
        restarted.wait(10)
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


@pytest.mark.slow
def test_the_load_test_runs_bounded_without_errors(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "load.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    subprocess.run([sys.executable, str(script), "--clients", "4", "--seconds", "10", "--steps", "4",
                    "--json", str(out)], check=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["one_client"]["errors"] == 0 and result["many_clients"]["errors"] == 0
    assert result["one_client"]["requests"] > 0 and result["many_clients"]["mean_batch"] > 1


def test_unknown_routes_and_methods_answer_in_the_openai_error_shape(shapes):
    with TestClient(build_app({"shapes": shapes})) as client:
        missing, wrong = client.get("/v1/nothing"), client.get("/v1/images/generations")
        metrics = client.get("/metrics").text
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
    assert 'endpoint="other",status="404"' in metrics and "/v1/nothing" not in metrics  # bounded label set


class PickyPipe:
    """Refuses any batch holding the prompt "bad", as a class-conditional model refuses a prompt without a
    class: the other requests of its batch must still be drawn."""

    def __init__(self, pipe) -> None:
        self.pipe, self.config = pipe, pipe.config

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, prompts, **kwargs):
        from omnidit.errors import OmniditError

        if "bad" in prompts:
            raise OmniditError("the prompt 'bad' names no class")
        return self.pipe.generate(prompts, **kwargs)


def test_one_bad_request_does_not_fail_the_others_in_its_batch(shapes):
    batcher = Batcher({"m": PickyPipe(shapes)}, max_batch=8, window=0.3)
    jobs = [Job("m", prompt, [i], {"steps": 2}) for i, prompt in enumerate([PROMPT, "bad", PROMPT])]
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    try:
        assert jobs[0].future.result(60).shape == (1, 3, 32, 32) and jobs[2].future.result(60).shape[0] == 1
        with pytest.raises(Exception, match="names no class"):
            jobs[1].future.result(60)
    finally:
        batcher.stop()


def test_a_model_with_sound_answers_with_an_mp4_that_has_its_sound(av_run, tmp_path):
    from omnidit.video_io import load_audio

    av = load_pipeline(av_run, device="cpu")
    with TestClient(build_app({"av": av})) as client:
        reply = client.post("/v1/videos/generations", json={"model": "av", "prompt": "a red circle moving to the "
                                                            "right", **FAST})
        assert reply.status_code == 200, reply.text
        (tmp_path / "c.mp4").write_bytes(base64.b64decode(reply.json()["data"][0]["b64_json"]))
        audio, rate = load_audio(tmp_path / "c.mp4")
        assert rate == av.config.data.sample_rate and audio.shape[-1] >= 0.9 * av.config.data.sample_rate * 0.5
        gif = client.post("/v1/videos/generations", json={"model": "av", "prompt": "a red circle moving to the "
                                                          "right", "output_format": "gif", **FAST})
        assert gif.status_code == 200 and base64.b64decode(gif.json()["data"][0]["b64_json"])[:3] == b"GIF"


def test_the_sound_endpoint_answers_with_a_wav_of_the_asked_length(av_run, shapes):
    import wave

    av = load_pipeline(av_run, device="cpu")
    rate, seconds = av.config.data.sample_rate, av.config.data.seconds
    with TestClient(build_app({"av": av, "shapes": shapes})) as client:
        card = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == "av")
        assert card["sound"] and card["sample_rate"] == rate

        def post(**body):
            return client.post("/v1/audio/generations", json={"model": "av", "prompt": "a low beep", "seed": 4,
                                                              **FAST, **body})

        reply = post(n=2)
        assert reply.status_code == 200, reply.text
        items = reply.json()["data"]
        with wave.open(io.BytesIO(base64.b64decode(items[0]["b64_json"]))) as wav:
            assert wav.getframerate() == rate and wav.getnchannels() == 1
            assert wav.getnframes() == round(seconds * rate)
        assert items[0]["b64_json"] != items[1]["b64_json"]  # seeds 4 and 5
        assert post().json()["data"][0]["b64_json"] == items[0]["b64_json"]  # the same seed, the same bytes
        half = post(seconds=seconds / 2)
        with wave.open(io.BytesIO(base64.b64decode(half.json()["data"][0]["b64_json"]))) as wav:
            assert wav.getnframes() == round(seconds * rate / 2)
        for body, param in (({"seconds": 1e-4}, "seconds"), ({"seconds": 1000.0}, "seconds"),
                            ({"size": "32x32"}, "size"), ({"output_format": "mp3"}, "output_format")):
            bad = post(**body)
            assert bad.status_code == 422 and param in json.dumps(bad.json()["error"]), (body, bad.text)
        wrong = client.post("/v1/audio/generations", json={"model": "shapes", "prompt": PROMPT})
        assert wrong.status_code == 400 and "makes no sound" in wrong.json()["error"]["message"]


def test_layout_boxes_reach_a_layout_model_and_are_refused_elsewhere(shapes):
    layout = load_pipeline("shapes-layout", device="cpu")
    boxes = [{"phrase": "a red circle", "box": [0.5, 0.5, 0.95, 0.95]}]
    with TestClient(build_app({"shapes": shapes, "layout": layout})) as client:
        def post(**body):
            return client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 5, **FAST, **body})

        boxed, plain = post(model="layout", boxes=boxes), post(model="layout")
        assert boxed.status_code == 200 and plain.status_code == 200
        image = decode(boxed.json()["data"][0])
        assert image.info["boxes"] == "[['a red circle', 0.5, 0.5, 0.95, 0.95]]"
        assert image.tobytes() != decode(plain.json()["data"][0]).tobytes()
        assert post(model="layout", boxes=boxes).json()["data"][0]["b64_json"] == boxed.json()["data"][0]["b64_json"]
        for body, message in (({"model": "shapes", "boxes": boxes}, "no layout adapter"),
                              ({"model": "layout", "boxes": [{"phrase": "a red circle", "box": [0.5, 0.5, 0.4, 0.9]}]},
                               "no area")):
            reply = post(**body)
            assert reply.status_code == 422 and reply.json()["error"]["param"] == "boxes", reply.text
            assert message in reply.json()["error"]["message"]
