"""omnidit.convert.dit: diffusers DiT weights run in MMDiT with numerical parity; exact round trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, assert_same_state, rewrite_weights

from omnidit.condition import Condition
from omnidit.convert.dit import (
    DIT_TIME_SCALE,
    dit_config_to_omnidit,
    dit_to_omnidit,
    load_dit_transformer,
    omnidit_config_to_dit,
    omnidit_to_dit,
)
from omnidit.errors import OmniditError
from omnidit.model.mmdit import MMDiT, MMDiTConfig
from omnidit.tokens import image_position_ids, patchify, unpatchify

diffusers = pytest.importorskip("diffusers")
DiTTransformer2DModel = diffusers.DiTTransformer2DModel

# norm_num_groups is a constructor argument that DiTTransformer2DModel never uses. norm_eps 1e-6 is omnidit's
# (and the original DiT's) LayerNorm eps; diffusers' default 1e-5 is tested on its own.
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
NUM_CLASSES = TINY["num_embeds_ada_norm"]
# facebook/DiT-XL-2-256's transformer/config.json (written before DiTTransformer2DModel existed).
DIT_XL_CONFIG = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0,
    "in_channels": 4, "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero",
    "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
    "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 32, "upcast_attention": False,
    "use_linear_projection": False,
}
EMBEDDER = "norm1.emb"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_dit(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    """A tiny diffusers DiT with every parameter perturbed (its zero inits would make parity vacuous).

    The per-block embedder copies stay identical, as in real DiT checkpoints.
    """
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**TINY, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return model


def loaded_omnidit(dit: DiTTransformer2DModel) -> MMDiT:
    config = dit_config_to_omnidit(dict(dit.config))
    model = MMDiT(config).eval()
    model.load_state_dict(dit_to_omnidit(dit.state_dict(), config), strict=True)
    return model


def dit_inputs(batch: int = 4, size: int = 8, seed: int = 0) -> dict:
    """Latents, integer steps 0..999 (as DiTPipeline passes them) and labels including the null class."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, TINY["in_channels"], size, size, generator=g),
        "timestep": torch.tensor([999, 500, 37, 0, 250, 1])[:batch],
        "class_labels": torch.tensor([3, NUM_CLASSES, 0, 9, NUM_CLASSES, 5])[:batch],
    }


@torch.no_grad()
def run_dit(dit: DiTTransformer2DModel, inputs: dict) -> torch.Tensor:
    return dit(**inputs).sample


@torch.no_grad()
def run_omnidit(model: MMDiT, inputs: dict) -> torch.Tensor:
    latents, p = inputs["hidden_states"], model.config.patch_size
    h, w = latents.shape[-2:]
    t = inputs["timestep"].double() / DIT_TIME_SCALE  # float64: step / 1000 * 1000 is then exact
    cond = Condition(labels=inputs["class_labels"])
    out = model(patchify(latents, p), image_position_ids(h // p, w // p, 3), t, cond)
    return unpatchify(out, h, w, p)  # (B, out_channels, H, W)


def test_module_imports_without_diffusers():
    code = "import sys; sys.modules['diffusers'] = None; import omnidit.convert.dit"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- configs ------------------------------------------------------------------------------------


def test_dit_xl_config():
    xl = dit_config_to_omnidit(DIT_XL_CONFIG)
    assert (xl.in_channels, xl.patch_size, xl.out_channels, xl.out_token_dim) == (4, 2, 8, 32)
    assert (xl.hidden_size, xl.num_heads, xl.head_dim, xl.depth, xl.depth_single) == (1152, 16, 72, 28, 0)
    assert (xl.context_dim, xl.pooled_dim, xl.num_classes, xl.pos_table_size) == (0, 0, 1000, 16)
    assert not xl.rope and not xl.qk_norm and xl.qkv_bias and xl.time_freq_shift == 1.0 and len(xl.axes_dim) == 3
    back = omnidit_config_to_dit(xl)
    assert {k: DIT_XL_CONFIG[k] for k in back if k in DIT_XL_CONFIG} == {k: back[k] for k in back if k in DIT_XL_CONFIG}
    assert dit_config_to_omnidit(back) == xl


def test_full_size_dit_keys_and_shapes_match_diffusers():
    """DiT-XL/2 at full size, on the meta device: our map yields exactly diffusers' keys and shapes."""
    config = dit_config_to_omnidit(DIT_XL_CONFIG)
    with torch.device("meta"):
        ours = omnidit_to_dit(MMDiT(config).state_dict(), config)
        theirs = DiTTransformer2DModel(**omnidit_config_to_dit(config))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "FluxTransformer2DModel"}, "DiTTransformer2DModel"),
    ({"norm_type": "ada_norm_single"}, "DiTTransformer2DModel"),  # PixArt's layout
    ({"activation_fn": "geglu"}, "activation_fn"),
    ({"norm_elementwise_affine": True}, "norm_elementwise_affine"),
    ({"sample_size": 33}, "sample_size"),
])
def test_config_errors(change, message):
    with pytest.raises(OmniditError, match=message):
        dit_config_to_omnidit({**DIT_XL_CONFIG, **change})


