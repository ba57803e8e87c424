"""omnidit.convert.sd3: diffusers / original SD3 and SD3.5 weights run in MMDiT with parity; exact round trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, assert_same_state, rewrite_weights
from safetensors.torch import save_file

from omnidit.condition import Condition
from omnidit.convert.sd3 import (
    load_sd3_transformer,
    omnidit_config_to_sd3,
    omnidit_to_sd3,
    omnidit_to_sd3_original,
    sd3_config_to_omnidit,
    sd3_original_config,
    sd3_original_to_omnidit,
    sd3_to_omnidit,
)
from omnidit.errors import OmniditError
from omnidit.model.mmdit import MMDiT, MMDiTConfig
from omnidit.tokens import image_position_ids, patchify, unpatchify

diffusers = pytest.importorskip("diffusers")
SD3Transformer2DModel = diffusers.SD3Transformer2DModel

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
            pos_embed_max_size=16)
VARIANTS = {"sd3": {}, "sd35": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}}
# The transformer/config.json of the released models.
SD3_MEDIUM = {
    "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.29.0.dev0", "attention_head_dim": 64,
    "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    "sample_size": 128,
}
SD35_LARGE = {**SD3_MEDIUM, "caption_projection_dim": 2432, "num_attention_heads": 38, "num_layers": 38,
              "qk_norm": "rms_norm", "dual_attention_layers": []}
SD35_MEDIUM = {**SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
               "dual_attention_layers": list(range(13))}
RELEASED = {"sd3-medium": SD3_MEDIUM, "sd3.5-large": SD35_LARGE, "sd3.5-medium": SD35_MEDIUM}


def tiny_sd3(variant: str, seed: int = 0) -> SD3Transformer2DModel:
    """A tiny diffusers SD3 with every parameter perturbed and a random position table (parity is not vacuous)."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**TINY, **VARIANTS[variant]).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        model.pos_embed.pos_embed.copy_(torch.randn(model.pos_embed.pos_embed.shape, generator=g))
    return model


def loaded_omnidit(sd3: SD3Transformer2DModel) -> MMDiT:
    config = sd3_config_to_omnidit(dict(sd3.config))
    model = MMDiT(config).eval()
    model.load_state_dict(sd3_to_omnidit(sd3.state_dict(), config), strict=True)
    return model


