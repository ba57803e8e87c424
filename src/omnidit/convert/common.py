"""Shared machinery of the checkpoint key maps: rules, shape checks, folder reading, model assembly.

A map is a list of ``Rule``s: one omnidit tensor = the row-wise stack of one or more foreign tensors,
optionally with its two row halves swapped. The same rules run forwards (``to_omnidit``) and backwards
(``from_omnidit``), so round trips are bit-exact by construction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from omnidit.checkpoint import read_safetensors
from omnidit.config import read_json
from omnidit.errors import OmniditError
from omnidit.model.mmdit import MMDiT, MMDiTConfig

# Original single-file checkpoints may carry ComfyUI's prefix.
ORIGINAL_PREFIX = "model.diffusion_model."
_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


@dataclass(frozen=True)
class Rule:
    """One omnidit tensor made of foreign tensors.

    parts: foreign keys whose tensors are stacked along rows (one key: a plain rename); sizes: the
    row count of each part (needed to split when there are several); swap: the two row halves are
    exchanged (diffusers' final norm orders its chunks (scale, shift), omnidit (shift, scale)).
    """

    omnidit: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    swap: bool = False


def linear_rules(omnidit: str, parts: Iterable[str], sizes: tuple[int, ...] = (), swap: bool = False) -> list[Rule]:
    """Rules for a Linear's weight and bias."""
    parts = tuple(parts)
    return [Rule(f"{omnidit}.{p}", tuple(f"{x}.{p}" for x in parts), sizes, swap) for p in ("weight", "bias")]


def count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    ids = [int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
    return max(ids) + 1 if ids else 0


def swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def omnidit_shapes(config: MMDiTConfig) -> dict[str, torch.Size]:
    """Parameter shapes of ``MMDiT(config)``, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in MMDiT(config).state_dict().items()}


def foreign_shapes(rules: list[Rule], omnidit_shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    out = {}
    for r in rules:
        shape = omnidit_shapes[r.omnidit]
        for key, rows in zip(r.parts, r.sizes or (shape[0],)):
            out[key] = torch.Size((rows, *shape[1:]))
    return out


def first_mismatch(state: dict[str, Tensor], expected: dict[str, torch.Size]) -> tuple[str, str] | None:
    """(key, sentence) for the first missing, unexpected or wrongly shaped key; None if all match."""
    for key in expected:
        if key not in state:
            return key, f"missing key '{key}'"
    for key, t in state.items():
        if key not in expected:
            return key, f"unexpected key '{key}'"
        if t.shape != expected[key]:
            return key, f"key '{key}' has shape {tuple(t.shape)}, expected {tuple(expected[key])}"
    return None


def check_state(state: dict[str, Tensor], expected: dict[str, torch.Size], what: str) -> None:
    mismatch = first_mismatch(state, expected)
    if mismatch:
        raise OmniditError(f"{what} does not match the model config: {mismatch[1]}")


def to_omnidit(state: dict[str, Tensor], rules: list[Rule], config: MMDiTConfig, what: str) -> dict[str, Tensor]:
    check_state(state, foreign_shapes(rules, omnidit_shapes(config)), what)
    out = {}
    for r in rules:
        t = state[r.parts[0]] if len(r.parts) == 1 else torch.cat([state[k] for k in r.parts], dim=0)
        out[r.omnidit] = swap_halves(t) if r.swap else t
    return out


def from_omnidit(state: dict[str, Tensor], rules: list[Rule], config: MMDiTConfig) -> dict[str, Tensor]:
    check_state(state, omnidit_shapes(config), "the omnidit state dict")
    out = {}
    for r in rules:
        t = state[r.omnidit]
        t = swap_halves(t) if r.swap else t
        if len(r.parts) == 1:
            out[r.parts[0]] = t
        else:
            # Clone the row blocks: views of one storage cannot be written by safetensors' save_file.
            out.update({k: p.clone() for k, p in zip(r.parts, t.split(list(r.sizes), dim=0))})
    return out


def read_weights_folder(folder: Path) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """All tensors of a diffusers weights folder (one file or index-sharded) and the file each came from."""
    index = next((folder / n for n in _INDEX_FILES if (folder / n).is_file()), None)
    if index is not None:
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise OmniditError(f"{index} has no 'weight_map'")
        files = sorted({folder / f for f in weight_map.values()})
    else:
        standard = [folder / n for n in _WEIGHT_FILES if (folder / n).is_file()]
        files = standard[:1] or sorted(folder.glob("*.safetensors"))
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise OmniditError(f"{folder} needs one diffusion_pytorch_model.safetensors or an index.json "
                               f"(safetensors files found: {found})")
    state, origin = {}, {}
    for file in files:
        for key, value in read_safetensors(file).items():
            state[key], origin[key] = value, file
    return state, origin


def assemble_model(config: MMDiTConfig, state: dict[str, Tensor], dtype: torch.dtype | None,
                   device: str | torch.device) -> MMDiT:
    """An MMDiT holding ``state`` (omnidit keys), in eval mode without gradients.

    Built on the meta device and filled by assignment: no float32 copy of billions of random weights first.
    """
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = MMDiT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)
