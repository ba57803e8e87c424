"""--compile: regional torch.compile of the blocks samples the same images as eager; later steps, calls and
seeds reuse the compiled blocks without recompiling, and the step cache's row counts compile a bounded number of
graphs."""

from __future__ import annotations

import pytest
import torch
from test_cli import run_main

from omnidit.pipeline import load_pipeline

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def compiled(tiny_run):
    torch._dynamo.reset()
    pipe = load_pipeline(tiny_run, device="cpu")
    pipe.model.compile_blocks()
    yield pipe
    torch._dynamo.reset()


def test_compiled_blocks_sample_what_eager_samples_and_do_not_recompile(compiled, tiny_run):
    eager = load_pipeline(tiny_run, device="cpu")
    settings = {"steps": 3, "candidates": 1}
    first = compiled.generate(PROMPTS, seed=[1, 2], **settings)
    assert torch.allclose(first, eager.generate(PROMPTS, seed=[1, 2], **settings), atol=1e-4)
    with torch.compiler.set_stance("fail_on_recompile"):  # any recompilation is now an error
        again = compiled.generate(PROMPTS, seed=[3, 4], steps=5, candidates=1)
    cached = compiled.generate(PROMPTS, seed=[3, 4], steps=5, candidates=1, cache="first_block", cache_threshold=0.5)
    assert torch.allclose(again, eager.generate(PROMPTS, seed=[3, 4], steps=5, candidates=1), atol=1e-4)
    assert torch.allclose(cached, eager.generate(PROMPTS, seed=[3, 4], steps=5, candidates=1, cache="first_block",
                                                 cache_threshold=0.5), atol=1e-4)


def test_generate_compile_flag(tiny_run, tmp_path, capsys):
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", tiny_run, "--compile", "--steps", "2",
                            "-o", tmp_path / "x.png", "--no-progress")
    torch._dynamo.reset()
    assert code == 0 and (tmp_path / "x.png").is_file(), err


def test_a_speed_copy_of_a_compiled_model_is_compiled_too_and_serves(compiled):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from omnidit.quantize import speed_variant
    from omnidit.serve.app import build_app

    fast = speed_variant(compiled, "fast")  # int8 linears in its own copy, compiled again
    assert fast.model is not compiled.model and fast.model.compiled
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in fast.model.single_blocks)
    body = {"prompt": "a red circle", "seed": 1, "steps": 2}
    with TestClient(build_app({"tiny": compiled})) as client:
        replies = [client.post("/v1/images/generations", json=b) for b in (body, {**body, "speed": "fast"})]
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]


def test_compiled_int8_blocks_run_the_cached_rows_only_and_stop_compiling(tiny_run):
    """w8a8 layers trace into compiled blocks, and a step cache that computes some rows of a batch runs the
    compiled blocks on those rows alone (another batch size: compiled once more with the batch dynamic, and once
    for a single row): the images match eager int8's to int8 rounding, and once those forms are compiled, other
    seeds, thresholds and row counts compile nothing new."""
    from torch._dynamo.utils import counters

    from omnidit.quantize import quantize_in_memory

    torch._dynamo.reset()
    eager, compiled = (load_pipeline(tiny_run, device="cpu") for _ in range(2))
    for pipe in (eager, compiled):
        quantize_in_memory(pipe.model, "w8a8")
    compiled.model.compile_blocks()
    prompts, seeds = PROMPTS * 3, list(range(6))
    # past dynamo's recompile limit the blocks would run eagerly without a word: an error here instead
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        compiled.generate(prompts, seed=seeds, steps=2, candidates=1)  # the full batch's graphs
        full_batch_graphs = counters["stats"]["unique_graphs"]
        for threshold in (0.1, 0.3):  # some calls run 8 or 11 of the 12 rows; at 0.3 some run one
            settings = {"steps": 8, "candidates": 1, "cache": "first_block", "cache_threshold": threshold}
            images = compiled.generate(prompts, seed=seeds, **settings)
            assert counters["stats"]["unique_graphs"] > full_batch_graphs  # the blocks saw fewer rows than 12
            rows = compiled.model.last_step_cache.computed_rows
            assert any(1 < r < 12 for r in rows) if threshold == 0.1 else 1 in rows, rows
            reference = eager.generate(prompts, seed=seeds, **settings)
            assert eager.model.last_step_cache.computed_rows == rows
            assert (images - reference).abs().max() < 0.02 and (images - reference).abs().mean() < 1e-3
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled.generate(prompts, seed=list(range(6, 12)), steps=8, candidates=1, cache="first_block",
                              cache_threshold=0.2)
    torch._dynamo.reset()