def sd3_inputs(height: int, width: int, batch: int = 2, length: int = 7, seed: int = 0) -> dict:
    """Latents (B, C, H, W), text states, pooled vectors and t in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, TINY["in_channels"], height, width, generator=g),
        "txt": torch.randn(batch, length, TINY["joint_attention_dim"], generator=g),
        "pooled": torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
        "t": torch.rand(batch, generator=g),
    }


@torch.no_grad()
def run_sd3(sd3: SD3Transformer2DModel, inputs: dict) -> torch.Tensor:
    # SD3's pipeline passes timestep = 1000 t; omnidit scales t itself.
    return sd3(inputs["latents"], inputs["txt"], inputs["pooled"], inputs["t"] * 1000).sample


@torch.no_grad()
def run_omnidit(model: MMDiT, inputs: dict, txt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same call in omnidit: patchify, (0, row, col) ids, unpatchify. Returns (B, C, H, W)."""
    latents, p = inputs["latents"], model.config.patch_size
    h, w = latents.shape[-2:]
    cond = Condition(txt=inputs["txt"], txt_mask=txt_mask, pooled=inputs["pooled"])
    tokens = model(patchify(latents, p), image_position_ids(h // p, w // p), inputs["t"], cond)
    return unpatchify(tokens, h, w, p)


def test_module_imports_without_diffusers():
    code = "import sys; sys.modules['diffusers'] = None; import omnidit.convert.sd3"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- configs ------------------------------------------------------------------------------------


def test_released_configs():
    sd3 = sd3_config_to_omnidit(SD3_MEDIUM)
    assert (sd3.in_channels, sd3.patch_size, sd3.hidden_size, sd3.num_heads, sd3.depth, sd3.depth_single) == (
        16, 2, 1536, 24, 24, 0)
    assert (sd3.context_dim, sd3.pooled_dim, sd3.pos_table_size, sd3.out_channels) == (4096, 2048, 192, 0)
    assert not sd3.rope and not sd3.qk_norm and sd3.qkv_bias and sd3.mlp_ratio == 4.0 and sd3.time_freq_shift == 0
    large, medium = sd3_config_to_omnidit(SD35_LARGE), sd3_config_to_omnidit(SD35_MEDIUM)
    assert large.qk_norm and (large.hidden_size, large.depth, large.dual_attention_layers) == (2432, 38, ())
    assert medium.qk_norm and medium.pos_table_size == 384 and medium.dual_attention_layers == tuple(range(13))
    for released in RELEASED.values():
        back = omnidit_config_to_sd3(sd3_config_to_omnidit(released))
        expected = {"dual_attention_layers": [], "qk_norm": None, **released}
        assert back == {k: v for k, v in expected.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(RELEASED))
def test_full_size_keys_and_shapes_match_diffusers(name):
    """The released sizes, on the meta device: our map yields exactly diffusers' keys and shapes."""
    config = sd3_config_to_omnidit(RELEASED[name])
    with torch.device("meta"):
        ours = omnidit_to_sd3(MMDiT(config).state_dict(), config)
        theirs = SD3Transformer2DModel(**{k: v for k, v in RELEASED[name].items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "FluxTransformer2DModel"}, "SD3Transformer2DModel"),
    ({"caption_projection_dim": 1152}, "caption_projection_dim"),
    ({"qk_norm": "layer_norm"}, "qk_norm"),
    ({"pos_embed_max_size": None}, "pos_embed_max_size"),
])
def test_config_errors(change, message):
    with pytest.raises(OmniditError, match=message):
        sd3_config_to_omnidit({**SD3_MEDIUM, **change})


@pytest.mark.parametrize("change, message", [
    ({"depth_single": 1}, "single-stream"),
    ({"rope": True, "pos_table_size": 8}, "RoPE"),
    ({"pos_table_size": 0}, "position table"),
])
def test_non_sd3_omnidit_config_is_rejected(change, message):
    config = MMDiTConfig(**{"depth_single": 0, "rope": False, "pos_table_size": 8, **change})
    with pytest.raises(OmniditError, match=message):
        omnidit_to_sd3({}, config)


