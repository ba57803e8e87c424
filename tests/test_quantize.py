"""omnidit quantize: int8 rows round-trip within half a step, a w8a8 folder runs torch's int8 kernels on exactly the
stored values, a bf16 folder samples under bfloat16 autocast, both stay close to float32, and mistakes are one-line
errors with nothing written. Speed is measured by benchmarks/quantize.py, not here."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_one_line_error, run_main

from omnidit.errors import OmniditError
from omnidit.quantize import int8_per_row, load_quantized, quantize_folder


def test_int8_rows_round_trip_within_half_a_step():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 16)[:, None]
    values, scale = int8_per_row(w)
    assert values.dtype == torch.int8 and (values.abs().amax(dim=1) == 127).all()
    assert ((values.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("quantized")
    return {s: quantize_folder(tiny_run, root / s, s) for s in ("w8a8", "bf16")}


def test_w8a8_runs_the_stored_int8_values_and_stays_close(folders, tiny_run):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from omnidit.pipeline import load_pipeline

    stored = load_file(str(folders["w8a8"] / "model.safetensors"))
    pipe = load_pipeline(folders["w8a8"], device="cpu")
    int8 = {n: m for n, m in pipe.model.named_modules() if isinstance(m, DynamicInt8Linear)}
    assert "single_blocks.0.linear1" in int8 and "double_blocks.0.streams.img.qkv" in int8
    assert not any(n.endswith("mod.lin") for n in int8)  # per-sample modulation stays float
    for name, layer in int8.items():
        assert torch.equal(layer.weight().int_repr(), stored[f"{name}.weight"])
    prompts = ["a red circle", "two blue squares"]
    ref = load_pipeline(tiny_run, device="cpu").generate(prompts, seed=[1, 2])
    out = pipe.generate(prompts, seed=[1, 2])
    assert 0 < (out - ref).abs().mean() < 0.05


def test_bf16_stores_bfloat16_and_samples_under_autocast(folders, tiny_run):
    from omnidit.pipeline import load_pipeline

    stored = load_file(str(folders["bf16"] / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in stored.values() if v.is_floating_point())
    pipe = load_pipeline(folders["bf16"], device="cpu")
    assert pipe.model.autocast_dtype == torch.bfloat16
    seen = []
    hook = pipe.model.single_blocks[0].linear1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    out = pipe.generate(["a red circle"], seed=1)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    ref = load_pipeline(tiny_run, device="cpu").generate(["a red circle"], seed=1)
    assert (out - ref).abs().mean() < 0.05


def test_quantize_refuses_what_it_cannot_do(folders, tmp_path):
    with pytest.raises(OmniditError, match="already quantized"):
        quantize_folder(folders["w8a8"], tmp_path / "again", "bf16")
    with pytest.raises(OmniditError, match="unknown quantization scheme"):
        quantize_folder(folders["w8a8"], tmp_path / "x", "w4")
    from omnidit.checkpoint import read_config

    with pytest.raises(OmniditError, match="w8a8 runs on CPUs"):
        load_quantized(folders["w8a8"], read_config(folders["w8a8"]), "w8a8", torch.device("meta"))


def test_quantize_command(tmp_path, tiny_run, capsys):
    out = tmp_path / "q"
    code, stdout, err = run_main(capsys, "quantize", tiny_run, out, "--scheme", "w8a8")
    assert code == 0 and "w8a8" in stdout, err
    code, stdout, err = run_main(capsys, "info", out)
    assert code == 0 and "quantized w8a8" in stdout and "step          20" in stdout, err
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", out, "-o", tmp_path / "x.png",
                            "--no-progress")
    assert code == 0 and (tmp_path / "x.png").is_file(), err
    code, _, err = run_main(capsys, "quantize", tiny_run, out, "--scheme", "bf16")
    assert_one_line_error(code, err, "already exists")
    code, _, err = run_main(capsys, "quantize", tiny_run, tmp_path / "y", "--scheme", "w4")
    assert_one_line_error(code, err, "invalid choice")
    assert not (tmp_path / "y").exists()


def test_speed_presets_quantize_and_change_only_the_defaults(tiny_run, tmp_path, capsys):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from omnidit.pipeline import load_pipeline
    from omnidit.quantize import apply_speed

    pipe = load_pipeline(tiny_run, device="cpu")
    apply_speed(pipe, "faster")
    assert isinstance(pipe.model.single_blocks[0].linear1, DynamicInt8Linear)
    settings = pipe.sampling_settings()
    assert settings["cache"] == "first_block" and settings["candidates"] == 1
    assert pipe.sampling_settings(cache="none", candidates=2)["cache"] == "none"  # explicit settings win
    with pytest.raises(OmniditError, match="unknown speed"):
        apply_speed(pipe, "ludicrous")
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", tiny_run, "--speed", "fast", "-o",
                            tmp_path / "f.png", "--no-progress")
    assert code == 0, err
    from PIL import Image

    with Image.open(tmp_path / "f.png") as im:
        assert im.info["speed"] == "fast" and im.info["cache"] == "first_block"
