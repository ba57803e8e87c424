"""omnidit serve --replicas: the app each replica builds, the state the replicas share (url files, progress events),
the checks made before Ray starts, the torch threads of the sampling worker, and (slow) two local replicas behind Ray
Serve answering the same bytes for the same seed, each serving the other's url files and progress."""

from __future__ import annotations

import base64
import sys
import threading
import time
import types

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from helpers import Live, ProgressListener  # noqa: E402
from test_serve import FAST, PROMPT, _free_port, _start_server  # noqa: E402

from omnidit.cli import main  # noqa: E402
from omnidit.pipeline import load_pipeline  # noqa: E402
from omnidit.serve.app import build_app  # noqa: E402
from omnidit.serve.batching import Batcher, Job, reserve_torch_threads  # noqa: E402
from omnidit.serve.replicas import RemoteFiles, RemoteProgress, SharedState, replica_builder  # noqa: E402


class _Reply:
    """What a fake actor method's .remote() returns: awaitable (as Ray's ObjectRef is) and read by the fake ray.get."""

    def __init__(self, value) -> None:
        self.value = value

    def __await__(self):
        yield from []
        return self.value


class _FakeActor:
    """A SharedState behind .method.remote(...) calls, one at a time as in a Ray actor, in this process."""

    def __init__(self, state: SharedState) -> None:
        lock = threading.Lock()

        def method(name):
            def remote(*args):
                with lock:
                    return _Reply(getattr(state, name)(*args))
            return types.SimpleNamespace(remote=remote)

        for name in ("put", "get", "publish", "end", "events_after"):
            setattr(self, name, method(name))


@pytest.fixture
def fake_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get=lambda reply: reply.value))


def test_a_replica_builds_a_whole_server_whose_url_files_live_in_the_shared_state(fake_ray):
    import torch

    state = SharedState(url_ttl=60)
    before = torch.get_num_threads()
    try:
        build = replica_builder({"shapes": "shapes"}, None, None, "cpu", 1, {"max_batch": 4}, _FakeActor(state))
        with TestClient(build()) as client:
            ok = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 3, **FAST})
            url = client.post("/v1/images/generations", json={"prompt": PROMPT, "response_format": "url", **FAST})
            assert client.get("/health").json()["models"] == ["shapes"]
    finally:
        torch.set_num_threads(before)
    assert ok.status_code == 200 and base64.b64decode(ok.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
    name = url.json()["data"][0]["url"].rsplit("/", 1)[1].split(".")[0]
    assert state.get(name)[0][:4] == b"\x89PNG" and state.get(name)[1] == "image/png"


def test_shared_state_numbers_each_ids_events_in_order_and_keeps_them_bounded():
    state = SharedState(url_ttl=60, events_ttl=60, max_ids=2, max_events=3)
    for step in range(5):
        state.publish("a", {"step": step})
    assert state.end("a") == 5 and state.end("nobody") == 0
    assert state.events_after("a", 0) == ([{"step": 2}, {"step": 3}, {"step": 4}], 5)  # the last max_events
    assert state.events_after("a", 4) == ([{"step": 4}], 5) and state.events_after("a", 5) == ([], 5)
    state.publish("a", {"step": 5})  # numbered on: a reader at 5 gets it although the first kept is now 3
    assert state.events_after("a", 5) == ([{"step": 5}], 6) and state.events_after("nobody", 0) == ([], 0)
    state.publish("b", {"step": 0})
    state.publish("a", {"step": 6})  # a is now the most recent id, b the oldest
    state.publish("c", {"step": 0})
    assert state.events_after("b", 0) == ([], 0) and state.events_after("a", 6) == ([{"step": 6}], 7)
    assert state.end("c") == 1
    quick = SharedState(url_ttl=60, events_ttl=0.05)
    quick.publish("old", {"step": 0})
    time.sleep(0.1)
    quick.publish("new", {"step": 0})  # the old id has expired
    assert quick.end("old") == 0 and quick.events_after("new", 0) == ([{"step": 0}], 1)


def test_one_replica_serves_the_url_files_and_progress_of_another(fake_ray):
    shared = _FakeActor(SharedState(url_ttl=60))
    pipe = load_pipeline("shapes", device="cpu")
    apps = [build_app({"shapes": pipe}, files=RemoteFiles(shared), hub=RemoteProgress(shared)) for _ in range(2)]
    with Live(apps[0]) as drawing, Live(apps[1]) as other:
        with ProgressListener(f"{other.url}/v1/progress/r7") as listener:
            reply = httpx.post(f"{drawing.url}/v1/images/generations", timeout=60, json={
                "prompt": PROMPT, "steps": 3, "seed": 4, "progress_id": "r7", "response_format": "url"})
        file_url = reply.json()["data"][0]["url"]
        fetched = httpx.get(file_url.replace(drawing.url, other.url), timeout=30)
        missing = httpx.get(f"{other.url}/v1/files/nothing.png", timeout=30)
        plain = httpx.post(f"{other.url}/v1/images/generations", timeout=60,
                           json={"prompt": PROMPT, "steps": 3, "seed": 4})
    assert reply.status_code == 200 and file_url.startswith(drawing.url)
    assert listener.states == ["queued", "running", "running", "running", "done"]
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(plain.json()["data"][0]["b64_json"])  # the same seed's bytes
    assert missing.status_code == 404


def test_a_listener_on_a_reused_progress_id_hears_only_the_new_request(fake_ray):
    shared = _FakeActor(SharedState(url_ttl=60))
    pipe = load_pipeline("shapes", device="cpu")
    with Live(build_app({"shapes": pipe}, files=RemoteFiles(shared), hub=RemoteProgress(shared))) as server:
        body = {"prompt": PROMPT, "steps": 2, "progress_id": "again"}
        assert httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=60).status_code == 200
        with ProgressListener(f"{server.url}/v1/progress/again") as listener:
            assert httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=60).status_code == 200
    assert listener.states == ["queued", "running", "running", "done"]  # not the first request's done at once