# ---- numerical parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("height, width", [(16, 16), (12, 8), (10, 6), (32, 32)])
def test_parity_with_diffusers(variant, height, width):
    """Grids 8x8, 6x4, 5x3 (odd margins) are centre-cropped from the 16x16 table; 16x16 uses all of it."""
    sd3 = tiny_sd3(variant)
    inputs = sd3_inputs(height, width)
    assert_close(run_omnidit(loaded_omnidit(sd3), inputs), run_sd3(sd3, inputs))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_padded_text(variant):
    """SD3 attends to padded text unmasked; omnidit with a padding mask == diffusers on the unpadded text."""
    sd3 = tiny_sd3(variant)
    model = loaded_omnidit(sd3)
    inputs = sd3_inputs(12, 8, length=7)
    lengths = [7, 4]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    ours = run_omnidit(model, inputs, txt_mask=mask)
    for i, n in enumerate(lengths):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        row["txt"] = row["txt"][:, :n]
        assert_close(ours[i:i + 1], run_sd3(sd3, row))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_omnidit_weights_run_in_diffusers(variant):
    """The way back: a random MMDiT exported with omnidit_to_sd3 loads strictly into diffusers and agrees."""
    config = sd3_config_to_omnidit({**TINY, **VARIANTS[variant]})
    torch.manual_seed(3)
    model = MMDiT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.pos_table.normal_()
    sd3 = SD3Transformer2DModel(**omnidit_config_to_sd3(config, sample_size=TINY["sample_size"])).eval()
    sd3.load_state_dict(omnidit_to_sd3(model.state_dict(), config), strict=True)
    inputs = sd3_inputs(12, 8)
    assert_close(run_omnidit(model, inputs), run_sd3(sd3, inputs))


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trips_are_bit_exact(variant):
    """Bit-exact both ways, except the last block's text query norm, which omnidit drops and exports as ones."""
    sd3 = tiny_sd3(variant)
    config = sd3_config_to_omnidit(dict(sd3.config))
    sd = sd3.state_dict()
    omni = sd3_to_omnidit(sd, config)
    unused = {"transformer_blocks.2.attn.norm_added_q.weight"} if config.qk_norm else set()
    back = omnidit_to_sd3(omni, config)
    kept = [k for k in sd if k not in unused]
    assert_same_state({k: back[k] for k in kept}, {k: sd[k] for k in kept})
    assert back.keys() == sd.keys()
    for k in unused:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], torch.ones_like(sd[k]))
    assert_same_state(sd3_to_omnidit(omnidit_to_sd3(omni, config), config), omni)
    original = omnidit_to_sd3_original(omni, config)
    assert_same_state(sd3_original_to_omnidit(original, config), omni)
    assert_same_state(omnidit_to_sd3_original(sd3_original_to_omnidit(original, config), config), original)
    # bf16 stays bf16
    half = {k: v.to(torch.bfloat16) for k, v in back.items()}
    assert_same_state(omnidit_to_sd3(sd3_to_omnidit(half, config), config), half)


