"""omnidit.convert.flux: diffusers / original Flux weights run in MMDiT with numerical parity; exact round trips."""

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
from omnidit.convert import (
    flux_config_to_omnidit,
    flux_original_config,
    flux_original_to_omnidit,
    flux_to_omnidit,
    load_flux_transformer,
    omnidit_config_to_flux,
    omnidit_to_flux,
    omnidit_to_flux_original,
)
from omnidit.errors import OmniditError
from omnidit.model.mmdit import MMDiT, MMDiTConfig
from omnidit.tokens import image_position_ids, patchify

diffusers = pytest.importorskip("diffusers")
FluxTransformer2DModel = diffusers.FluxTransformer2DModel

LATENT_CHANNELS = 4  # packed 2x2 -> 16 features per token, as real Flux packs 16 channels into 64
TINY = dict(patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
# FLUX.1-dev's transformer/config.json (schnell: guidance_embeds false).
FLUX_DEV_CONFIG = {
    "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0", "attention_head_dim": 128,
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_flux(guidance: bool, seed: int = 0) -> FluxTransformer2DModel:
    """A tiny diffusers Flux with every parameter perturbed (its zero inits would make parity vacuous)."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def loaded_omnidit(flux: FluxTransformer2DModel) -> MMDiT:
    config = flux_config_to_omnidit(dict(flux.config))
    model = MMDiT(config).eval()
    model.load_state_dict(flux_to_omnidit(flux.state_dict(), config), strict=True)
    return model


def flux_inputs(guidance: bool, height: int, width: int, batch: int = 2, length: int = 7, seed: int = 0) -> dict:
    """Inputs as the diffusers Flux pipeline builds them: packed latents, (0, row, col) ids, zero text ids."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, LATENT_CHANNELS, height, width, generator=g)
    return {
        "hidden_states": patchify(latents, 2),  # == FluxPipeline._pack_latents
        "img_ids": image_position_ids(height // 2, width // 2, 3)[0],  # == FluxPipeline._prepare_latent_image_ids
        "txt_ids": torch.zeros(length, 3),
        "encoder_hidden_states": torch.randn(batch, length, TINY["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
        "timestep": torch.rand(batch, generator=g),
        "guidance": torch.tensor([3.5, 1.5])[:batch] if guidance else None,
    }


@torch.no_grad()
def run_flux(flux: FluxTransformer2DModel, inputs: dict, **kwargs) -> torch.Tensor:
    return flux(**inputs, **kwargs).sample


@torch.no_grad()
def run_omnidit(model: MMDiT, inputs: dict, txt_mask: torch.Tensor | None = None) -> torch.Tensor:
    cond = Condition(txt=inputs["encoder_hidden_states"], txt_mask=txt_mask, pooled=inputs["pooled_projections"],
                     guidance=inputs["guidance"])
    return model(inputs["hidden_states"], inputs["img_ids"][None], inputs["timestep"], cond)


def test_module_imports_without_diffusers():
    code = "import sys; sys.modules['diffusers'] = None; import omnidit.convert"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- configs ------------------------------------------------------------------------------------


def test_flux_dev_and_schnell_configs():
    dev = flux_config_to_omnidit(FLUX_DEV_CONFIG)
    assert (dev.in_channels, dev.patch_size, dev.token_dim) == (16, 2, 64)
    assert (dev.hidden_size, dev.num_heads, dev.head_dim, dev.depth, dev.depth_single) == (3072, 24, 128, 19, 38)
    assert (dev.context_dim, dev.pooled_dim, dev.axes_dim, dev.guidance_embed) == (4096, 768, (16, 56, 56), True)
    assert dev.qk_norm and dev.qkv_bias and dev.mlp_ratio == 4.0 and dev.rope_theta == 10000.0
    assert not flux_config_to_omnidit({**FLUX_DEV_CONFIG, "guidance_embeds": False}).guidance_embed
    back = omnidit_config_to_flux(dev)
    assert {k: back[k] for k in FLUX_DEV_CONFIG if not k.startswith("_")} == {
        k: v for k, v in FLUX_DEV_CONFIG.items() if not k.startswith("_")}


def test_full_size_flux_keys_and_shapes_match_diffusers():
    """FLUX.1-dev at full size, on the meta device: our map yields exactly diffusers' keys and shapes."""
    config = flux_config_to_omnidit(FLUX_DEV_CONFIG)
    with torch.device("meta"):
        ours = omnidit_to_flux(MMDiT(config).state_dict(), config)
        theirs = FluxTransformer2DModel(**{k: v for k, v in FLUX_DEV_CONFIG.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("change, message", [
    ({"out_channels": 16}, "out_channels"),
    ({"_class_name": "SD3Transformer2DModel"}, "FluxTransformer2DModel"),
    ({"patch_size": 2}, "patch_size"),
])
def test_config_errors(change, message):
    with pytest.raises(OmniditError, match=message):
        flux_config_to_omnidit({**FLUX_DEV_CONFIG, **change})


def test_non_flux_omnidit_config_is_rejected():
    with pytest.raises(OmniditError, match="single-stream"):
        omnidit_to_flux({}, MMDiTConfig(depth_single=0, axes_dim=(8, 12, 12)))


# ---- numerical parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("height, width", [(8, 8), (16, 12)])
def test_parity_with_diffusers(guidance, height, width):
    flux = tiny_flux(guidance)
    inputs = flux_inputs(guidance, height, width)
    assert_close(run_omnidit(loaded_omnidit(flux), inputs), run_flux(flux, inputs))


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_parity_with_padded_text(guidance):
    """omnidit with a padding mask == diffusers on each prompt's unpadded text (what masking means),
    and == diffusers given the same key mask through joint_attention_kwargs."""
    flux = tiny_flux(guidance)
    model = loaded_omnidit(flux)
    inputs = flux_inputs(guidance, 8, 12, length=7)
    lengths = [7, 4]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    ours = run_omnidit(model, inputs, txt_mask=mask)
    for i, n in enumerate(lengths):
        row = {k: v[i:i + 1] if v is not None and k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()}
        row.update(encoder_hidden_states=row["encoder_hidden_states"][:, :n], txt_ids=inputs["txt_ids"][:n])
        assert_close(ours[i:i + 1], run_flux(flux, row))
    # diffusers orders the joint sequence [txt, img]
    joint_mask = torch.cat([mask, torch.ones(2, inputs["hidden_states"].shape[1], dtype=torch.bool)], 1)
    theirs = run_flux(flux, inputs, joint_attention_kwargs={"attention_mask": joint_mask[:, None, None, :]})
    assert_close(ours, theirs)


def test_omnidit_weights_run_in_diffusers():
    """The way back: a random MMDiT exported with omnidit_to_flux loads strictly into diffusers and agrees."""
    config = flux_config_to_omnidit({**TINY, "guidance_embeds": True})
    torch.manual_seed(3)
    model = MMDiT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    flux = FluxTransformer2DModel(**omnidit_config_to_flux(config)).eval()
    flux.load_state_dict(omnidit_to_flux(model.state_dict(), config), strict=True)
    inputs = flux_inputs(True, 8, 8)
    assert_close(run_omnidit(model, inputs), run_flux(flux, inputs))


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_round_trips_are_bit_exact(guidance):
    flux = tiny_flux(guidance)
    config = flux_config_to_omnidit(dict(flux.config))
    sd = flux.state_dict()
    omni = flux_to_omnidit(sd, config)
    assert_same_state(omnidit_to_flux(omni, config), sd)
    assert_same_state(flux_to_omnidit(omnidit_to_flux(omni, config), config), omni)
    original = omnidit_to_flux_original(omni, config)
    assert_same_state(flux_original_to_omnidit(original, config), omni)
    assert_same_state(omnidit_to_flux_original(flux_original_to_omnidit(original, config), config), original)
    # bf16 stays bf16
    half = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    assert_same_state(omnidit_to_flux(flux_to_omnidit(half, config), config), half)


# ---- the original single-file layout ------------------------------------------------------------


def test_original_layout_agrees_with_diffusers_converter():
    """Our original-layout keys go through diffusers' own converter to the diffusers weights, value for value.

    The converter hard-codes FLUX.1's width (3072) to split single blocks' linear1, so those two tensors
    are replaced by zeros of that height and the q/k/v/mlp tensors they split into are not compared.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    flux = tiny_flux(True)
    config = flux_config_to_omnidit(dict(flux.config))
    sd = flux.state_dict()
    original = omnidit_to_flux_original(flux_to_omnidit(sd, config), config)
    expected_block = {
        "img_mod.lin.weight", "img_attn.qkv.weight", "img_attn.norm.query_norm.scale",
        "img_attn.norm.key_norm.scale", "img_attn.proj.weight", "img_mlp.0.weight", "img_mlp.2.weight",
    }
    assert expected_block <= {k.removeprefix("double_blocks.0.") for k in original}
    assert {"single_blocks.1.linear1.weight", "single_blocks.1.modulation.lin.bias",
            "final_layer.adaLN_modulation.1.weight", "guidance_in.out_layer.bias"} <= original.keys()

    patched = {f"model.diffusion_model.{k}": v for k, v in original.items()}  # the ComfyUI prefix is handled too
    width = 3072 * 3 + 4 * 3072
    for i in range(config.depth_single):
        patched[f"model.diffusion_model.single_blocks.{i}.linear1.weight"] = torch.zeros(width, config.hidden_size)
        patched[f"model.diffusion_model.single_blocks.{i}.linear1.bias"] = torch.zeros(width)
    converted = convert_flux_transformer_checkpoint_to_diffusers(patched)
    assert converted.keys() == sd.keys()
    split = ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")
    for k, v in converted.items():
        if not (k.startswith("single_transformer_blocks.") and any(s in k for s in split)):
            assert torch.equal(v, sd[k]), k


def test_original_config_inferred_from_shapes():
    flux = tiny_flux(False)
    config = flux_config_to_omnidit(dict(flux.config))
    original = omnidit_to_flux_original(flux_to_omnidit(flux.state_dict(), config), config)
    assert flux_original_config(original, axes_dim=(4, 6, 6)) == config


# ---- loading folders and files ------------------------------------------------------------------


def test_load_saved_folder_sharded_and_pipeline(tmp_path):
    flux = tiny_flux(True)
    inputs = flux_inputs(True, 8, 12)
    reference = run_flux(flux, inputs)
    flux.save_pretrained(tmp_path / "single")
    flux.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="50KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for folder in (tmp_path / "single", tmp_path / "pipe"):
        model, config = load_flux_transformer(folder)
        assert config == flux_config_to_omnidit(dict(flux.config))
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert_close(run_omnidit(model, inputs), reference)
    model, _ = load_flux_transformer(tmp_path / "single", dtype=torch.bfloat16)
    assert model.img_in.weight.dtype == torch.bfloat16


def test_load_original_single_file(tmp_path):
    # FLUX.1 splits its 128-dim heads (16, 56, 56), the default for single files; give this tiny model that split.
    tiny = {**TINY, "attention_head_dim": 128, "num_attention_heads": 1, "axes_dims_rope": (16, 56, 56)}
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(**tiny, guidance_embeds=True).eval()
    with torch.no_grad():
        for p in flux.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = flux_config_to_omnidit(dict(flux.config))
    original = omnidit_to_flux_original(flux_to_omnidit(flux.state_dict(), config), config)
    save_file(original, str(tmp_path / "flux1-tiny.safetensors"))
    model, loaded_config = load_flux_transformer(tmp_path / "flux1-tiny.safetensors")
    assert loaded_config == config
    inputs = flux_inputs(True, 8, 8)
    assert_close(run_omnidit(model, inputs), run_flux(flux, inputs))


@pytest.fixture
def saved_flux(tmp_path) -> Path:
    tiny_flux(False).save_pretrained(tmp_path / "flux")
    return tmp_path / "flux"


def test_load_errors_name_file_and_key(saved_flux, tmp_path):
    key = "transformer_blocks.1.attn.add_k_proj.weight"
    with pytest.raises(OmniditError, match="not found"):
        load_flux_transformer(tmp_path / "nowhere")

    file = rewrite_weights(saved_flux / WEIGHTS, lambda s: s.pop(key))
    with pytest.raises(OmniditError, match=rf"missing key '{key}'") as err:
        load_flux_transformer(saved_flux)
    assert str(saved_flux) in str(err.value)

    rewrite_weights(saved_flux / WEIGHTS, lambda s: s.update({key: torch.zeros(32, 31)}))
    with pytest.raises(OmniditError, match=rf"key '{key}' has shape \(32, 31\)") as err:
        load_flux_transformer(saved_flux)
    assert str(file) in str(err.value)

    extra = {key: torch.zeros(32, 32), "extra.weight": torch.zeros(1)}
    rewrite_weights(saved_flux / WEIGHTS, lambda s: s.update(extra))
    with pytest.raises(OmniditError, match="unexpected key 'extra.weight'"):
        load_flux_transformer(saved_flux)


def test_load_rejects_other_models(saved_flux):
    config_file = saved_flux / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(OmniditError, match="not a FluxTransformer2DModel config"):
        load_flux_transformer(saved_flux)
    config_file.unlink()
    with pytest.raises(OmniditError, match="config file not found"):
        load_flux_transformer(saved_flux)
