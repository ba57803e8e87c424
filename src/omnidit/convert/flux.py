"""Flux weights in omnidit: configs, key maps in both directions, and a loader.

Three layouts hold the same Flux transformer:

- diffusers' ``FluxTransformer2DModel`` folder (``transformer_blocks.i.attn.to_q`` ...):
  ``flux_to_omnidit`` / ``omnidit_to_flux``;
- black-forest-labs' original single file, e.g. ``flux1-dev.safetensors`` (``double_blocks.i.img_attn.qkv``
  ...): ``flux_original_to_omnidit`` / ``omnidit_to_flux_original``;
- omnidit's ``MMDiT``, whose names follow the original layout, so that map is renames only.

Every map is a list of ``Rule``s: one omnidit tensor = the row-wise stack of one or more foreign tensors,
optionally with its two row halves swapped. The same rules run forwards and backwards, so round trips are
bit-exact by construction.

Flux packs 2x2 latent patches into 64-channel tokens in (c, py, px) order, the order of
``omnidit.tokens.patchify``; a Flux model is therefore an MMDiT with in_channels = 16, patch_size = 2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from omnidit.checkpoint import read_safetensors
from omnidit.config import read_json
from omnidit.convert.common import (
    ORIGINAL_PREFIX,
    Rule,
    assemble_model,
    count_blocks,
    first_mismatch,
    foreign_shapes,
    from_omnidit,
    linear_rules,
    omnidit_shapes,
    read_weights_folder,
    to_omnidit,
)
from omnidit.errors import OmniditError
from omnidit.model.mmdit import MMDiT, MMDiTConfig

FLUX_CLASS = "FluxTransformer2DModel"
# FluxTransformer2DModel's constructor defaults (FLUX.1 sizes): diffusers fills missing config keys with them.
FLUX_DEFAULTS: dict = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
}
FLUX_PACK = 2  # the Flux pipeline packs 2x2 latent patches into one token
FLUX_ROPE_THETA = 10000.0


# ---- configs --------------------------------------------------------------------------------------


def flux_config_to_omnidit(diffusers_config: dict) -> MMDiTConfig:
    """The MMDiTConfig of a ``FluxTransformer2DModel`` from its config.json dict (or ``model.config``)."""
    name = diffusers_config.get("_class_name", FLUX_CLASS)
    if name != FLUX_CLASS:
        raise OmniditError(f"not a {FLUX_CLASS} config (_class_name is '{name}')",
                           hint="pass the 'transformer' folder of a Flux pipeline")
    c = {**FLUX_DEFAULTS, **{k: v for k, v in diffusers_config.items() if k in FLUX_DEFAULTS}}
    in_channels, out_channels = c["in_channels"], c["out_channels"] or c["in_channels"]
    if c["patch_size"] != 1:
        raise OmniditError(f"Flux config has patch_size {c['patch_size']}; only 1 (pipeline-side packing) is supported")
    if out_channels != in_channels:
        # MMDiT reads and writes tokens of one size (token_dim); Flux Fill / Canny / Depth widen only the input.
        raise OmniditError(f"Flux config has in_channels {in_channels} but out_channels {out_channels}; "
                           "omnidit's MMDiT needs them equal")
    if in_channels % FLUX_PACK**2:
        raise OmniditError(f"Flux in_channels {in_channels} is not a multiple of {FLUX_PACK**2} (packed 2x2 patches)")
    return MMDiTConfig(
        in_channels=in_channels // FLUX_PACK**2,
        patch_size=FLUX_PACK,
        hidden_size=c["attention_head_dim"] * c["num_attention_heads"],
        num_heads=c["num_attention_heads"],
        depth=c["num_layers"],
        depth_single=c["num_single_layers"],
        mlp_ratio=4.0,
        context_dim=c["joint_attention_dim"],
        pooled_dim=c["pooled_projection_dim"],
        guidance_embed=bool(c["guidance_embeds"]),
        axes_dim=tuple(c["axes_dims_rope"]),
        rope_theta=FLUX_ROPE_THETA,
        qk_norm=True,
        qkv_bias=True,
    )


def omnidit_config_to_flux(config: MMDiTConfig) -> dict:
    """The ``FluxTransformer2DModel`` constructor arguments for a Flux-shaped MMDiTConfig."""
    _require_flux_shaped(config)
    return {
        "patch_size": 1, "in_channels": config.token_dim, "out_channels": None, "num_layers": config.depth,
        "num_single_layers": config.depth_single, "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads, "joint_attention_dim": config.context_dim,
        "pooled_projection_dim": config.pooled_dim, "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim),
    }


def flux_original_config(state: dict[str, Tensor], axes_dim: tuple[int, ...] = (16, 56, 56)) -> MMDiTConfig:
    """Infer the MMDiTConfig of an original-layout Flux state dict from its tensor shapes.

    The file does not record the rotary split; ``axes_dim`` defaults to FLUX.1's (16, 56, 56).
    """
    state = _strip_prefix(state)
    need = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "double_blocks.0.img_mlp.0.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale"]
    missing = [k for k in need if k not in state]
    if missing:
        raise OmniditError(f"not an original Flux checkpoint: no key '{missing[0]}'",
                           hint="pass a diffusers folder (config.json + safetensors) or a flux1-*.safetensors file")
    hidden, token_dim = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return MMDiTConfig(
        in_channels=token_dim // FLUX_PACK**2,
        patch_size=FLUX_PACK,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=count_blocks(state, "double_blocks"),
        depth_single=count_blocks(state, "single_blocks"),
        mlp_ratio=state["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        context_dim=state["txt_in.weight"].shape[1],
        pooled_dim=state["vector_in.in_layer.weight"].shape[1],
        guidance_embed="guidance_in.in_layer.weight" in state,
        axes_dim=axes_dim,
        rope_theta=FLUX_ROPE_THETA,
        qk_norm=True,
        qkv_bias=True,
    )


def _require_flux_shaped(config: MMDiTConfig, diffusers: bool = True) -> None:
    """Raise unless ``config`` is an architecture Flux can hold (same weights, same function).

    diffusers: also require what diffusers' class fixes but the original code leaves free (mlp_ratio 4).
    """
    problems = [what for ok, what in [
        (config.mlp_ratio == 4.0 or not diffusers, "mlp_ratio 4 (fixed in diffusers)"),
        (config.context_dim > 0 and config.pooled_dim > 0, "a text stream and a pooled vector"),
        (config.depth_single > 0, "at least one single-stream block (else omnidit's last text stream is pre-only)"),
        (config.num_classes == 0, "no class labels"),
        (config.qk_norm and config.qkv_bias, "QK norm and QKV biases"),
        (not config.abs_pos_embed, "no absolute position embedding"),
        (config.rope_theta == FLUX_ROPE_THETA, f"rope_theta {FLUX_ROPE_THETA:g}"),
    ] if not ok]
    if problems:
        raise OmniditError(f"this MMDiT config has no Flux equivalent: Flux needs {problems[0]}")


# ---- key maps -------------------------------------------------------------------------------------


def _diffusers_rules(config: MMDiTConfig) -> list[Rule]:
    """omnidit <- diffusers ``FluxTransformer2DModel`` (verified against diffusers 0.42's modules)."""
    _require_flux_shaped(config)
    d, mlp = config.hidden_size, config.mlp_hidden
    tte = "time_text_embed"
    rules = [
        *linear_rules("img_in", ["x_embedder"]),
        *linear_rules("txt_in", ["context_embedder"]),
        *linear_rules("time_in.in_layer", [f"{tte}.timestep_embedder.linear_1"]),
        *linear_rules("time_in.out_layer", [f"{tte}.timestep_embedder.linear_2"]),
        *linear_rules("vector_in.in_layer", [f"{tte}.text_embedder.linear_1"]),
        *linear_rules("vector_in.out_layer", [f"{tte}.text_embedder.linear_2"]),
    ]
    if config.guidance_embed:
        rules += [*linear_rules("guidance_in.in_layer", [f"{tte}.guidance_embedder.linear_1"]),
                  *linear_rules("guidance_in.out_layer", [f"{tte}.guidance_embedder.linear_2"])]
    # Per stream: (modulation, q/k/v projections, q norm, k norm, output projection, feed-forward).
    streams = {
        "img": ("norm1", ("to_q", "to_k", "to_v"), "norm_q", "norm_k", "to_out.0", "ff"),
        "txt": ("norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "norm_added_q", "norm_added_k",
                "to_add_out", "ff_context"),
    }
    for i in range(config.depth):
        src = f"transformer_blocks.{i}"
        for name, (norm, qkv, q_norm, k_norm, out, ff) in streams.items():
            dst = f"double_blocks.{i}.streams.{name}"
            rules += [
                *linear_rules(f"{dst}.mod.lin", [f"{src}.{norm}.linear"]),  # chunks (shift, scale, gate) x 2 in both
                *linear_rules(f"{dst}.qkv", [f"{src}.attn.{p}" for p in qkv], (d, d, d)),
                Rule(f"{dst}.q_norm.scale", (f"{src}.attn.{q_norm}.weight",)),
                Rule(f"{dst}.k_norm.scale", (f"{src}.attn.{k_norm}.weight",)),
                *linear_rules(f"{dst}.proj", [f"{src}.attn.{out}"]),
                *linear_rules(f"{dst}.mlp.fc1", [f"{src}.{ff}.net.0.proj"]),
                *linear_rules(f"{dst}.mlp.fc2", [f"{src}.{ff}.net.2"]),
            ]
    for i in range(config.depth_single):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        rules += [
            *linear_rules(f"{dst}.mod.lin", [f"{src}.norm.linear"]),  # (shift, scale, gate) in both
            *linear_rules(f"{dst}.linear1", [f"{src}.attn.to_q", f"{src}.attn.to_k", f"{src}.attn.to_v",
                                        f"{src}.proj_mlp"], (d, d, d, mlp)),
            *linear_rules(f"{dst}.linear2", [f"{src}.proj_out"]),  # input [attention, mlp] in both
            Rule(f"{dst}.q_norm.scale", (f"{src}.attn.norm_q.weight",)),
            Rule(f"{dst}.k_norm.scale", (f"{src}.attn.norm_k.weight",)),
        ]
    rules += [*linear_rules("final_layer.mod.lin", ["norm_out.linear"], swap=True),
              *linear_rules("final_layer.linear", ["proj_out"])]
    return rules


def _original_rules(config: MMDiTConfig) -> list[Rule]:
    """omnidit <- black-forest-labs' original layout: renames only."""
    _require_flux_shaped(config, diffusers=False)
    names = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer"]
    if config.guidance_embed:
        names += ["guidance_in.in_layer", "guidance_in.out_layer"]
    rules = [r for n in names for r in linear_rules(n, [n])]
    for i in range(config.depth):
        for s in ("img", "txt"):
            src, dst = f"double_blocks.{i}.{s}", f"double_blocks.{i}.streams.{s}"
            rules += [
                *linear_rules(f"{dst}.mod.lin", [f"{src}_mod.lin"]),
                *linear_rules(f"{dst}.qkv", [f"{src}_attn.qkv"]),
                Rule(f"{dst}.q_norm.scale", (f"{src}_attn.norm.query_norm.scale",)),
                Rule(f"{dst}.k_norm.scale", (f"{src}_attn.norm.key_norm.scale",)),
                *linear_rules(f"{dst}.proj", [f"{src}_attn.proj"]),
                *linear_rules(f"{dst}.mlp.fc1", [f"{src}_mlp.0"]),
                *linear_rules(f"{dst}.mlp.fc2", [f"{src}_mlp.2"]),
            ]
    for i in range(config.depth_single):
        b = f"single_blocks.{i}"
        rules += [
            *linear_rules(f"{b}.mod.lin", [f"{b}.modulation.lin"]),
            *linear_rules(f"{b}.linear1", [f"{b}.linear1"]),
            *linear_rules(f"{b}.linear2", [f"{b}.linear2"]),
            Rule(f"{b}.q_norm.scale", (f"{b}.norm.query_norm.scale",)),
            Rule(f"{b}.k_norm.scale", (f"{b}.norm.key_norm.scale",)),
        ]
    # The original final layer orders its chunks (shift, scale), as omnidit does.
    rules += [*linear_rules("final_layer.mod.lin", ["final_layer.adaLN_modulation.1"]),
              *linear_rules("final_layer.linear", ["final_layer.linear"])]
    return rules


def flux_to_omnidit(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """diffusers ``FluxTransformer2DModel`` state dict -> ``MMDiT(config)`` state dict (dtypes kept)."""
    return to_omnidit(state, _diffusers_rules(config), config, "the diffusers Flux state dict")


def omnidit_to_flux(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """``MMDiT(config)`` state dict -> diffusers ``FluxTransformer2DModel`` state dict (inverse of the above)."""
    return from_omnidit(state, _diffusers_rules(config), config)


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix(ORIGINAL_PREFIX): v for k, v in state.items()}


def flux_original_to_omnidit(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """Original single-file Flux state dict (``double_blocks.0.img_attn.qkv.weight`` ...) -> MMDiT state dict.

    A ``model.diffusion_model.`` prefix on the keys is accepted.
    """
    return to_omnidit(_strip_prefix(state), _original_rules(config), config, "the original Flux state dict")


def omnidit_to_flux_original(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """MMDiT state dict -> original single-file Flux layout (no prefix)."""
    return from_omnidit(state, _original_rules(config), config)


# ---- loading --------------------------------------------------------------------------------------


def load_flux_transformer(path: str | Path, dtype: torch.dtype | None = None,
                          device: str | torch.device = "cpu") -> tuple[MMDiT, MMDiTConfig]:
    """Load a Flux transformer into an MMDiT (eval mode, no gradients).

    ``path``: a diffusers ``FluxTransformer2DModel`` folder (config.json + safetensors, possibly sharded),
    a pipeline folder with such a ``transformer/`` inside, or an original single ``.safetensors`` file.
    Weights keep the file's dtype unless ``dtype`` is given. Feed the model
    ``patchify(latents, 2)``, ``image_position_ids(h // 2, w // 2)`` and a Condition with txt
    (T5 states), pooled (CLIP vector) and, for FLUX.1-dev, guidance.
    """
    path = Path(path)
    if not path.exists():
        raise OmniditError(f"Flux model not found: {path}",
                           hint="pass a diffusers transformer folder or a flux1-*.safetensors file")
    if path.is_file():
        state = _strip_prefix(read_safetensors(path))
        config = flux_original_config(state)
        expected = foreign_shapes(_original_rules(config), omnidit_shapes(config))
        origin = dict.fromkeys(state, path)
        convert = flux_original_to_omnidit
    else:
        if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
            path = path / "transformer"
        config = flux_config_to_omnidit(read_json(path / "config.json", "diffusers transformer config"))
        state, origin = read_weights_folder(path)
        expected = foreign_shapes(_diffusers_rules(config), omnidit_shapes(config))
        convert = flux_to_omnidit
    mismatch = first_mismatch(state, expected)
    if mismatch:
        key, problem = mismatch
        raise OmniditError(f"{origin.get(key, path)} does not match its Flux config: {problem}")
    return assemble_model(config, convert(state, config), dtype, device), config
