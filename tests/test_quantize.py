"""omnidit quantize: int8 rows round-trip within half a step, a w8a8 folder runs torch's int8 kernels on exactly the
stored values, a bf16 folder samples under bfloat16 autocast, both stay close to float32, and mistakes are one-line
errors with nothing written. Speed is measured by benchmarks/quantize.py, not here."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_one_line_error, run_main

from omnidit.checkpoint import SHIPPED_MODELS
from omnidit.errors import OmniditError
from omnidit.quantize import (
    FP8_MAX,
    Fp8Linear,
    Int8Linear,
    SmoothedLinear,
    WeightOnlyLinear,
    fp8_per_row,
    hadamard,
    int4_per_group,
    int8_per_row,
    load_quantized,
    quantize_folder,
    rotate_groups,
    smoothing_factors,
    unpack_int4,
    weight_only,
)


def test_int8_rows_round_trip_within_half_a_step():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 16)[:, None]
    values, scale = int8_per_row(w)
    assert values.dtype == torch.int8 and (values.abs().amax(dim=1) == 127).all()
    assert ((values.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_fp8_rows_round_trip_within_e4m3_rounding():
    """e4m3 has 3 mantissa bits: a value in a row's normal range comes back within 1/16 of itself; each row's
    largest |w| maps to 448 exactly."""
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 16)[:, None]
    values, scale = fp8_per_row(w)
    assert values.dtype == torch.float8_e4m3fn and (values.float().abs().amax(dim=1) == FP8_MAX).all()
    restored = values.float() * scale[:, None]
    normal = w.abs() >= 2 ** -6 * scale[:, None]  # e4m3's smallest normal, in the row's scale
    assert ((restored - w).abs() <= w.abs() / 16 + 1e-12)[normal].all()
    assert ((restored - w).abs() <= 2 ** -10 * scale[:, None])[~normal].all()  # subnormal steps: half of 2^-9


def test_an_fp8_linear_multiplies_the_stored_e4m3_values_and_stays_close_to_float():
    """Fp8Linear's output is exactly the product of the e4m3 input and weight values with their scales (the fp8
    kernel's arithmetic, checked against the same product in float64), within 4 % of the float32 layer's."""
    g = torch.Generator().manual_seed(4)
    w, b, x = torch.randn(48, 64, generator=g) * 0.1, torch.randn(48, generator=g), torch.randn(2, 5, 64, generator=g)
    layer = Fp8Linear(*fp8_per_row(w), b)
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    rows = x.reshape(-1, 64)
    x_scale = rows.abs().amax(dim=1, keepdim=True) / FP8_MAX
    x8 = (rows / x_scale).to(torch.float8_e4m3fn).double() * x_scale.double()
    expected = (x8 @ (layer.values.double() * layer.scale.double()[:, None]).T + b.double()).reshape(2, 5, 48)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    exact = x @ w.T + b
    assert 0 < float((out - exact).norm() / exact.norm()) < 0.04
    assert torch.allclose(layer.weight, layer.values.float() * layer.scale[:, None])
    assert layer(torch.zeros(2, 0, 64)).shape == (2, 0, 48)  # no tokens
    tokens = x.reshape(-1, 64).repeat(4, 1)  # 40 tokens
    with torch.inference_mode():  # a token's output does not depend on how many share the call
        many = layer(tokens)
        for rows in range(1, 20):
            assert torch.equal(layer(tokens[:rows]), many[:rows]), rows


def test_an_int8_linear_multiplies_per_token_int8_inputs_exactly_and_stays_close_to_float():
    """Int8Linear's output is exactly the product of each token's int8 values (its largest |x| to 127) and the
    weight's, with both scales (checked against the same product in float64), within 2 % of the float32 layer's;
    a token's output is bit-identical however many tokens share the call; compiled (as it runs eagerly) and
    traced formula agree to float rounding."""
    from omnidit.quantize import int8_matmul

    g = torch.Generator().manual_seed(4)
    w, b, x = torch.randn(48, 64, generator=g) * 0.1, torch.randn(48, generator=g), torch.randn(2, 5, 64, generator=g)
    layer = Int8Linear(*int8_per_row(w), b)
    with torch.inference_mode():
        out = layer(x)
        assert out.shape == (2, 5, 48) and out.dtype == torch.float32
        rows = x.reshape(-1, 64).double()
        step = rows.abs().amax(dim=1, keepdim=True) / 127
        xq = torch.round(rows / step).clamp(-127, 127) * step
        expected = (xq @ (layer.values.double() * layer.scale.double()[:, None]).T + b.double()).reshape(2, 5, 48)
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
        exact = x @ w.T + b
        assert 0 < float((out - exact).norm() / exact.norm()) < 0.02
        traced = int8_matmul(x.reshape(-1, 64), layer.values, layer.scale, b).reshape(2, 5, 48)
        assert torch.allclose(out, traced, rtol=1e-6, atol=1e-6)
        assert torch.allclose(layer.weight, layer.values.float() * layer.scale[:, None])
        assert layer(torch.zeros(2, 0, 64)).shape == (2, 0, 48)  # no tokens
        tokens = x.reshape(-1, 64).repeat(4, 1)  # 40 tokens
        many = layer(tokens)
        for count in range(1, 20):
            assert torch.equal(layer(tokens[:count]), many[:count]), count


def test_an_int8_linear_stays_eager_with_a_warning_where_inductor_cannot_compile(monkeypatch):
    from omnidit import quantize

    def no_compiler(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler"), None)

    monkeypatch.setattr(quantize, "_int8_kernel", no_compiler)
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(8, 16, generator=g), torch.randn(3, 16, generator=g)
    layer = Int8Linear(*int8_per_row(w), None)
    with pytest.warns(UserWarning, match=r"int8 layers run uncompiled \(slower\): RuntimeError: no C\+\+ compiler"):
        out = layer(x)
    assert quantize._int8_kernel is quantize.int8_matmul  # from now on, without trying again
    assert torch.equal(out, quantize.int8_matmul(x, layer.values, layer.scale, None))


def test_fp8_loads_only_where_it_can_compute(monkeypatch):
    """A GPU below compute capability 8.9 (or none) and layer sizes that are not multiples of 16 are one-line errors
    (checked with a patched capability: no GPU here); a CPU computes fp8 with torch's own kernel."""
    from helpers import build, tiny_config

    from omnidit.quantize import check_fp8_device

    model = build(tiny_config())  # every block linear a multiple of 16
    check_fp8_device(model, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(OmniditError, match="compute capability 8.9"):
        check_fp8_device(model, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(model, torch.device("cuda"))
    odd = build(tiny_config(hidden_size=40, axes_dim=(4, 8, 8)))  # 40 inputs, 120 QKV outputs: not multiples of 16
    with pytest.raises(OmniditError, match="multiples of 16"):
        check_fp8_device(odd, torch.device("cuda"))


def test_int4_groups_pack_two_per_byte_and_round_trip_within_half_a_step():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 8)[:, None]
    packed, scale = int4_per_group(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 64) and scale.shape == (8, 4)
    restored = unpack_int4(packed, scale)
    step = scale.repeat_interleave(32, dim=1)
    assert ((restored - w).abs() <= step / 2 + 1e-6).all()
    assert torch.allclose(restored.abs().unflatten(1, (4, 32)).amax(dim=2), w.abs().unflatten(1, (4, 32)).amax(dim=2))
    exact = torch.arange(-7, 8).float().repeat(8, 2)[:, :16] * 0.5  # values on the grid come back bit-exact
    assert torch.equal(unpack_int4(*int4_per_group(exact, 16)), exact)


def test_hadamard_rotation_is_orthonormal_and_leaves_a_float_linear_unchanged():
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6) and torch.equal(h, h.T)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 128, generator=g), torch.randn(24, 128, generator=g)
    assert torch.allclose(rotate_groups(x, 64) @ rotate_groups(w, 64).T, x @ w.T, atol=1e-4)
    with pytest.raises(OmniditError, match="power-of-2"):
        hadamard(48)


