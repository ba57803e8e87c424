"""generate draws -n outputs in bounded batches (output i from seed + i, whatever the batch), writes one file
each with an {i} template, refuses grids too large to be useful, and refuses before allocating a request whose
activations do not fit in free memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omnidit import validate
from omnidit.cli import main
from omnidit.errors import OmniditError
from omnidit.flops import sampling_bytes_per_sample
from omnidit.model.mmdit import MMDiTConfig
from omnidit.pipeline import load_pipeline

GEN = ["--steps", "2", "--cfg", "3", "--no-progress"]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_refused(code: int, err: str, tmp_path, *fragments: str) -> None:
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all(f in err for f in fragments), err
    assert [p for p in tmp_path.iterdir() if p.suffix in (".png", ".mp4")] == []  # nothing written


def test_each_output_is_its_seed_whatever_the_batch(tiny_run, tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "a red circle", "--model", tiny_run, *GEN, "-n", "5", "--batch-size", "2",
                       "-o", tmp_path / "x_{i:02d}.png")
    assert code == 0 and out.count("wrote") == 5
    assert run(capsys, "generate", "a red circle", "--model", tiny_run, *GEN, "--seed", "3", "-o",
               tmp_path / "alone.png")[0] == 0
    np.testing.assert_array_equal(pixels(tmp_path / "x_03.png"), pixels(tmp_path / "alone.png"))
    assert Image.open(tmp_path / "x_03.png").text["seed"] == "3"

    # the grid of the same five in one batch holds the same images
    assert run(capsys, "generate", "a red circle", "--model", tiny_run, *GEN, "-n", "5", "-o",
               tmp_path / "grid.png")[0] == 0
    grid, first = pixels(tmp_path / "grid.png"), pixels(tmp_path / "x_00.png")
    h, w = first.shape[:2]
    assert not np.array_equal(first, pixels(tmp_path / "x_01.png"))  # different seeds, different images
    found = [np.array_equal(grid[y:y + h, x:x + w], first) for y in range(grid.shape[0] - h + 1)
             for x in range(grid.shape[1] - w + 1)]
    assert any(found)


def test_a_grid_too_large_or_a_bad_template_is_refused(tiny_run, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a red circle", "--model", tiny_run, *GEN, "-n", "65", "-o",
                       tmp_path / "x.png")
    assert_refused(code, err, tmp_path, "more than 64", "-o 'out_{i}.png'")
    code, _, err = run(capsys, "generate", "a red circle", "--model", tiny_run, *GEN, "-n", "2", "-o",
                       tmp_path / "x_{n}.png")
    assert_refused(code, err, tmp_path, "not a valid name template")
    code, _, err = run(capsys, "generate", "a red circle", "--model", tiny_run, *GEN, "-n", "2", "-o",
                       tmp_path / "x.png", "--batch-size", "0")
    assert_refused(code, err, tmp_path, "--batch-size must be >= 1")


def test_a_size_that_cannot_fit_is_refused_before_allocating(tiny_run, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a red circle", "--model", tiny_run, *GEN, "--size", "100000x100000",
                       "-o", tmp_path / "x.png")
    assert_refused(code, err, tmp_path, "100000x100000 needs about", "TiB of memory", "GiB free")
    pipe = load_pipeline(tiny_run, device="cpu")
    with pytest.raises(OmniditError, match="needs about"):  # the Python API checks it too
        pipe.generate(["a red circle"], width=65536, height=65536)


def test_the_batch_shrinks_to_what_fits(tiny_run, tmp_path, capsys, monkeypatch):
    pipe = load_pipeline(tiny_run, device="cpu")
    per_image = pipe._bytes_per_sample(1, 16, 16, pipe.sampling_settings(cfg=3.0))
    monkeypatch.setattr(validate, "available_memory", lambda device: int(2.5 * per_image / 0.9))
    monkeypatch.setattr("omnidit.pipeline.available_memory", validate.available_memory)
    assert pipe.batch_limit(1, cfg=3.0) == 2
    with pytest.raises(OmniditError, match="sampling 3 images of 16x16 needs about"):
        pipe.generate(["a red circle"] * 3, steps=1, cfg=3.0)
    code, out, _ = run(capsys, "generate", "a red circle", "--model", tiny_run, *GEN, "-n", "3", "-o",
                       tmp_path / "x_{i}.png")
    assert code == 0 and out.count("wrote") == 3  # in batches of 2 and 1


def test_check_memory_names_the_need_and_what_is_free(monkeypatch):
    monkeypatch.setattr(validate, "available_memory", lambda device: 10 * 2**30)
    validate.check_memory(9 * 2**30, torch.device("cpu"), "x", hint="h")  # 90% fits
    with pytest.raises(OmniditError, match=r"x needs about 9.5 GiB of memory, but the cpu has 10.0 GiB free"):
        validate.check_memory(int(9.5 * 2**30), torch.device("cpu"), "x", hint="h")
    assert validate.available_memory(torch.device("cpu")) is not None  # Linux: MemAvailable


def test_sampling_memory_is_linear_in_tokens():
    config = MMDiTConfig(hidden_size=64, num_heads=2, depth=1, depth_single=1, context_dim=384, pooled_dim=384)
    one = sampling_bytes_per_sample(config, 100, 0)
    assert sampling_bytes_per_sample(config, 200, 0) == 2 * one
    assert sampling_bytes_per_sample(config, 100, 0, dtype_bytes=2) * 2 == one
    assert sampling_bytes_per_sample(config, 100, 28) == sampling_bytes_per_sample(config, 128, 0)  # text counts
