"""Analytic FLOPs against torch's FlopCounterMode, memory estimate, peak table and MFU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import random_condition, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from omnidit.flops import (
    PEAK_TFLOPS,
    activation_elements,
    estimate_training_memory,
    flops_per_image,
    forward_flops,
    mfu,
    parameter_count,
    peak_tflops,
    training_flops,
)
from omnidit.model.mmdit import PRESETS, MMDiT
from omnidit.tokens import image_position_ids, patchify

# (config overrides, batch, image side in pixels, text tokens)
CASES = [
    ({}, 2, 16, 5),  # text + pooled, double and single blocks
    ({"depth_single": 0}, 2, 12, 7),  # pre-only text stream in the last double block
    ({"context_dim": 0, "pooled_dim": 0, "num_classes": 10}, 3, 8, 0),  # class-conditional, no txt stream
    ({"context_dim": 0, "pooled_dim": 0, "num_classes": 10, "depth_single": 2}, 1, 16, 0),
    ({"guidance_embed": True, "num_classes": 5, "depth": 3, "depth_single": 0}, 1, 16, 3),
    ({"patch_size": 4, "mlp_ratio": 2.0, "abs_pos_embed": True, "hidden_size": 96, "num_heads": 3}, 4, 32, 9),
    # SD3.5-like: no RoPE, position table, dual attention; DiT-like: learned sigma doubles the output
    ({"rope": False, "pos_table_size": 8, "dual_attention_layers": (0, 1), "depth_single": 0}, 2, 16, 5),
    ({"context_dim": 0, "pooled_dim": 0, "num_classes": 10, "out_channels": 6, "time_freq_shift": 1.0}, 1, 8, 0),
]


def _inputs(cfg, batch: int, side: int, text_tokens: int):
    x = patchify(torch.randn(batch, cfg.in_channels, side, side), cfg.patch_size)
    ids = image_position_ids(side // cfg.patch_size, side // cfg.patch_size, len(cfg.axes_dim))
    return x, ids, torch.rand(batch), random_condition(cfg, batch, text_tokens)


def _counted(model, inputs, backward: bool = False) -> int:
    # The math SDPA backend runs attention as bmm, which the counter sees; the fused CPU kernel
    # has no flop formula (see test_cpu_fused_sdpa_is_uncounted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(*inputs)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides,batch,side,text_tokens", CASES)
def test_forward_flops_match_flop_counter(overrides, batch, side, text_tokens):
    cfg = tiny_config(**overrides)
    inputs = _inputs(cfg, batch, side, text_tokens)
    n_img = (side // cfg.patch_size) ** 2
    expected = _counted(MMDiT(cfg), inputs)
    assert forward_flops(cfg, n_img, text_tokens, batch) == pytest.approx(expected, rel=0.01)


def test_training_flops_is_three_forwards_and_close_to_counted_backward():
    cfg = tiny_config()
    inputs = _inputs(cfg, 2, 16, 5)
    assert training_flops(cfg, 64, 5, 2) == 3 * forward_flops(cfg, 64, 5, 2)
    # The real backward skips input gradients of the first layers, so it is a little under 2x.
    counted = _counted(MMDiT(cfg).train(), inputs, backward=True)
    assert 0.97 * training_flops(cfg, 64, 5, 2) <= counted <= training_flops(cfg, 64, 5, 2)


def test_cpu_fused_sdpa_is_uncounted():
    """Documents the counter's convention: without the math backend, CPU attention counts 0
    (or, if torch learns a formula for the fused CPU kernel, exactly our attention term)."""
    cfg = tiny_config(depth_single=0)
    inputs = _inputs(cfg, 2, 16, 5)
    with FlopCounterMode(display=False) as counter:
        MMDiT(cfg)(*inputs)
    attention = cfg.depth * 4 * (64 + 5) ** 2 * cfg.hidden_size * 2
    assert counter.get_total_flops() in (forward_flops(cfg, 64, 5, 2), forward_flops(cfg, 64, 5, 2) - attention)


def test_flops_scale_and_checks():
    cfg = tiny_config()
    assert forward_flops(cfg, 64, 5, batch=3) == 3 * forward_flops(cfg, 64, 5)
    # Attention is quadratic, the rest linear: doubling tokens more than doubles FLOPs.
    assert forward_flops(cfg, 128, 5) > 2 * forward_flops(cfg, 64, 5) - forward_flops(cfg, 0, 5)
    with pytest.raises(ValueError, match="no text stream"):
        forward_flops(tiny_config(context_dim=0, num_classes=3), 64, 5)


def test_flops_per_image():
    cfg = tiny_config(patch_size=2)
    per_image = flops_per_image(cfg, 16, 24, 5)
    assert per_image == {"forward": forward_flops(cfg, 8 * 12, 5), "train": training_flops(cfg, 8 * 12, 5)}
    with pytest.raises(Exception, match="patch size"):
        flops_per_image(cfg, 15, 16, 5)


def test_dit_xl_2_matches_published_gflops():
    # DiT-XL/2 at 256 px (32x32x4 latents, 256 tokens) is 118.6 GFLOPs in the DiT paper, which
    # counts multiply-adds; with class labels and no text our XL is the same network.
    cfg = replace(PRESETS["XL"], in_channels=4, context_dim=0, pooled_dim=0, num_classes=1000)
    assert flops_per_image(cfg, 32, 32, 0)["forward"] / 2 / 1e9 == pytest.approx(118.6, rel=0.01)


def test_training_memory_terms():
    cfg = tiny_config()
    numel = sum(p.numel() for p in MMDiT(cfg).parameters())
    assert parameter_count(cfg) == numel
    mem = estimate_training_memory(cfg, batch=4, image_tokens=64, text_tokens=5)
    assert mem["params"] == mem["grads"] == mem["ema"] == 4 * numel
    assert mem["optimizer"] == 2 * 4 * numel
    assert mem["activations"] == 4 * 4 * activation_elements(cfg, 64, 5)
    assert set(mem) == {"params", "grads", "optimizer", "ema", "activations"}  # sum(values) = total
    half = estimate_training_memory(cfg, 4, 64, 5, dtype_bytes=2, optimizer="sgd", ema=False)
    assert half["params"] == 2 * numel and half["optimizer"] == 2 * numel and half["ema"] == 0
    with pytest.raises(ValueError, match="unknown optimizer"):
        estimate_training_memory(cfg, 1, 64, 5, optimizer="lion")


@pytest.mark.parametrize("overrides", [{}, {"depth_single": 0}, {"context_dim": 0, "num_classes": 10}])
def test_activation_estimate_close_to_saved_tensors(overrides):
    cfg = tiny_config(hidden_size=128, num_heads=4, **overrides)
    text = 5 if cfg.context_dim else 0
    model = MMDiT(cfg).train()
    x, ids, t, cond = _inputs(cfg, 2, 16, text)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, ids, t, cond)
    estimate = estimate_training_memory(cfg, 2, 64, text)["activations"]
    assert estimate == pytest.approx(sum(saved.values()), rel=0.15)


@pytest.mark.parametrize("name,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 80GB HBM3", "fp32", 67.0),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H100 NVL", "bfloat16", 835.5),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "float32", 19.5),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("H100 SXM", "tf32", 494.7),
    ("NVIDIA GH200 480GB", "bf16", None),
    ("Tesla T4", "fp16", None),
    ("NVIDIA H100 80GB HBM3", "fp8", None),
])
def test_peak_tflops(name, dtype, expected):
    assert peak_tflops(name, dtype) == expected


def test_peak_table_and_mfu():
    for key, peaks in PEAK_TFLOPS.items():
        assert peak_tflops(key, "bf16") == peaks["bf16"], key  # every key matches its own row
        assert peaks["bf16"] >= peaks["tf32"] >= 0.5 * peaks["fp32"]
    assert mfu(494.7e12, 989.4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1e12, 0.0)