def test_rotation_spreads_an_outlier_so_int4_error_falls():
    """One large weight per group sets the group's scale: unrotated, the rest round to few levels; rotated,
    the outlier is spread over the group. The layer's output error must fall more than two-fold."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 128, generator=g) * 0.02
    w[:, ::64] = 1.0  # one outlier in each group of 64
    x = torch.randn(16, 128, generator=g)
    errors = {}
    for rotate in (False, True):
        layer = WeightOnlyLinear(*weight_only(w, "w4", 64, rotate), None, bits=4, group=64, rotate=rotate)
        errors[rotate] = (layer(x) - x @ w.T).norm() / (x @ w.T).norm()
    assert errors[True] < errors[False] / 2, errors


def test_smoothing_moves_activation_outliers_into_the_weights_so_int8_error_falls():
    """A few input channels with activations 50x the rest set every token's activation scale: unsmoothed, the
    other channels round to few levels. Balancing the channels (alpha 0.5) must cut the output error >2-fold."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 128, generator=g) * 0.05, torch.randn(32, 128, generator=g)
    x[:, :4] *= 50
    exact = x @ w.T
    plain = Int8Linear(*int8_per_row(w), None)
    s = smoothing_factors(x.abs().amax(dim=0), w, 0.5)
    smoothed = SmoothedLinear(Int8Linear(*int8_per_row(w * s), None), s)
    errors = [float((layer(x) - exact).norm() / exact.norm()) for layer in (plain, smoothed)]
    assert errors[1] < errors[0] / 2, errors


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("quantized")
    return {s: quantize_folder(tiny_run, root / s, s) for s in ("w8a8", "bf16")}


