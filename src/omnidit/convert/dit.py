"""Class-conditional DiT weights in omnidit: diffusers' ``DiTTransformer2DModel`` <-> ``MMDiT``.

A DiT (e.g. facebook/DiT-XL-2-256) is an MMDiT with one image stream and no text: ``depth`` joint blocks
of which only the ``img`` stream exists, no QK norm, no RoPE, a fixed sin-cos table for the native grid
(``pos_table_size = sample_size // patch_size``), class labels with a null class, diffusers' timestep
frequencies (``time_freq_shift = 1``) and, with learned sigma, ``out_channels = 2 * in_channels``.

What the key map does beyond renames:

- diffusers keeps a copy of the timestep and label embedders in *every* block (``transformer_blocks.i.norm1.emb``),
  copies of the original DiT's shared ``t_embedder`` / ``y_embedder``. omnidit has one ``time_in`` and one
  ``label_in``: import reads block 0 and requires the other copies to be identical; export writes the copies.
- the patch embedding is a Conv2d, whose flattened kernel is omnidit's (c, py, px) token order: a reshape.
- ``proj_out_2`` writes tokens in (py, px, c) order, omnidit in (c, py, px): its rows are permuted.
- the sin-cos position table is a non-persistent buffer in diffusers (recomputed, never saved) and a
  buffer in omnidit's state dict: import computes it, export checks it is the standard table and drops it.

Time: diffusers' DiT takes integer steps 0..999; feed omnidit ``t = step / DIT_TIME_SCALE``. Inputs are
``patchify(latents, p)``, ``image_position_ids(h // p, w // p)`` and ``Condition(labels=...)``, with label
``num_classes`` the null class; the output unpatchifies with ``out_channels`` channels.

Limits: the map is exact, the function nearly so.

- Only the native grid matches: for other sizes diffusers rescales the table's positions, omnidit crops it.
- The feed-forward's LayerNorm uses diffusers' ``norm_eps`` (1e-5 by default, so in the hub checkpoints):
  it becomes omnidit's ``mlp_norm_eps``.
- Pass t = step / 1000 in float64 (``DIT_TIME_SCALE``): omnidit scales by 1000 before casting to float32,
  so every integer step embeds exactly as in diffusers.
- The network predicts DDPM noise (and learned-variance values), not omnidit's flow velocity: sampling it
  needs DiT's own scheduler, not ``omnidit.sampling``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from omnidit.config import read_json
from omnidit.convert.common import (
    Rule,
    assemble_model,
    check_state,
    first_mismatch,
    foreign_shapes,
    from_omnidit,
    linear_rules,
    omnidit_shapes,
    read_weights_folder,
    to_omnidit,
)
from omnidit.errors import OmniditError
from omnidit.model.math import sincos_2d_table
from omnidit.model.mmdit import MMDiT, MMDiTConfig

DIT_CLASS = "DiTTransformer2DModel"
# Hub DiT folders predate the class and say "Transformer2DModel"; diffusers remaps it by norm_type.
LEGACY_CLASS = "Transformer2DModel"
# DiTTransformer2DModel's constructor defaults (DiT-XL/2 at 256 px): diffusers fills missing config keys with them.
DIT_DEFAULTS: dict = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "attention_bias": True, "sample_size": 32, "patch_size": 2, "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
DIT_TIME_SCALE = 1000.0  # diffusers' DiT takes steps 0..999; omnidit's t = step / DIT_TIME_SCALE
EMBEDDERS = "norm1.emb"  # each diffusers block's copy of the timestep + label embedders
_EMBEDDER_KEYS = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
                  "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
                  "class_embedder.embedding_table.weight")
_PATCH_CONV = "pos_embed.proj.weight"
_OUT_PROJ = "proj_out_2"


# ---- configs --------------------------------------------------------------------------------------


def dit_config_to_omnidit(diffusers_config: dict) -> MMDiTConfig:
    """The MMDiTConfig of a ``DiTTransformer2DModel`` from its config.json dict (or ``model.config``).

    Also accepts the hub's older ``Transformer2DModel`` name with ``norm_type`` "ada_norm_zero".
    """
    name = diffusers_config.get("_class_name", DIT_CLASS)
    c = {**DIT_DEFAULTS, **{k: v for k, v in diffusers_config.items() if k in DIT_DEFAULTS}}
    if name not in (DIT_CLASS, LEGACY_CLASS) or c["norm_type"] != "ada_norm_zero":
        raise OmniditError(f"not a {DIT_CLASS} config (_class_name '{name}', norm_type '{c['norm_type']}')",
                           hint="pass the 'transformer' folder of a DiT pipeline")
    problems = [what for ok, what in [
        (c["activation_fn"] == "gelu-approximate", f"activation_fn 'gelu-approximate', not '{c['activation_fn']}'"),
        (not c["norm_elementwise_affine"], "norm_elementwise_affine false (omnidit's norms have no affine)"),
        (c["num_embeds_ada_norm"], "num_embeds_ada_norm (the number of classes)"),
        (c["patch_size"] and c["sample_size"] % c["patch_size"] == 0, "a sample_size divisible by patch_size"),
    ] if not ok]
    if problems:
        raise OmniditError(f"this DiT config has no omnidit equivalent: it needs {problems[0]}")
    heads = c["num_attention_heads"]
    return MMDiTConfig(
        in_channels=c["in_channels"],
        patch_size=c["patch_size"],
        hidden_size=heads * c["attention_head_dim"],
        num_heads=heads,
        depth=c["num_layers"],
        depth_single=0,
        mlp_ratio=4.0,
        context_dim=0,
        pooled_dim=0,
        num_classes=c["num_embeds_ada_norm"],
        axes_dim=(2, 2, 2),  # unused with rope off; three axes so that image ids are (0, row, col)
        qk_norm=False,
        qkv_bias=bool(c["attention_bias"]),
        rope=False,
        pos_table_size=c["sample_size"] // c["patch_size"],
        out_channels=c["out_channels"] or c["in_channels"],
        time_freq_shift=1.0,
        mlp_norm_eps=float(c["norm_eps"]),
    )


def omnidit_config_to_dit(config: MMDiTConfig) -> dict:
    """The ``DiTTransformer2DModel`` constructor arguments for a DiT-shaped MMDiTConfig.

    norm_eps is the model's ``mlp_norm_eps``, so that the exported model computes what the omnidit model computes.
    """
    _require_dit_shaped(config)
    return {
        "num_attention_heads": config.num_heads, "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels, "out_channels": config.out_channels or config.in_channels,
        "num_layers": config.depth, "attention_bias": config.qkv_bias,
        "sample_size": config.pos_table_size * config.patch_size, "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": config.num_classes,
        "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": config.mlp_norm_eps,
    }


def _require_dit_shaped(config: MMDiTConfig) -> None:
    """Raise unless ``config`` is an architecture a DiTTransformer2DModel can hold."""
    problems = [what for ok, what in [
        (config.context_dim == 0 and config.pooled_dim == 0, "no text stream and no pooled vector"),
        (config.depth_single == 0, "no single-stream blocks"),
        (config.num_classes > 0, "class labels"),
        (not config.guidance_embed, "no guidance embedding"),
        (not config.rope and not config.abs_pos_embed, "no RoPE and no sin-cos embedding from ids"),
        (config.pos_table_size > 0, "a fixed position table (pos_table_size > 0)"),
        (not config.qk_norm, "no QK norm"),
        (config.mlp_ratio == 4.0, "mlp_ratio 4"),
        (config.time_freq_shift == 1.0, "time_freq_shift 1"),
        (not config.dual_attention_layers, "no dual-attention layers"),
    ] if not ok]
    if problems:
        raise OmniditError(f"this MMDiT config has no DiT equivalent: DiT needs {problems[0]}")


# ---- key maps -------------------------------------------------------------------------------------


def _embedder(block: int) -> str:
    return f"transformer_blocks.{block}.{EMBEDDERS}"


def _rules(config: MMDiTConfig) -> list[Rule]:
    """omnidit <- diffusers ``DiTTransformer2DModel`` (verified against diffusers 0.42's modules).

    The embedders come from block 0; the conv kernel and proj_out_2's rows are reshaped / permuted
    around these rules (see ``dit_to_omnidit``).
    """
    _require_dit_shaped(config)
    d, emb = config.hidden_size, _embedder(0)
    rules = [
        *linear_rules("img_in", ["pos_embed.proj"]),
        *linear_rules("time_in.in_layer", [f"{emb}.timestep_embedder.linear_1"]),
        *linear_rules("time_in.out_layer", [f"{emb}.timestep_embedder.linear_2"]),
        Rule("label_in.weight", (f"{emb}.class_embedder.embedding_table.weight",)),  # num_classes + 1 rows in both
    ]
    for i in range(config.depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}.streams.img"
        qkv = linear_rules(f"{dst}.qkv", [f"{src}.attn1.to_{p}" for p in "qkv"], (d, d, d))
        rules += [
            # chunks (shift, scale, gate) for attention then MLP, in both
            *linear_rules(f"{dst}.mod.lin", [f"{src}.norm1.linear"]),
            *[r for r in qkv if config.qkv_bias or r.omnidit.endswith(".weight")],
            *linear_rules(f"{dst}.proj", [f"{src}.attn1.to_out.0"]),
            *linear_rules(f"{dst}.mlp.fc1", [f"{src}.ff.net.0.proj"]),  # GELU(tanh) in both
            *linear_rules(f"{dst}.mlp.fc2", [f"{src}.ff.net.2"]),
        ]
    # proj_out_1 chunks (shift, scale), as omnidit's final modulation.
    rules += [*linear_rules("final_layer.mod.lin", ["proj_out_1"]), *linear_rules("final_layer.linear", [_OUT_PROJ])]
    return rules


def _dit_shapes(config: MMDiTConfig) -> dict[str, torch.Size]:
    """Every key and shape of a ``DiTTransformer2DModel`` state dict for ``config``."""
    shapes = foreign_shapes(_rules(config), omnidit_shapes(config))
    p = config.patch_size
    shapes[_PATCH_CONV] = torch.Size((config.hidden_size, config.in_channels, p, p))
    for i in range(1, config.depth):
        shapes.update({f"{_embedder(i)}.{k}": shapes[f"{_embedder(0)}.{k}"] for k in _EMBEDDER_KEYS})
    return shapes


def _first_unshared(state: dict[str, Tensor], config: MMDiTConfig) -> str | None:
    """The first per-block embedder key whose tensor differs from block 0's copy; None if all equal."""
    for i in range(1, config.depth):
        for k in _EMBEDDER_KEYS:
            if not torch.equal(state[f"{_embedder(i)}.{k}"], state[f"{_embedder(0)}.{k}"]):
                return f"{_embedder(i)}.{k}"
    return None


def _unshared_message(key: str) -> str:
    return (f"'{key}' differs from block 0's copy: omnidit's MMDiT has one timestep / label embedder "
            "shared by all blocks and cannot express per-block embedders")


def _token_order(t: Tensor, channels: int, patch: int) -> Tensor:
    """proj_out_2 rows (py, px, c) -> omnidit's (c, py, px); t: (C * p * p, ...)."""
    return t.unflatten(0, (patch * patch, channels)).transpose(0, 1).flatten(0, 1)


def _dit_order(t: Tensor, channels: int, patch: int) -> Tensor:
    """Inverse of ``_token_order``: rows (c, py, px) -> (py, px, c)."""
    return t.unflatten(0, (channels, patch * patch)).transpose(0, 1).flatten(0, 1)


def dit_to_omnidit(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """diffusers ``DiTTransformer2DModel`` state dict -> ``MMDiT(config)`` state dict (dtypes kept).

    The position table, which diffusers does not save, is computed in the patch embedding's dtype.
    """
    check_state(state, _dit_shapes(config), "the diffusers DiT state dict")
    unshared = _first_unshared(state, config)
    if unshared:
        raise OmniditError(_unshared_message(unshared))
    channels, p = config.out_channels or config.in_channels, config.patch_size
    flat = {k: state[k] for k in foreign_shapes(_rules(config), omnidit_shapes(config))}
    flat[_PATCH_CONV] = state[_PATCH_CONV].flatten(1)  # (D, C, p, p) -> (D, C * p * p), (c, py, px) order
    for part in ("weight", "bias"):
        flat[f"{_OUT_PROJ}.{part}"] = _token_order(state[f"{_OUT_PROJ}.{part}"], channels, p)
    out = to_omnidit(flat, _rules(config), config, "the diffusers DiT state dict")
    out["pos_table"] = sincos_2d_table(config.pos_table_size, config.hidden_size).to(
        dtype=state[_PATCH_CONV].dtype, device=state[_PATCH_CONV].device)
    return out


def omnidit_to_dit(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """``MMDiT(config)`` state dict -> diffusers ``DiTTransformer2DModel`` state dict (inverse of the above).

    Writes the shared embedders into every block; ``pos_table`` must be the standard sin-cos table
    (diffusers recomputes it and has nowhere to store another).
    """
    out = from_omnidit(state, _rules(config), config)
    table = state["pos_table"]
    if table.device.type != "meta" and not torch.equal(
            table, sincos_2d_table(config.pos_table_size, config.hidden_size).to(table)):
        raise OmniditError("the omnidit state dict's 'pos_table' is not the standard sin-cos table; "
                           "diffusers' DiT recomputes its table and cannot hold another")
    channels, p = config.out_channels or config.in_channels, config.patch_size
    out[_PATCH_CONV] = out[_PATCH_CONV].unflatten(1, (config.in_channels, p, p))
    for part in ("weight", "bias"):
        out[f"{_OUT_PROJ}.{part}"] = _dit_order(out[f"{_OUT_PROJ}.{part}"], channels, p)
    for i in range(1, config.depth):
        # Clones: safetensors' save_file refuses tensors that share memory.
        out.update({f"{_embedder(i)}.{k}": out[f"{_embedder(0)}.{k}"].clone() for k in _EMBEDDER_KEYS})
    return out


# ---- loading --------------------------------------------------------------------------------------


def load_dit_transformer(path: str | Path, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu") -> tuple[MMDiT, MMDiTConfig]:
    """Load a DiT transformer into an MMDiT (eval mode, no gradients).

    ``path``: a diffusers ``DiTTransformer2DModel`` folder (config.json + safetensors, possibly sharded) or a
    pipeline folder with such a ``transformer/`` inside. Weights keep the file's dtype unless ``dtype`` is
    given. Feed the model ``patchify(latents, p)``, ``image_position_ids(h // p, w // p)``,
    ``t = step / DIT_TIME_SCALE`` and ``Condition(labels=...)`` (label ``num_classes`` = unconditional).
    """
    path = Path(path)
    if not path.is_dir():
        raise OmniditError(f"DiT model folder not found: {path}", hint="pass a diffusers DiT transformer folder")
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    config = dit_config_to_omnidit(read_json(path / "config.json", "diffusers transformer config"))
    state, origin = read_weights_folder(path)
    mismatch = first_mismatch(state, _dit_shapes(config))
    if mismatch:
        key, problem = mismatch
        raise OmniditError(f"{origin.get(key, path)} does not match its DiT config: {problem}")
    unshared = _first_unshared(state, config)
    if unshared:
        raise OmniditError(f"{origin[unshared]}: {_unshared_message(unshared)}")
    return assemble_model(config, dit_to_omnidit(state, config), dtype, device), config