@pytest.mark.parametrize("change, message", [
    ({}, "no text stream"),
    ({"context_dim": 0, "pooled_dim": 0, "depth_single": 0}, "class labels"),
    ({"context_dim": 0, "pooled_dim": 0, "depth_single": 0, "num_classes": 10}, "no RoPE"),
])
def test_non_dit_omnidit_config_is_rejected(change, message):
    with pytest.raises(OmniditError, match=message):
        omnidit_to_dit({}, MMDiTConfig(**change))


# ---- numerical parity ---------------------------------------------------------------------------


# What remains is the timestep embedding's float32 rounding: omnidit's t = step / 1000 times 1000 is not
# exactly `step` for 10 of the 1000 steps, and its frequencies are rounded in another order than diffusers'.
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_diffusers(seed):
    dit = tiny_dit(seed)
    inputs = dit_inputs(seed=seed)
    assert_close(run_omnidit(loaded_omnidit(dit), inputs), run_dit(dit, inputs))


def test_parity_with_diffusers_default_norm_eps():
    """diffusers' default norm_eps 1e-5 (the hub checkpoints') applies to the feed-forward's LayerNorm: it
    becomes omnidit's mlp_norm_eps."""
    dit = tiny_dit(1, norm_eps=1e-5)
    inputs = dit_inputs(seed=1)
    assert loaded_omnidit(dit).config.mlp_norm_eps == 1e-5
    assert_close(run_omnidit(loaded_omnidit(dit), inputs), run_dit(dit, inputs))


def test_null_class_is_the_last_embedding():
    """Label num_classes is the null class in both, and it is not a no-op."""
    dit = tiny_dit()
    model = loaded_omnidit(dit)
    assert model.null_label == NUM_CLASSES
    null = {**dit_inputs(), "class_labels": torch.full((4,), NUM_CLASSES)}
    reference = run_dit(dit, null)
    assert_close(run_omnidit(model, null), reference)
    assert not torch.allclose(reference, run_dit(dit, dit_inputs()))


def test_omnidit_weights_run_in_diffusers():
    """The way back: a random MMDiT exported with omnidit_to_dit loads strictly into diffusers and agrees."""
    config = dit_config_to_omnidit(TINY)
    torch.manual_seed(3)
    model = MMDiT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    dit = DiTTransformer2DModel(**omnidit_config_to_dit(config)).eval()
    dit.load_state_dict(omnidit_to_dit(model.state_dict(), config), strict=True)
    inputs = dit_inputs()
    assert_close(run_omnidit(model, inputs), run_dit(dit, inputs))


# ---- round trips --------------------------------------------------------------------------------


def test_round_trips_are_bit_exact():
    dit = tiny_dit()
    config = dit_config_to_omnidit(dict(dit.config))
    sd = dit.state_dict()
    omni = dit_to_omnidit(sd, config)
    assert_same_state(omnidit_to_dit(omni, config), sd)
    assert_same_state(dit_to_omnidit(omnidit_to_dit(omni, config), config), omni)
    assert omni.keys() == MMDiT(config).state_dict().keys()  # the position table included
    half = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # bf16 stays bf16
    assert_same_state(omnidit_to_dit(dit_to_omnidit(half, config), config), half)