def test_w8a8_runs_the_stored_int8_values_and_stays_close(folders, tiny_run):
    from omnidit.pipeline import load_pipeline

    stored = load_file(str(folders["w8a8"] / "model.safetensors"))
    pipe = load_pipeline(folders["w8a8"], device="cpu")
    int8 = {n: m for n, m in pipe.model.named_modules() if isinstance(m, Int8Linear)}
    assert "single_blocks.0.linear1" in int8 and "double_blocks.0.streams.img.qkv" in int8
    assert not any(n.endswith("mod.lin") for n in int8)  # per-sample modulation stays float
    for name, layer in int8.items():
        assert torch.equal(layer.values, stored[f"{name}.weight"])
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


def test_an_fp8_folder_stores_e4m3_weights_and_samples_close_to_float(tiny_run, tmp_path):
    from omnidit.checkpoint import read_config
    from omnidit.pipeline import load_pipeline

    out = quantize_folder(tiny_run, tmp_path / "fp8", "fp8")
    stored = load_file(str(out / "model.safetensors"))
    assert stored["single_blocks.0.linear1.weight"].dtype == torch.float8_e4m3fn
    assert stored["single_blocks.0.mod.lin.weight"].dtype == torch.float32  # per-sample modulation stays float
    pipe = load_pipeline(out, device="cpu")
    layer = pipe.model.double_blocks[0].streams["img"].qkv
    assert isinstance(layer, Fp8Linear) and torch.equal(layer.values, stored["double_blocks.0.streams.img.qkv.weight"])
    prompts = ["a red circle", "two blue squares"]
    ref = load_pipeline(tiny_run, device="cpu").generate(prompts, seed=[1, 2])
    alone = pipe.generate(prompts[1:], seed=[2])
    got = pipe.generate(prompts, seed=[1, 2])
    assert 0 < (got - ref).abs().mean() < 0.05
    assert torch.allclose(got[1:], alone, atol=1e-5)  # per-token scales: an image does not depend on its batch
    with pytest.raises(OmniditError, match="fp8 needs a GPU with fp8 tensor cores"):
        load_quantized(out, read_config(out), "fp8", torch.device("meta"))


def test_a_scorer_ranks_best_of_n_at_its_own_precision(tiny_run):
    import copy
    import dataclasses

    from omnidit.pipeline import load_pipeline
    from omnidit.quantize import quantize_in_memory
    from omnidit.selection import SCORE_TIMES

    pipe = load_pipeline(tiny_run, device="cpu")
    scorer = quantize_in_memory(copy.deepcopy(pipe.model), "bf16")  # as a fast preset's scorer on a GPU
    pipe = dataclasses.replace(pipe, scorer=scorer)
    sampled, scored = [], []
    pipe.model.single_blocks[0].linear1.register_forward_hook(lambda m, a, out: sampled.append(out.dtype))
    scorer.single_blocks[0].linear1.register_forward_hook(lambda m, a, out: scored.append(out.dtype))
    pipe.generate(["a red circle"], seed=1, steps=2, candidates=2, cache="none")
    assert set(sampled) == {torch.float32} and scored == [torch.bfloat16] * len(SCORE_TIMES)


