"""LoRA adapters through peft (omnidit.lora): adding one changes nothing until trained, the PEFT and kohya
layouts round-trip to the same outputs, several adapters combine by weight, merge equals the unmerged
adapter and unmerge gives the base back, and files that do not fit the model are one-line errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from omnidit.condition import Condition  # noqa: E402
from omnidit.errors import OmniditError  # noqa: E402
from omnidit.lora import (  # noqa: E402
    add_lora,
    describe,
    load_lora,
    lora_layers,
    merge_lora,
    save_lora,
    set_adapters,
    unmerge_lora,
)
from omnidit.model.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from omnidit.tokens import image_position_ids  # noqa: E402


def tiny_model(seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    cfg = MMDiTConfig(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth=1, depth_single=1,
                      axes_dim=(4, 6, 6), context_dim=8, pooled_dim=0)
    model = MMDiT(cfg).eval()
    with torch.no_grad():  # out of adaLN-Zero's identity start, so every block matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, generator=g)
    ids = image_position_ids(4, 4, 3)
    cond = Condition(txt=torch.randn(2, 5, 8, generator=g))
    return x, ids, torch.tensor([0.7, 0.3]), cond


def out(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def train_like(model, name: str, seed: int) -> None:
    """Give adapter ``name`` non-zero weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g) * 0.1)


def test_a_new_adapter_changes_nothing_and_targets_the_fused_qkv(inputs):
    model = tiny_model()
    base = out(model, inputs)
    wrapped = add_lora(model, rank=4)
    assert "double_blocks.0.streams.img.qkv" in wrapped and "single_blocks.0.linear1" in wrapped
    assert "double_blocks.0.streams.img.mod.lin" not in wrapped  # modulation is not a default target
    assert torch.equal(out(model, inputs), base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_save_and_load_round_trip_in_each_layout(inputs, tmp_path, layout):
    model = tiny_model()
    add_lora(model, rank=4, alpha=8)
    train_like(model, "default", 0)
    want = out(model, inputs)
    path = save_lora(model, tmp_path / f"a_{layout}.safetensors", layout=layout)
    fresh = tiny_model()
    assert not torch.allclose(out(fresh, inputs), want, atol=1e-4)
    name = load_lora(fresh, path)
    assert name == f"a_{layout}"
    assert torch.allclose(out(fresh, inputs), want, atol=1e-6)
    assert "rank 4" in describe(fresh)


def test_a_file_with_mixed_ranks_and_alphas_loads_exactly(inputs, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    add_lora(model, rank=4, alpha=4)
    train_like(model, "default", 3)
    tensors = load_file(save_lora(model, tmp_path / "k.safetensors", layout="kohya"))
    # rewrite one module at rank 2 (its last two ranks zeroed in the model too) with its own alpha 1
    key = "lora_unet_single_blocks_0_linear2"
    down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
    model_layer = lora_layers(model)["single_blocks.0.linear2"]
    with torch.no_grad():
        model_layer.lora_B["default"].weight[:, 2:] = 0
    want = out(model, inputs)
    tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down[:2], up[:, :2] * 2
    tensors[f"{key}.alpha"] = torch.tensor(1.0)  # alpha / r = 0.5 on this module: (2 B) * 0.5 = B
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    fresh = tiny_model()
    load_lora(fresh, tmp_path / "mixed.safetensors")
    assert torch.allclose(out(fresh, inputs), want, atol=1e-6)


def test_several_adapters_combine_by_weight_and_merge_unmerge(inputs, tmp_path):
    model = tiny_model()
    base = out(model, inputs)
    add_lora(model, rank=2, name="a")
    train_like(model, "a", 1)
    add_lora(model, rank=3, name="b", targets=r".*qkv")
    train_like(model, "b", 2)
    set_adapters(model, {"a": 1.0})
    only_a = out(model, inputs)
    set_adapters(model, {"b": 1.0})
    only_b = out(model, inputs)
    set_adapters(model, {"a": 0.0, "b": 0.0})
    assert torch.allclose(out(model, inputs), base, atol=1e-6)
    set_adapters(model, {"a": 0.5, "b": 1.0})
    both = out(model, inputs)
    assert not torch.allclose(both, only_a, atol=1e-4) and not torch.allclose(both, only_b, atol=1e-4)
    merge_lora(model)
    assert torch.allclose(out(model, inputs), both, atol=1e-5)
    unmerge_lora(model)
    assert torch.allclose(out(model, inputs), both, atol=1e-5)
    set_adapters(model, {})
    assert torch.allclose(out(model, inputs), base, atol=1e-5)


def test_files_that_do_not_fit_are_errors(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    add_lora(model, rank=2)
    path = save_lora(model, tmp_path / "x.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(path)
    tensors["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(2, 32)  # a diffusers Flux name
    save_file(tensors, str(tmp_path / "partly.safetensors"))
    with pytest.raises(OmniditError, match=r"of \d+ keys of the LoRA file match this model; the first that does "
                                           r"not: transformer_blocks.0.attn.to_q"):
        load_lora(tiny_model(), tmp_path / "partly.safetensors")
    save_file({"foo.lora_A.weight": torch.zeros(2, 3)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(OmniditError, match="0 of 1 keys"):
        load_lora(tiny_model(), tmp_path / "none.safetensors")
    wide = tiny_model()
    with pytest.raises(OmniditError, match="not found"):
        load_lora(wide, tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(OmniditError, match="not a safetensors file"):
        load_lora(wide, tmp_path / "bad.safetensors")
    with pytest.raises(OmniditError, match="matches no linear layer"):
        add_lora(tiny_model(), rank=2, targets="nothing_here")
    with pytest.raises(OmniditError, match="rank"):
        add_lora(tiny_model(), rank=0)
    with pytest.raises(OmniditError, match="no LoRA adapter named 'zzz'"):
        set_adapters(model, {"zzz": 1.0})


def test_generate_applies_lora_files_by_weight(tiny_run, tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from test_cli import assert_one_line_error, run_main

    from omnidit.checkpoint import load_model

    model, _ = load_model(tiny_run)
    add_lora(model, rank=2)
    train_like(model, "default", 5)
    path = save_lora(model, tmp_path / "style.safetensors", layout="kohya")
    images = {}
    for name, extra in (("plain", []), ("off", ["--lora", f"{path}:0"]), ("on", ["--lora", str(path)])):
        code, out, err = run_main(capsys, "generate", "a red circle", "--model", tiny_run, "-o",
                                  tmp_path / f"{name}.png", "--no-progress", *extra)
        assert code == 0, err
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(images["plain"], images["off"]) and not np.array_equal(images["plain"], images["on"])
    from safetensors.torch import save_file

    save_file({"foo.lora_A.weight": torch.zeros(2, 3)}, str(tmp_path / "other.safetensors"))
    code, out, err = run_main(capsys, "generate", "a red circle", "--model", tiny_run, "-o", tmp_path / "x.png",
                              "--lora", tmp_path / "other.safetensors")
    assert_one_line_error(code, err, "0 of 1 keys")
    assert not (tmp_path / "x.png").exists()