def test_the_worker_keeps_the_threads_the_loading_thread_gave_up():
    import torch

    before = torch.get_num_threads()
    seen = []

    class ThreadsPipe:
        def generate(self, prompts, seed, on_step, **kwargs):
            seen.append(torch.get_num_threads())
            return [None] * len(prompts)

    try:
        torch.set_num_threads(2)
        threads = reserve_torch_threads()
        assert (threads, torch.get_num_threads()) == (2, 1)
        batcher = Batcher({"m": ThreadsPipe()}, window=0, threads=threads).start()
        batcher.submit(Job("m", "p", [0], {})).result(timeout=10)
        batcher.stop()
    finally:
        torch.set_num_threads(before)
    assert seen == [2]


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "--replicas must be"),
    (["--replicas", "2", "--replica-cpus", "0"], "--replica-cpus must be"),
    (["--replica-cpus", "1"], "--replica-cpus applies to replicas"),
    (["--replicas", "2", "--model", "no/such/folder"], "model folder not found"),
    (["--replicas", "2", "--lora", "missing.safetensors"], "no such file missing.safetensors"),
])
def test_replica_flags_are_checked_before_ray_starts(argv, message, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # were Ray started, this import would fail first
    assert main(["serve", "--port", str(_free_port()), *argv]) == 2
    assert message in capsys.readouterr().err


def test_replicas_without_ray_name_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["serve", "--replicas", "2", "--port", str(_free_port())]) == 2
    assert "pip install -e '.[ray]'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_local_replicas_share_the_requests_and_draw_the_same_bytes(tmp_path):
    pytest.importorskip("ray")
    import signal

    port = _free_port()
    server = _start_server(port, tmp_path, "--replicas", "2", wait=240)
    url = f"http://127.0.0.1:{port}"
    try:
        pids, deadline = set(), time.monotonic() + 120  # the first replica may answer before the second is up
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(httpx.get(f"{url}/health", timeout=30).json()["pid"])
        assert len(pids) == 2  # both replicas answer
        body = {"prompt": PROMPT, "seed": 11, **FAST}
        images = {httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).json()["data"][0]["b64_json"]
                  for _ in range(6)}
        assert len(images) == 1  # whichever replica drew it
        for attempt in range(4):  # a url file and the progress of its image reach every replica
            with ProgressListener(f"{url}/v1/progress/s{attempt}", wait=30) as listener:
                reply = httpx.post(f"{url}/v1/images/generations", timeout=60,
                                   json={**body, "response_format": "url", "progress_id": f"s{attempt}"})
            assert listener.states == ["queued", "running", "running", "done"]
            fetched = {httpx.get(reply.json()["data"][0]["url"], timeout=30).content for _ in range(4)}
            assert fetched == {base64.b64decode(next(iter(images)))}
    finally:
        server.send_signal(signal.SIGTERM)  # the command shuts Ray down
        server.wait(60)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=5)
