"""Stable Diffusion 3 / 3.5 weights in omnidit: configs, key maps in both directions, and a loader.

Three layouts hold the same SD3 transformer:

- diffusers' ``SD3Transformer2DModel`` folder (``transformer_blocks.i.attn.to_q`` ...):
  ``sd3_to_omnidit`` / ``omnidit_to_sd3``;
- Stability AI's original single file, e.g. ``sd3.5_medium.safetensors``
  (``model.diffusion_model.joint_blocks.i.x_block.attn.qkv`` ...): ``sd3_original_to_omnidit`` /
  ``omnidit_to_sd3_original``;
- omnidit's ``MMDiT`` with ``rope=False``, ``depth_single=0`` (so the last text stream is pre-only, SD3's
  ``context_pre_only``), the position table ``pos_table`` (SD3's ``pos_embed`` buffer, centre-cropped the same
  way), and for SD3.5 ``qk_norm`` and ``dual_attention_layers`` (MMDiT-X).

The maps reuse flux.py's rules (renames, q/k/v row stacks, (scale, shift) half swaps). Three tensors also
change form, in both directions, and bit-exactly:

- the Conv2d patch embedding (D, C, p, p) is omnidit's ``img_in`` Linear (D, C*p*p): a reshape, since
  ``omnidit.tokens.patchify`` orders features (c, py, px);
- the position table (1, S*S, D) is omnidit's ``pos_table`` (S, S, D): a reshape;
- the output projection: SD3 unpatchifies its rows as (py, px, c), omnidit as (c, py, px): a row permutation.

One weight has no omnidit counterpart: with QK norm (SD3.5), the last block's text *query* norm
(``norm_added_q`` / ``context_block.attn.ln_q``). Those queries only produce text outputs that SD3 discards, so
omnidit's pre-only stream has no query norm; the weight is checked and dropped on import, and written as
ones (an identity RMSNorm weight) on export. Every other key round-trips bit-exactly.

SD3's pipeline passes ``timestep = 1000 t`` to the transformer; omnidit takes t in [0, 1] and scales it
itself. SD3 attends to padded text unmasked; omnidit's ``txt_mask`` is an extra (with a mask, the result
equals SD3 run on the unpadded text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from omnidit.checkpoint import read_safetensors
from omnidit.config import read_json
from omnidit.convert.common import (
    ORIGINAL_PREFIX,
    Rule,
    assemble_model,
    check_state,
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

SD3_CLASS = "SD3Transformer2DModel"
# SD3Transformer2DModel's constructor defaults: diffusers fills missing config keys with them.
SD3_DEFAULTS: dict = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
    "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96, "dual_attention_layers": (),
    "qk_norm": None,
}
SD3_HEAD_DIM = 64  # every released SD3 / SD3.5 model; original files without QK norm do not record it


# ---- configs --------------------------------------------------------------------------------------


def sd3_config_to_omnidit(diffusers_config: dict) -> MMDiTConfig:
    """The MMDiTConfig of an ``SD3Transformer2DModel`` from its config.json dict (or ``model.config``)."""
    name = diffusers_config.get("_class_name", SD3_CLASS)
    if name != SD3_CLASS:
        raise OmniditError(f"not an {SD3_CLASS} config (_class_name is '{name}')",
                           hint="pass the 'transformer' folder of a Stable Diffusion 3 pipeline")
    c = {**SD3_DEFAULTS, **{k: v for k, v in diffusers_config.items() if k in SD3_DEFAULTS}}
    hidden = c["attention_head_dim"] * c["num_attention_heads"]
    out_channels = c["out_channels"] or c["in_channels"]
    if c["caption_projection_dim"] != hidden:
        # context_embedder's output feeds blocks of width heads * head_dim; diffusers fails at run time otherwise.
        raise OmniditError(f"SD3 config has caption_projection_dim {c['caption_projection_dim']} but a hidden size "
                           f"of {hidden} (attention_head_dim * num_attention_heads); they must be equal")
    if not c["pos_embed_max_size"]:
        raise OmniditError("SD3 config has no pos_embed_max_size; omnidit needs SD3's fixed position table")
    if c["qk_norm"] not in (None, "rms_norm"):
        raise OmniditError(f"SD3 config has qk_norm '{c['qk_norm']}'; omnidit supports None and 'rms_norm'")
    return MMDiTConfig(
        in_channels=c["in_channels"],
        patch_size=c["patch_size"],
        hidden_size=hidden,
        num_heads=c["num_attention_heads"],
        depth=c["num_layers"],
        depth_single=0,
        mlp_ratio=4.0,
        context_dim=c["joint_attention_dim"],
        pooled_dim=c["pooled_projection_dim"],
        qk_norm=c["qk_norm"] == "rms_norm",
        qkv_bias=True,
        rope=False,
        pos_table_size=c["pos_embed_max_size"],
        out_channels=0 if out_channels == c["in_channels"] else out_channels,
        dual_attention_layers=tuple(c["dual_attention_layers"] or ()),
    )


def omnidit_config_to_sd3(config: MMDiTConfig, sample_size: int = 128) -> dict:
    """The ``SD3Transformer2DModel`` constructor arguments for an SD3-shaped MMDiTConfig.

    ``sample_size`` (latent pixels) is only the pipeline's default resolution; omnidit has no such setting.
    """
    _require_sd3_shaped(config)
    return {
        "sample_size": sample_size, "patch_size": config.patch_size, "in_channels": config.in_channels,
        "num_layers": config.depth, "attention_head_dim": config.head_dim, "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim, "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.pooled_dim, "out_channels": config.out_channels or config.in_channels,
        "pos_embed_max_size": config.pos_table_size, "dual_attention_layers": list(config.dual_attention_layers),
        "qk_norm": "rms_norm" if config.qk_norm else None,
    }


def sd3_original_config(state: dict[str, Tensor], head_dim: int = SD3_HEAD_DIM) -> MMDiTConfig:
    """Infer the MMDiTConfig of an original-layout SD3 state dict from its tensor shapes.

    The head size is read from the QK-norm weights (SD3.5); files without them (SD3) do not record it, and
    ``head_dim`` (64 in every released model) is used.
    """
    state = _transformer_keys(state)
    need = ["x_embedder.proj.weight", "pos_embed", "context_embedder.weight", "y_embedder.mlp.0.weight",
            "final_layer.linear.weight", "joint_blocks.0.x_block.mlp.fc1.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise OmniditError(f"not an original SD3 checkpoint: no key '{missing[0]}'",
                           hint="pass a diffusers folder (config.json + safetensors) or an sd3*.safetensors file")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    ln_q = state.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = head_dim if ln_q is None else ln_q.shape[0]
    table = math.isqrt(state["pos_embed"].shape[1])
    out_channels = state["final_layer.linear.weight"].shape[0] // patch**2
    dual = sorted({int(k.split(".")[1]) for k in state if k.startswith("joint_blocks.") and ".x_block.attn2." in k})
    return MMDiTConfig(
        in_channels=in_channels,
        patch_size=patch,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=count_blocks(state, "joint_blocks"),
        depth_single=0,
        mlp_ratio=state["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
        context_dim=state["context_embedder.weight"].shape[1],
        pooled_dim=state["y_embedder.mlp.0.weight"].shape[1],
        qk_norm=ln_q is not None,
        qkv_bias=True,
        rope=False,
        pos_table_size=table,
        out_channels=0 if out_channels == in_channels else out_channels,
        dual_attention_layers=tuple(dual),
    )


def _require_sd3_shaped(config: MMDiTConfig, diffusers: bool = True) -> None:
    """Raise unless ``config`` is an architecture SD3 can hold (same weights, same function).

    diffusers: also require what diffusers' class fixes but the original code leaves free (mlp_ratio 4).
    """
    problems = [what for ok, what in [
        (config.mlp_ratio == 4.0 or not diffusers, "mlp_ratio 4 (fixed in diffusers)"),
        (config.context_dim > 0 and config.pooled_dim > 0, "a text stream and a pooled vector"),
        (config.depth_single == 0, "no single-stream blocks"),
        (config.num_classes == 0 and not config.guidance_embed, "no class labels or guidance embedding"),
        (not config.rope and not config.abs_pos_embed, "no RoPE and no sin-cos embedding from ids (rope=False)"),
        (config.pos_table_size > 0, "a position table (pos_table_size > 0)"),
        (config.qkv_bias, "QKV biases"),
        (config.time_freq_shift == 0.0, "time_freq_shift 0"),
    ] if not ok]
    if problems:
        raise OmniditError(f"this MMDiT config has no SD3 equivalent: SD3 needs {problems[0]}")


# ---- key maps -------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """One SD3 checkpoint layout for one config: flux.py's rules plus the tensors that change form.

    reshaped: foreign key -> its stored shape, for tensors that omnidit keeps in another shape (patch
    embedding, position table); output: the output projection's keys, whose rows SD3 orders (py, px, c) and
    omnidit (c, py, px); unused: foreign key -> shape, for weights omnidit has no use for (checked and dropped
    on import, written as ones on export).
    """

    rules: list[Rule]
    reshaped: dict[str, tuple[int, ...]]
    output: tuple[str, ...]
    unused: dict[str, tuple[int, ...]]


def _stream_rules(dst: str, src: dict, config: MMDiTConfig, pre_only: bool, swap_mod: bool = False) -> list[Rule]:
    """Rules for one stream of one joint block.

    src: foreign names of "mod", "qkv" (one fused or three q, k, v linears), "q_norm", "k_norm" (norm
    weights), "proj", "fc1", "fc2", and, for a dual-attention image stream, "qkv2", "q_norm2", "k_norm2",
    "proj2". A pre-only stream keeps only the modulation, q/k/v and key norm.
    """
    d = config.hidden_size
    attentions = [""] + (["2"] if "qkv2" in src else [])
    rules = linear_rules(f"{dst}.mod.lin", [src["mod"]], swap=swap_mod)
    for n in attentions:
        qkv = src[f"qkv{n}"]
        rules += linear_rules(f"{dst}.qkv{n}", qkv, (d,) * len(qkv) if len(qkv) > 1 else ())
        norms = ["k_norm"] if pre_only else ["q_norm", "k_norm"]
        if config.qk_norm:
            rules += [Rule(f"{dst}.{norm}{n}.scale", (src[f"{norm}{n}"],)) for norm in norms]
        if not pre_only:
            rules += linear_rules(f"{dst}.proj{n}", [src[f"proj{n}"]])
    if not pre_only:
        rules += [*linear_rules(f"{dst}.mlp.fc1", [src["fc1"]]), *linear_rules(f"{dst}.mlp.fc2", [src["fc2"]])]
    return rules


def _diffusers_layout(config: MMDiTConfig) -> _Layout:
    """omnidit <- diffusers ``SD3Transformer2DModel`` (verified against diffusers 0.42's modules)."""
    _require_sd3_shaped(config)
    tte = "time_text_embed"
    rules = [
        *linear_rules("img_in", ["pos_embed.proj"]),
        Rule("pos_table", ("pos_embed.pos_embed",)),
        *linear_rules("time_in.in_layer", [f"{tte}.timestep_embedder.linear_1"]),
        *linear_rules("time_in.out_layer", [f"{tte}.timestep_embedder.linear_2"]),
        *linear_rules("vector_in.in_layer", [f"{tte}.text_embedder.linear_1"]),
        *linear_rules("vector_in.out_layer", [f"{tte}.text_embedder.linear_2"]),
        *linear_rules("txt_in", ["context_embedder"]),
    ]
    unused = {}
    for i in range(config.depth):
        b, last = f"transformer_blocks.{i}", i == config.depth - 1
        img = {"mod": f"{b}.norm1.linear", "qkv": [f"{b}.attn.to_{x}" for x in "qkv"],
               "q_norm": f"{b}.attn.norm_q.weight", "k_norm": f"{b}.attn.norm_k.weight",
               "proj": f"{b}.attn.to_out.0", "fc1": f"{b}.ff.net.0.proj", "fc2": f"{b}.ff.net.2"}
        if i in config.dual_attention_layers:  # chunks (shift, scale, gate) x 3 in both, attn2 last
            img.update({"qkv2": [f"{b}.attn2.to_{x}" for x in "qkv"], "q_norm2": f"{b}.attn2.norm_q.weight",
                        "k_norm2": f"{b}.attn2.norm_k.weight", "proj2": f"{b}.attn2.to_out.0"})
        txt = {"mod": f"{b}.norm1_context.linear", "qkv": [f"{b}.attn.add_{x}_proj" for x in "qkv"],
               "q_norm": f"{b}.attn.norm_added_q.weight", "k_norm": f"{b}.attn.norm_added_k.weight",
               "proj": f"{b}.attn.to_add_out", "fc1": f"{b}.ff_context.net.0.proj", "fc2": f"{b}.ff_context.net.2"}
        rules += _stream_rules(f"double_blocks.{i}.streams.img", img, config, pre_only=False)
        # The last text stream is an AdaLayerNormContinuous: chunks (scale, shift), omnidit's (shift, scale).
        rules += _stream_rules(f"double_blocks.{i}.streams.txt", txt, config, pre_only=last, swap_mod=last)
        if last and config.qk_norm:
            unused[txt["q_norm"]] = (config.head_dim,)
    rules += [*linear_rules("final_layer.mod.lin", ["norm_out.linear"], swap=True),
              *linear_rules("final_layer.linear", ["proj_out"])]
    return _Layout(rules, _patch_and_table_shapes(config, "pos_embed.proj.weight", "pos_embed.pos_embed"),
                   ("proj_out.weight", "proj_out.bias"), unused)


def _original_layout(config: MMDiTConfig) -> _Layout:
    """omnidit <- Stability AI's original layout (as diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``
    reads it): renames; every modulation, the last text stream's and the final layer's included, is ordered as
    omnidit's."""
    _require_sd3_shaped(config, diffusers=False)
    rules = [
        *linear_rules("img_in", ["x_embedder.proj"]),
        Rule("pos_table", ("pos_embed",)),
        *linear_rules("time_in.in_layer", ["t_embedder.mlp.0"]),
        *linear_rules("time_in.out_layer", ["t_embedder.mlp.2"]),
        *linear_rules("vector_in.in_layer", ["y_embedder.mlp.0"]),
        *linear_rules("vector_in.out_layer", ["y_embedder.mlp.2"]),
        *linear_rules("txt_in", ["context_embedder"]),
    ]
    unused = {}
    for i in range(config.depth):
        last = i == config.depth - 1
        for stream, block in (("img", "x_block"), ("txt", "context_block")):
            b = f"joint_blocks.{i}.{block}"
            src = {"mod": f"{b}.adaLN_modulation.1", "qkv": [f"{b}.attn.qkv"], "q_norm": f"{b}.attn.ln_q.weight",
                   "k_norm": f"{b}.attn.ln_k.weight", "proj": f"{b}.attn.proj", "fc1": f"{b}.mlp.fc1",
                   "fc2": f"{b}.mlp.fc2"}
            if stream == "img" and i in config.dual_attention_layers:
                src.update({"qkv2": [f"{b}.attn2.qkv"], "q_norm2": f"{b}.attn2.ln_q.weight",
                            "k_norm2": f"{b}.attn2.ln_k.weight", "proj2": f"{b}.attn2.proj"})
            pre_only = last and stream == "txt"
            rules += _stream_rules(f"double_blocks.{i}.streams.{stream}", src, config, pre_only)
            if pre_only and config.qk_norm:
                unused[src["q_norm"]] = (config.head_dim,)
    rules += [*linear_rules("final_layer.mod.lin", ["final_layer.adaLN_modulation.1"]),
              *linear_rules("final_layer.linear", ["final_layer.linear"])]
    return _Layout(rules, _patch_and_table_shapes(config, "x_embedder.proj.weight", "pos_embed"),
                   ("final_layer.linear.weight", "final_layer.linear.bias"), unused)


def _patch_and_table_shapes(config: MMDiTConfig, patch_key: str, table_key: str) -> dict[str, tuple[int, ...]]:
    d, p, s = config.hidden_size, config.patch_size, config.pos_table_size
    return {patch_key: (d, config.in_channels, p, p), table_key: (1, s * s, d)}


def _output_order(config: MMDiTConfig) -> Tensor:
    """Row j of omnidit's output projection is SD3's row ``order[j]``: features (c, py, px) <- (py, px, c)."""
    p, c = config.patch_size, config.out_channels or config.in_channels
    return torch.arange(p * p * c).reshape(p, p, c).permute(2, 0, 1).flatten()


def _expected_shapes(layout: _Layout, config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Every foreign key of ``layout`` with the shape the file stores it in."""
    return {**foreign_shapes(layout.rules, omnidit_shapes(config)), **layout.reshaped, **layout.unused}


def _layout_to_omnidit(state: dict[str, Tensor], layout: _Layout, config: MMDiTConfig, what: str) -> dict[str, Tensor]:
    flat = foreign_shapes(layout.rules, omnidit_shapes(config))
    check_state(state, {**flat, **layout.reshaped, **layout.unused}, what)
    state = {k: v for k, v in state.items() if k not in layout.unused}
    state.update({k: state[k].reshape(flat[k]) for k in layout.reshaped})
    order = _output_order(config)
    state.update({k: state[k].index_select(0, order.to(state[k].device)) for k in layout.output})
    return to_omnidit(state, layout.rules, config, what)


def _layout_from_omnidit(state: dict[str, Tensor], layout: _Layout, config: MMDiTConfig) -> dict[str, Tensor]:
    out = from_omnidit(state, layout.rules, config)
    inverse = torch.argsort(_output_order(config))
    out.update({k: out[k].index_select(0, inverse.to(out[k].device)) for k in layout.output})
    out.update({k: out[k].reshape(shape) for k, shape in layout.reshaped.items()})
    like = state["img_in.weight"]
    out.update({k: torch.ones(shape, dtype=like.dtype, device=like.device) for k, shape in layout.unused.items()})
    return out


def sd3_to_omnidit(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """diffusers ``SD3Transformer2DModel`` state dict -> ``MMDiT(config)`` state dict (dtypes kept)."""
    return _layout_to_omnidit(state, _diffusers_layout(config), config, "the diffusers SD3 state dict")


def omnidit_to_sd3(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """``MMDiT(config)`` state dict -> diffusers ``SD3Transformer2DModel`` state dict (inverse of the above;
    the last block's ``attn.norm_added_q.weight``, which omnidit does not keep, is written as ones)."""
    return _layout_from_omnidit(state, _diffusers_layout(config), config)


def _transformer_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The transformer's tensors of an original file: those under ``model.diffusion_model.`` when there are
    any (files that bundle the VAE and text encoders), else all, unprefixed."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in state):
        return {k.removeprefix(ORIGINAL_PREFIX): v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)}
    return dict(state)


def sd3_original_to_omnidit(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """Original single-file SD3 state dict (``joint_blocks.0.x_block.attn.qkv.weight`` ...) -> MMDiT state dict.

    Keys may carry the ``model.diffusion_model.`` prefix; then keys without it (VAE, text encoders) are ignored.
    """
    return _layout_to_omnidit(_transformer_keys(state), _original_layout(config), config,
                              "the original SD3 state dict")


def omnidit_to_sd3_original(state: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """MMDiT state dict -> original single-file SD3 layout (no prefix; the last block's
    ``context_block.attn.ln_q.weight``, which omnidit does not keep, is written as ones)."""
    return _layout_from_omnidit(state, _original_layout(config), config)


# ---- loading --------------------------------------------------------------------------------------


def load_sd3_transformer(path: str | Path, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu") -> tuple[MMDiT, MMDiTConfig]:
    """Load an SD3 / SD3.5 transformer into an MMDiT (eval mode, no gradients).

    ``path``: a diffusers ``SD3Transformer2DModel`` folder (config.json + safetensors, possibly sharded), a
    pipeline folder with such a ``transformer/`` inside, or an original single ``.safetensors`` file (only its
    ``model.diffusion_model.*`` tensors are read when it bundles others). Weights keep the file's dtype unless
    ``dtype`` is given. Feed the model ``patchify(latents, 2)``, ``image_position_ids(h // 2, w // 2)``, t in
    [0, 1] (SD3's pipeline timestep / 1000) and a Condition with txt (CLIP + T5 states) and pooled (CLIP vectors).
    """
    path = Path(path)
    if not path.exists():
        raise OmniditError(f"SD3 model not found: {path}",
                           hint="pass a diffusers transformer folder or an sd3*.safetensors file")
    if path.is_file():
        state = _transformer_keys(read_safetensors(path))
        config = sd3_original_config(state)
        layout, origin = _original_layout(config), dict.fromkeys(state, path)
    else:
        if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
            path = path / "transformer"
        config = sd3_config_to_omnidit(read_json(path / "config.json", "diffusers transformer config"))
        state, origin = read_weights_folder(path)
        layout = _diffusers_layout(config)
    mismatch = first_mismatch(state, _expected_shapes(layout, config))
    if mismatch:
        key, problem = mismatch
        raise OmniditError(f"{origin.get(key, path)} does not match its SD3 config: {problem}")
    return assemble_model(config, _layout_to_omnidit(state, layout, config, str(path)), dtype, device), config
