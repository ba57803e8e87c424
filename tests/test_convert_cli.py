"""``omnidit convert``: omnidit checkpoints <-> diffusers transformer folders, bit-exact both ways, with parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_close, assert_same_state
from safetensors.torch import load_file

from omnidit.checkpoint import load_model, read_config, read_safetensors, save_checkpoint
from omnidit.cli import main
from omnidit.condition import Condition
from omnidit.config import Config
from omnidit.convert.dit import DIT_TIME_SCALE
from omnidit.model.mmdit import MMDiT, MMDiTConfig
from omnidit.tokens import image_position_ids, patchify, unpatchify

diffusers = pytest.importorskip("diffusers")

FLUX = MMDiTConfig(in_channels=4, hidden_size=32, num_heads=2, axes_dim=(4, 6, 6), depth=1, depth_single=1,
                   context_dim=24, pooled_dim=12)
SD3 = MMDiTConfig(in_channels=4, hidden_size=32, num_heads=2, depth=2, depth_single=0, context_dim=24,
                  pooled_dim=12, qk_norm=False, rope=False, pos_table_size=8)
DIT = MMDiTConfig(in_channels=4, hidden_size=32, num_heads=2, depth=2, depth_single=0, context_dim=0, pooled_dim=0,
                  num_classes=10, qk_norm=False, rope=False, pos_table_size=8, out_channels=8, time_freq_shift=1.0,
                  mlp_norm_eps=1e-5)
CONFIGS = {"flux": (FLUX, "FluxTransformer2DModel"), "sd3": (SD3, "SD3Transformer2DModel"),
           "dit": (DIT, "DiTTransformer2DModel")}


def random_state(config: MMDiTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for every parameter (the zero inits would make parity vacuous); buffers kept."""
    torch.manual_seed(seed)
    model = MMDiT(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.state_dict()


def make_checkpoint(tmp_path: Path, config: MMDiTConfig) -> Path:
    return save_checkpoint(tmp_path / "omni", Config(model=config), random_state(config, 0), random_state(config, 1))


def run(*argv: str) -> int:
    return main(["convert", *argv])


@torch.no_grad()
def parity(family: str, model: MMDiT, folder: Path) -> None:
    """The exported folder loads with diffusers' from_pretrained and computes what the omnidit model computes."""
    c, g = model.config, torch.Generator().manual_seed(0)
    size = c.pos_table_size * c.patch_size if family == "dit" else 8  # DiT matches on its native grid only
    latents = torch.randn(2, c.in_channels, size, size, generator=g)
    t = torch.tensor([0.25, 0.9])
    txt = torch.randn(2, 5, c.context_dim, generator=g) if c.context_dim else None
    pooled = torch.randn(2, c.pooled_dim, generator=g) if c.pooled_dim else None
    if family == "flux":
        theirs = diffusers.FluxTransformer2DModel.from_pretrained(folder).eval()
        tokens, ids = patchify(latents, 2), image_position_ids(4, 4, 3)
        ref = theirs(hidden_states=tokens, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                     img_ids=ids[0], txt_ids=torch.zeros(5, 3)).sample
        assert_close(model(tokens, ids, t, Condition(txt=txt, pooled=pooled)), ref)
        return
    p = c.patch_size
    if family == "sd3":
        theirs = diffusers.SD3Transformer2DModel.from_pretrained(folder).eval()
        ref = theirs(latents, txt, pooled, t * 1000).sample
        cond = Condition(txt=txt, pooled=pooled)
    else:
        theirs = diffusers.DiTTransformer2DModel.from_pretrained(folder).eval()
        steps, labels = torch.tensor([999, 37]), torch.tensor([3, c.num_classes])
        ref = theirs(latents, timestep=steps, class_labels=labels).sample
        t, cond = steps.double() / DIT_TIME_SCALE, Condition(labels=labels)
    ids = image_position_ids(size // p, size // p, 3)
    ours = unpatchify(model(patchify(latents, p), ids, t, cond), size, size, p)
    assert_close(ours, ref)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_omnidit_to_diffusers_and_back(tmp_path, family):
    config, class_name = CONFIGS[family]
    src = make_checkpoint(tmp_path, config)
    ema, raw = read_safetensors(src / "ema.safetensors"), read_safetensors(src / "model.safetensors")

    assert run(str(src), str(tmp_path / "hf")) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["_class_name"] == class_name
    parity(family, load_model(src)[0], tmp_path / "hf")  # EMA weights by default

    assert run(str(tmp_path / "hf"), str(tmp_path / "back")) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_state(read_safetensors(tmp_path / "back" / name), ema)
    assert main(["info", str(tmp_path / "back")]) == 0

    assert run(str(src), str(tmp_path / "hf_raw"), "--no-ema", "--family", family) == 0
    assert run(str(tmp_path / "hf_raw"), str(tmp_path / "back_raw"), "--to", "omnidit") == 0
    assert_same_state(read_safetensors(tmp_path / "back_raw" / "model.safetensors"), raw)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_diffusers_to_omnidit_and_back(tmp_path, family):
    config, _ = CONFIGS[family]
    assert run(str(make_checkpoint(tmp_path, config)), str(tmp_path / "hf")) == 0
    hf = load_file(tmp_path / "hf" / "diffusion_pytorch_model.safetensors")
    assert run(str(tmp_path / "hf"), str(tmp_path / "omni2")) == 0
    model, loaded = load_model(tmp_path / "omni2")
    assert loaded.model == read_config(tmp_path / "omni2").model
    assert run(str(tmp_path / "omni2"), str(tmp_path / "hf2"), "--family", family) == 0
    assert_same_state(load_file(tmp_path / "hf2" / "diffusion_pytorch_model.safetensors"), hf)
    parity(family, model, tmp_path / "hf2")


def one_error_line(capsys, code: int, *fragments: str) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnidit: error:") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_errors(tmp_path, capsys):
    one_error_line(capsys, run(str(tmp_path / "nope"), str(tmp_path / "out")), "not found")

    src = make_checkpoint(tmp_path, FLUX)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    one_error_line(capsys, run(str(src), str(tmp_path / "full")), "not empty", "choose a new folder")
    one_error_line(capsys, run(str(src), str(tmp_path / "out"), "--to", "omnidit"), "already")
    one_error_line(capsys, run(str(src), str(tmp_path / "out"), "--family", "sd3"), "SD3")

    odd = save_checkpoint(tmp_path / "odd", Config(model=MMDiTConfig(hidden_size=32, num_heads=2, axes_dim=(4, 6, 6),
                                                                     depth=1, depth_single=1, num_classes=10)),
                          random_state(MMDiTConfig(hidden_size=32, num_heads=2, axes_dim=(4, 6, 6), depth=1,
                                                   depth_single=1, num_classes=10), 0))
    one_error_line(capsys, run(str(odd), str(tmp_path / "out")), "no diffusers transformer", "flux:", "sd3:", "dit:")

    shifted = MMDiTConfig(**{**FLUX.to_dict(), "time_freq_shift": 1.0})
    ckpt = save_checkpoint(tmp_path / "shifted", Config(model=shifted), random_state(shifted, 0))
    one_error_line(capsys, run(str(ckpt), str(tmp_path / "out"), "--family", "flux"), "time_freq_shift")

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    one_error_line(capsys, run(str(tmp_path / "unet"), str(tmp_path / "out")), "UNet2DConditionModel")
    assert not (tmp_path / "out").exists()