def test_unshared_embedders_are_rejected():
    dit = tiny_dit()
    config = dit_config_to_omnidit(dict(dit.config))
    sd = dit.state_dict()
    key = f"transformer_blocks.2.{EMBEDDER}.class_embedder.embedding_table.weight"
    sd[key] = sd[key] + 1
    with pytest.raises(OmniditError, match=rf"'{key}' differs from block 0's copy"):
        dit_to_omnidit(sd, config)


def test_export_rejects_a_non_standard_position_table():
    config = dit_config_to_omnidit(TINY)
    state = MMDiT(config).state_dict()
    state["pos_table"] = state["pos_table"] + 1
    with pytest.raises(OmniditError, match="pos_table"):
        omnidit_to_dit(state, config)


# ---- loading folders ----------------------------------------------------------------------------


def test_load_saved_folder_sharded_and_pipeline(tmp_path):
    dit = tiny_dit()
    inputs = dit_inputs()
    reference = run_dit(dit, inputs)
    dit.save_pretrained(tmp_path / "single")
    dit.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="50KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for folder in (tmp_path / "single", tmp_path / "pipe"):
        model, config = load_dit_transformer(folder)
        assert config == dit_config_to_omnidit(dict(dit.config))
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert_close(run_omnidit(model, inputs), reference)
    model, _ = load_dit_transformer(tmp_path / "single", dtype=torch.bfloat16)
    assert model.img_in.weight.dtype == torch.bfloat16 and model.pos_table.dtype == torch.bfloat16


def test_load_hub_style_config(tmp_path):
    """The hub's DiT folders name the class Transformer2DModel and omit norm_eps (diffusers' default 1e-5)."""
    dit = tiny_dit()
    dit.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("norm_eps")
    config_file.write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    model, _ = load_dit_transformer(tmp_path)
    inputs = dit_inputs()
    assert_close(run_omnidit(model, inputs), run_dit(dit, inputs))


@pytest.fixture
def saved_dit(tmp_path) -> Path:
    tiny_dit().save_pretrained(tmp_path / "dit")
    return tmp_path / "dit"


def test_load_errors_name_file_and_key(saved_dit, tmp_path):
    key = "transformer_blocks.1.attn1.to_k.weight"
    with pytest.raises(OmniditError, match="not found"):
        load_dit_transformer(tmp_path / "nowhere")

    file = rewrite_weights(saved_dit / WEIGHTS, lambda s: s.pop(key))
    with pytest.raises(OmniditError, match=rf"missing key '{key}'") as err:
        load_dit_transformer(saved_dit)
    assert str(saved_dit) in str(err.value)

    rewrite_weights(saved_dit / WEIGHTS, lambda s: s.update({key: torch.zeros(32, 31)}))
    with pytest.raises(OmniditError, match=rf"key '{key}' has shape \(32, 31\)") as err:
        load_dit_transformer(saved_dit)
    assert str(file) in str(err.value)

    rewrite_weights(saved_dit / WEIGHTS, lambda s: s.update({key: torch.zeros(32, 32), "extra.weight": torch.zeros(1)}))
    with pytest.raises(OmniditError, match="unexpected key 'extra.weight'"):
        load_dit_transformer(saved_dit)

    copy = f"transformer_blocks.1.{EMBEDDER}.timestep_embedder.linear_2.bias"
    rewrite_weights(saved_dit / WEIGHTS, lambda s: (s.pop("extra.weight"), s.update({copy: s[copy] + 1})))
    with pytest.raises(OmniditError, match=rf"'{copy}' differs from block 0's copy") as err:
        load_dit_transformer(saved_dit)
    assert str(file) in str(err.value)


def test_load_rejects_other_models(saved_dit):
    config_file = saved_dit / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(OmniditError, match="not a DiTTransformer2DModel config"):
        load_dit_transformer(saved_dit)
    config_file.unlink()
    with pytest.raises(OmniditError, match="config file not found"):
        load_dit_transformer(saved_dit)


def test_every_integer_step_embeds_exactly_as_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    from omnidit.model.math import timestep_embedding

    steps = torch.arange(1000)
    ours = timestep_embedding(steps.double() / DIT_TIME_SCALE, 256, freq_shift=1.0)
    theirs = get_timestep_embedding(steps, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert torch.equal(ours, theirs)