@pytest.mark.parametrize("scheme, rotate", [("w8", False), ("w4", False), ("w4", True)])
def test_weight_only_folders_store_small_weights_and_sample_close_to_float(tiny_run, tmp_path, scheme, rotate):
    from omnidit.pipeline import load_pipeline

    out = quantize_folder(tiny_run, tmp_path / scheme, scheme, group=32, rotate=rotate)
    stored = load_file(str(out / "model.safetensors"))
    weight = stored["single_blocks.0.linear1.weight"]
    assert weight.dtype == (torch.uint8 if scheme == "w4" else torch.int8)
    pipe = load_pipeline(out, device="cpu")
    layer = pipe.model.single_blocks[0].linear1
    assert isinstance(layer, WeightOnlyLinear) and layer.rotate == rotate and layer.values.dtype == weight.dtype
    assert isinstance(pipe.model.single_blocks[0].mod.lin, WeightOnlyLinear)  # for memory: modulation too
    float_pipe = load_pipeline(tiny_run, device="cpu")
    dense = float_pipe.model.single_blocks[0].linear1.weight
    restored = layer.dequantized() if not rotate else rotate_groups(layer.dequantized(), 32)  # H H = I
    assert ((restored - dense).norm() / dense.norm()) < (0.01 if scheme == "w8" else 0.15)
    prompts = ["a red circle", "two blue squares"]
    ref, got = float_pipe.generate(prompts, seed=[1, 2]), pipe.generate(prompts, seed=[1, 2])
    assert 0 < (got - ref).abs().mean() < (0.05 if scheme == "w8" else 0.15)


def wide_float(t: torch.Tensor) -> bool:
    """A float tensor of 16 bits or more: fp8's stored values are float too, but they are the quantized weights."""
    return t.is_floating_point() and t.element_size() >= 2


@pytest.mark.parametrize("scheme", ["w8a8", "fp8", "w8", "w4"])
def test_loading_a_quantized_folder_never_makes_a_float_copy_of_its_quantized_weights(tiny_run, tmp_path, scheme):
    from torch.utils._python_dispatch import TorchDispatchMode

    from omnidit.checkpoint import load_model

    out = quantize_folder(tiny_run, tmp_path / scheme, scheme, group=32)
    stored = load_file(str(out / "model.safetensors"))
    quantized = {tuple(v.shape) for k, v in load_model(tiny_run)[0].state_dict().items()
                 if f"{k}_scale" in stored}  # (out, in) of every weight the folder holds quantized
    quantized -= {tuple(v.shape) for v in stored.values() if wide_float(v)}  # shapes no float entry shares
    assert quantized

    class FloatShapes(TorchDispatchMode):  # the shape of every float tensor an operation makes on a real device
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor) and wide_float(t) and t.device.type != "meta":
                    FloatShapes.seen.add(tuple(t.shape))
            return result

    with FloatShapes():
        model = load_model(out)[0]
    assert not quantized & FloatShapes.seen  # the old loader built every weight in float32 first
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_a_quantized_folder_missing_a_bias_or_with_a_wrong_shape_is_a_clear_error(tiny_run, tmp_path):
    from safetensors.torch import save_file

    from omnidit.checkpoint import load_model

    out = quantize_folder(tiny_run, tmp_path / "w8", "w8")
    state = load_file(str(out / "model.safetensors"))
    key = "double_blocks.0.streams.img.mlp.fc1"
    save_file({k: v for k, v in state.items() if k != f"{key}.bias"}, str(out / "model.safetensors"))
    with pytest.raises(OmniditError, match=f"missing key '{key}.bias'"):
        load_model(out)
    save_file({**state, f"{key}.weight": state[f"{key}.weight"][:, :-1].contiguous()}, str(out / "model.safetensors"))
    with pytest.raises(OmniditError, match=f"'{key}' holds a"):
        load_model(out)


