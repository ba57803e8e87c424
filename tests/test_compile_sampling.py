"""--compile: regional torch.compile of the blocks samples the same images as eager, and later steps, calls,
seeds and the step cache reuse the compiled blocks without recompiling."""

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
        cached = compiled.generate(PROMPTS, seed=[3, 4], steps=5, candidates=1, cache="first_block",
                                   cache_threshold=0.5)
    assert torch.allclose(again, eager.generate(PROMPTS, seed=[3, 4], steps=5, candidates=1), atol=1e-4)
    assert torch.allclose(cached, eager.generate(PROMPTS, seed=[3, 4], steps=5, candidates=1, cache="first_block",
                                                 cache_threshold=0.5), atol=1e-4)


def test_generate_compile_flag(tiny_run, tmp_path, capsys):
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", tiny_run, "--compile", "--steps", "2",
                            "-o", tmp_path / "x.png", "--no-progress")
    torch._dynamo.reset()
    assert code == 0 and (tmp_path / "x.png").is_file(), err
