"""omnidit serve --replicas: the app each replica builds, the checks made before Ray starts, the torch threads of
the sampling worker, and (slow) two local replicas behind Ray Serve answering the same bytes for the same seed."""

from __future__ import annotations

import base64
import sys
import time

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import FAST, PROMPT, _free_port, _start_server  # noqa: E402

from omnidit.cli import main  # noqa: E402
from omnidit.serve.batching import Batcher, Job, reserve_torch_threads  # noqa: E402
from omnidit.serve.replicas import replica_builder  # noqa: E402


def test_a_replica_builds_a_whole_server_that_refuses_url_results():
    import torch

    before = torch.get_num_threads()
    try:
        build = replica_builder({"shapes": "shapes"}, None, None, "cpu", 1, {"max_batch": 4, "url_results": False})
        with TestClient(build()) as client:
            ok = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 3, **FAST})
            url = client.post("/v1/images/generations", json={"prompt": PROMPT, "response_format": "url", **FAST})
            assert client.get("/health").json()["models"] == ["shapes"]
    finally:
        torch.set_num_threads(before)
    assert ok.status_code == 200 and base64.b64decode(ok.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
    error = url.json()["error"]
    assert url.status_code == 400 and error["param"] == "response_format" and "b64_json" in error["message"]


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
        url_reply = httpx.post(f"{url}/v1/images/generations", json={**body, "response_format": "url"}, timeout=60)
        assert url_reply.status_code == 400
    finally:
        server.send_signal(signal.SIGTERM)  # the command shuts Ray down
        server.wait(60)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=5)