def test_a_smoothed_w8a8_folder_stores_its_factors_and_samples_close_to_float(tiny_run, tmp_path):
    from omnidit.pipeline import load_pipeline

    out = quantize_folder(tiny_run, tmp_path / "smooth", "w8a8", smooth=0.5)
    stored = load_file(str(out / "model.safetensors"))
    factors = stored["single_blocks.0.linear1.smooth"]
    assert factors.shape == (64,) and (factors > 0).all() and not torch.allclose(factors, torch.ones(64))
    assert "single_blocks.0.mod.lin.smooth" not in stored  # per-sample modulation stays float
    pipe = load_pipeline(out, device="cpu")
    layer = pipe.model.single_blocks[0].linear1
    assert isinstance(layer, SmoothedLinear) and torch.equal(layer.smooth, factors)
    prompts = ["a red circle", "two blue squares"]
    ref = load_pipeline(tiny_run, device="cpu").generate(prompts, seed=[1, 2])
    assert 0 < (pipe.generate(prompts, seed=[1, 2]) - ref).abs().mean() < 0.05


def test_quantize_refuses_what_it_cannot_do(folders, tmp_path):
    with pytest.raises(OmniditError, match="already quantized"):
        quantize_folder(folders["w8a8"], tmp_path / "again", "bf16")
    with pytest.raises(OmniditError, match="unknown quantization scheme"):
        quantize_folder(folders["w8a8"], tmp_path / "x", "w3")
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
    code, _, err = run_main(capsys, "quantize", tiny_run, tmp_path / "y", "--scheme", "w3")
    assert_one_line_error(code, err, "invalid choice")
    code, _, err = run_main(capsys, "quantize", tiny_run, tmp_path / "y", "--scheme", "w8a8", "--rotate")
    assert_one_line_error(code, err, "--rotate applies to the weight-only schemes")
    code, _, err = run_main(capsys, "quantize", tiny_run, tmp_path / "y", "--scheme", "w4", "--smooth", "0.5")
    assert_one_line_error(code, err, "--smooth is w8a8's channel balancing")
    code, _, err = run_main(capsys, "quantize", tiny_run, tmp_path / "y", "--scheme", "w8a8", "--smooth", "1.5")
    assert_one_line_error(code, err, "an alpha in (0, 1)")
    code, _, err = run_main(capsys, "quantize", tiny_run, tmp_path / "y", "--scheme", "w8", "--group-size", "32")
    assert_one_line_error(code, err, "--group-size applies to w4 and to --rotate")
    code, _, err = run_main(capsys, "quantize", tiny_run, tmp_path / "y", "--scheme", "w4", "--group-size", "48")
    assert_one_line_error(code, err, "--group-size must be a power of 2")
    code, _, err = run_main(capsys, "quantize", tiny_run, tmp_path / "y", "--scheme", "w4", "--group-size", "4096")
    assert_one_line_error(code, err, "does not divide the inputs of")
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("name", sorted(set(SHIPPED_MODELS) - {"shapes"}))  # shapes: test_guided_model.py
def test_every_shipped_model_samples_at_the_fast_presets(name):
    from omnidit.pipeline import load_pipeline
    from omnidit.quantize import speed_variant

    pipe = load_pipeline(name, device="cpu")
    for speed in ("fast", "faster"):
        fast = speed_variant(pipe, speed)
        assert isinstance(fast.model.single_blocks[0].linear1, Int8Linear), (name, speed)
        if pipe.config.model.extra_streams:  # a clip with sound
            clip = fast.generate_av(["a red circle bouncing"], steps=2, seed=1)
            out = torch.cat([clip.video.flatten(), clip.audio.flatten()])
        elif pipe.config.data.frames > 1:
            out = fast.generate_video(["a red circle moving right"], frames=4, steps=2, seed=1)
        else:
            out = fast.generate(["a red circle"], steps=2, seed=1)
        assert torch.isfinite(out).all() and out.abs().max() <= 1 and out.std() > 0.01, (name, speed)


def test_speed_presets_quantize_and_change_only_the_defaults(tiny_run, tmp_path, capsys):
    from omnidit.pipeline import load_pipeline
    from omnidit.quantize import apply_speed

    pipe = load_pipeline(tiny_run, device="cpu")
    apply_speed(pipe, "faster")
    assert isinstance(pipe.model.single_blocks[0].linear1, Int8Linear)
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