# ---- the original single-file layout ------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_layout_agrees_with_diffusers_converter(variant):
    """Our original-layout keys go through diffusers' own converter to the diffusers weights, value for value,
    and a diffusers model built from them agrees with ours."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd3 = tiny_sd3(variant)
    config = sd3_config_to_omnidit(dict(sd3.config))
    sd = sd3.state_dict()
    original = omnidit_to_sd3_original(sd3_to_omnidit(sd, config), config)
    expected_block = {"x_block.adaLN_modulation.1.weight", "x_block.attn.qkv.weight", "x_block.attn.proj.bias",
                      "x_block.mlp.fc1.weight", "context_block.attn.qkv.bias", "context_block.mlp.fc2.weight"}
    assert expected_block <= {k.removeprefix("joint_blocks.0.") for k in original}
    assert {"pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.2.bias", "y_embedder.mlp.0.weight",
            "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight"} <= original.keys()

    patched = {f"model.diffusion_model.{k}": v for k, v in original.items()}  # the prefix is handled too
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(patched))
    assert converted.keys() == sd.keys()
    unused = "transformer_blocks.2.attn.norm_added_q.weight"
    for k, v in converted.items():
        assert torch.equal(v, torch.ones_like(v) if k == unused else sd[k]), k
    theirs = SD3Transformer2DModel(**TINY, **VARIANTS[variant]).eval()
    theirs.load_state_dict(converted, strict=True)
    model = MMDiT(config).eval()
    model.load_state_dict(sd3_original_to_omnidit(patched, config), strict=True)
    inputs = sd3_inputs(10, 6)
    assert_close(run_omnidit(model, inputs), run_sd3(theirs, inputs))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_config_inferred_from_shapes(variant):
    sd3 = tiny_sd3(variant)
    config = sd3_config_to_omnidit(dict(sd3.config))
    original = omnidit_to_sd3_original(sd3_to_omnidit(sd3.state_dict(), config), config)
    # SD3 files without QK norm do not record the head size; SD3.5's norms do.
    head_dim = {} if config.qk_norm else {"head_dim": TINY["attention_head_dim"]}
    assert sd3_original_config(original, **head_dim) == config


# ---- loading folders and files ------------------------------------------------------------------


def test_load_saved_folder_sharded_and_pipeline(tmp_path):
    sd3 = tiny_sd3("sd35")
    inputs = sd3_inputs(12, 8)
    reference = run_sd3(sd3, inputs)
    sd3.save_pretrained(tmp_path / "single")
    sd3.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="50KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for folder in (tmp_path / "single", tmp_path / "pipe"):
        model, config = load_sd3_transformer(folder)
        assert config == sd3_config_to_omnidit(dict(sd3.config))
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert_close(run_omnidit(model, inputs), reference)
    model, _ = load_sd3_transformer(tmp_path / "single", dtype=torch.bfloat16)
    assert model.img_in.weight.dtype == torch.bfloat16


def test_load_original_single_file(tmp_path):
    """An SD3.5-style file (head size known from its QK norms) bundled with other models' weights."""
    sd3 = tiny_sd3("sd35")
    config = sd3_config_to_omnidit(dict(sd3.config))
    original = omnidit_to_sd3_original(sd3_to_omnidit(sd3.state_dict(), config), config)
    bundle = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    bundle["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)  # the VAE, ignored
    save_file(bundle, str(tmp_path / "sd3.5_tiny.safetensors"))
    model, loaded_config = load_sd3_transformer(tmp_path / "sd3.5_tiny.safetensors")
    assert loaded_config == config
    inputs = sd3_inputs(16, 16)
    assert_close(run_omnidit(model, inputs), run_sd3(sd3, inputs))


@pytest.fixture
def saved_sd3(tmp_path) -> Path:
    tiny_sd3("sd35").save_pretrained(tmp_path / "sd3")
    return tmp_path / "sd3"


def test_load_errors_name_file_and_key(saved_sd3, tmp_path):
    key = "transformer_blocks.1.attn.add_k_proj.weight"
    with pytest.raises(OmniditError, match="not found"):
        load_sd3_transformer(tmp_path / "nowhere")

    file = rewrite_weights(saved_sd3 / "diffusion_pytorch_model.safetensors", lambda s: s.pop(key))
    with pytest.raises(OmniditError, match=rf"missing key '{key}'") as err:
        load_sd3_transformer(saved_sd3)
    assert str(saved_sd3) in str(err.value)

    rewrite_weights(file, lambda s: s.update({key: torch.zeros(32, 31)}))
    with pytest.raises(OmniditError, match=rf"key '{key}' has shape \(32, 31\)") as err:
        load_sd3_transformer(saved_sd3)
    assert str(file) in str(err.value)

    rewrite_weights(file, lambda s: s.update({key: torch.zeros(32, 32), "extra.weight": torch.zeros(1)}))
    with pytest.raises(OmniditError, match="unexpected key 'extra.weight'"):
        load_sd3_transformer(saved_sd3)


def test_load_original_file_errors(tmp_path):
    sd3 = tiny_sd3("sd35")
    config = sd3_config_to_omnidit(dict(sd3.config))
    original = omnidit_to_sd3_original(sd3_to_omnidit(sd3.state_dict(), config), config)
    file = tmp_path / "sd3.safetensors"
    key = "joint_blocks.1.context_block.attn.proj.weight"
    save_file({k: v for k, v in original.items() if k != key}, str(file))
    with pytest.raises(OmniditError, match=rf"missing key '{key}'") as err:
        load_sd3_transformer(file)
    assert str(file) in str(err.value)
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(3)}, str(file))
    with pytest.raises(OmniditError, match="not an original SD3 checkpoint: no key 'x_embedder.proj.weight'"):
        load_sd3_transformer(file)


def test_load_rejects_other_models(saved_sd3):
    config_file = saved_sd3 / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(OmniditError, match="not an SD3Transformer2DModel config"):
        load_sd3_transformer(saved_sd3)
    config_file.unlink()
    with pytest.raises(OmniditError, match="config file not found"):
        load_sd3_transformer(saved_sd3)
