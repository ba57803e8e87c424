"""LoRA files written for the Flux and SD3 transformers as other tools name them, onto omnidit's modules.

diffusers, PEFT, ai-toolkit and kohya's scripts put adapters on diffusers' modules (``transformer_blocks.0.attn.to_q``,
``to_k``, ``to_v`` as three linears); ComfyUI and black-forest-labs' own code on the original Flux modules
(``double_blocks.0.img_attn.qkv``). omnidit fuses q, k and v (and, in single blocks, the MLP input) into one
linear, which is where LoRA files usually load partly or silently wrong. Here the checkpoint key maps
(``convert.flux`` / ``convert.sd3``, the same rules that convert the weights) carry the adapters over exactly:
an omnidit linear stacked from foreign linears p_1..p_k gets

    A = [A_1; ...; A_k]  (sum r_j, in)      B = blockdiag(s_1 B_1, ..., s_k B_k)  (sum out_j, sum r_j)

with s_j = alpha_j / r_j folded in, so B A = stack_j(s_j B_j A_j): each part's own update, nothing mixed. A part
without an adapter contributes zero rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from omnidit.convert.common import Rule, swap_halves
from omnidit.errors import OmniditError

_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.")
_KOHYA = re.compile(r"lora_(?:unet|transformer)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_PEFT = re.compile(r"(.+)\.(lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight")


def _rule_sets(config) -> list[tuple[str, Callable[[], list[Rule]]]]:
    from omnidit.convert import flux, sd3

    return [("diffusers Flux", lambda: flux._diffusers_rules(config)),
            ("original Flux", lambda: flux._original_rules(config)),
            ("diffusers SD3", lambda: sd3._diffusers_layout(config).rules),
            ("original SD3", lambda: sd3._original_layout(config).rules)]


def _entries(tensors: dict[str, Tensor], names: dict[str, str]) -> dict[str, dict] | None:
    """{foreign module: {"A", "B", "alpha"?}} when every key names a module in ``names`` (underscored -> dotted
    for kohya's keys, dotted -> dotted otherwise), else None."""
    out: dict[str, dict] = {}
    for key, value in tensors.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        m = _KOHYA.fullmatch(key)
        if m:
            module, part = names.get(m.group(1)), {"lora_down.weight": "A", "lora_up.weight": "B"}.get(m.group(2),
                                                                                                     "alpha")
        else:
            m = _PEFT.fullmatch(key)
            if not m:
                return None
            module = m.group(1) if m.group(1) in names.values() else None
            part = "A" if m.group(2) in ("lora_A", "lora_down") else "B"
        if module is None:
            return None
        out.setdefault(module, {})[part] = value
    return out


def foreign_lora(tensors: dict[str, Tensor], meta: dict, config) -> tuple[str, dict[str, Tensor]] | None:
    """(the layout's name, the adapter as omnidit PEFT-layout tensors with every scale folded into B) for a file
    written for the Flux or SD3 transformer in diffusers' or the original names; None when it is neither."""
    default_alpha = float(meta["lora_alpha"]) if "lora_alpha" in meta else None
    for layout, make_rules in _rule_sets(config):
        try:
            rules = [r for r in make_rules() if r.omnidit.endswith(".weight")]
        except OmniditError:  # the model does not have this family's shape
            continue
        modules = {p.removesuffix(".weight") for r in rules for p in r.parts}
        entries = _entries(tensors, {m.replace(".", "_"): m for m in modules})
        if not entries:
            continue
        if "SD3" in layout and any(m.startswith(("proj_out", "final_layer.linear")) for m in entries):
            raise OmniditError("adapters on SD3's output projection are not supported (its rows are reordered)",
                               hint="leave proj_out out of the adapter's targets")
        out = {}
        for rule in rules:
            parts = [p.removesuffix(".weight") for p in rule.parts]
            if not any(p in entries for p in parts):
                continue
            out.update(_fuse(rule, parts, entries, default_alpha))
        return layout, out
    return None


def _fuse(rule: Rule, parts: list[str], entries: dict[str, dict], default_alpha: float | None) -> dict[str, Tensor]:
    """One omnidit module's A and B from the adapters of the foreign modules it stacks."""
    pieces = []
    for part in parts:
        e = entries.get(part)
        if e is None:
            pieces.append(None)
            continue
        if "A" not in e or "B" not in e:
            raise OmniditError(f"the LoRA file has only one of the two matrices of {part}")
        a, b = e["A"].float(), e["B"].float()
        r = a.shape[0]
        alpha = float(e["alpha"]) if "alpha" in e else default_alpha if default_alpha is not None else r
        pieces.append((a, b * (alpha / r)))
    present = [p for p in pieces if p is not None]
    sizes = list(rule.sizes) or [present[0][1].shape[0]]
    if len(sizes) != len(parts):
        raise OmniditError(f"cannot place the LoRA of {', '.join(parts)} in {rule.omnidit}")
    if len(present) == len(parts) and all(torch.equal(p[0], present[0][0]) for p in present):
        # One A shared by every part (as save_foreign writes a fused adapter): B stacks, the rank stays.
        b = torch.cat([p[1] for p in present])
        module = rule.omnidit.removesuffix(".weight")
        return {f"{module}.lora_A.weight": present[0][0], f"{module}.lora_B.weight": swap_halves(b) if rule.swap else b}
    a = torch.cat([p[0] for p in present])
    b = torch.zeros(sum(sizes), a.shape[0])
    row, col = 0, 0
    for size, piece in zip(sizes, pieces):
        if piece is not None:
            if piece[1].shape[0] != size:
                raise OmniditError(f"the LoRA of {rule.omnidit} has {piece[1].shape[0]} output rows where the model "
                                   f"has {size}", hint="the file was trained for a model of another size")
            b[row:row + size, col:col + piece[0].shape[0]] = piece[1]
            col += piece[0].shape[0]
        row += size
    if rule.swap:
        b = swap_halves(b)
    module = rule.omnidit.removesuffix(".weight")
    return {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}


FOREIGN_LAYOUTS = {"diffusers": ("diffusers Flux", "diffusers SD3"), "original": ("original Flux", "original SD3")}
_SAVE_PREFIX = {"diffusers": "transformer.", "original": "diffusion_model."}


def to_foreign(tensors: dict[str, Tensor], scale: float, config, layout: str) -> dict[str, Tensor]:
    """An omnidit adapter (PEFT-layout ``tensors`` of omnidit module names, scale alpha / r) in the names of the
    Flux or SD3 transformer that ``config`` has the shape of: ``layout`` "diffusers" or "original". A fused
    module's adapter becomes one per part, each with the same A and its rows of B (the scale folded in, so the
    file needs alpha = r, which every loader assumes by default); loading it back gives the same tensors."""
    for name, make_rules in _rule_sets(config):
        if name not in FOREIGN_LAYOUTS[layout]:
            continue
        try:
            rules = {r.omnidit.removesuffix(".weight"): r for r in make_rules() if r.omnidit.endswith(".weight")}
        except OmniditError:
            continue
        out = {}
        for key in tensors:
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            rule = rules.get(module)
            if rule is None:
                raise OmniditError(f"the {name} transformer has no module for omnidit's {module}",
                                   hint="save this adapter in the peft or kohya layout")
            a, b = tensors[key], tensors[f"{module}.lora_B.weight"] * scale
            b = swap_halves(b) if rule.swap else b
            for part, rows in zip(rule.parts, b.split(list(rule.sizes) or [b.shape[0]])):
                foreign = _SAVE_PREFIX[layout] + part.removesuffix(".weight")
                out[f"{foreign}.lora_A.weight"], out[f"{foreign}.lora_B.weight"] = a.clone(), rows.clone()
        return out
    raise OmniditError(f"this model has neither the Flux nor the SD3 shape, so it has no {layout} names",
                       hint="save its adapters in the peft or kohya layout")
