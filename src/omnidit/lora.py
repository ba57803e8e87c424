"""LoRA adapters on omnidit models through ``peft``: add, save and load in the PEFT / diffusers layout and in
kohya's layout, several adapters with weights, merge and unmerge.

An adapter adds ``(alpha / r) * B @ A`` to a linear layer's weight (A: (r, in), B: (out, r)). The default
targets are the attention and MLP projections of every block, the fused QKV included (``qkv``, ``proj``,
``fc1``, ``fc2`` in double-stream branches, ``linear1``, ``linear2`` in single-stream blocks).

File layouts (safetensors; the layout is read from the keys):

- ``peft``: ``{module}.lora_A.weight`` (r, in) and ``{module}.lora_B.weight`` (out, r), module paths as
  ``model.named_modules()`` names them (a leading ``transformer.`` or ``base_model.model.`` is accepted), the
  rank and alpha in the file's metadata (``lora_alpha``; alpha = r when absent), as diffusers and PEFT write.
- ``kohya``: ``lora_unet_{module with . as _}.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (a
  scalar per module), as kohya's sd-scripts, ai-toolkit and ComfyUI read.

A file whose keys match nothing in the model, or match only part of it, is an error that says how many keys
matched and names the first that did not: never a silent no-op.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from omnidit.errors import OmniditError

DEFAULT_TARGETS = r"(^|.*\.)(qkv|proj|fc1|fc2|linear1|linear2)$"
LAYOUTS = ("peft", "kohya")
KOHYA_PREFIX = "lora_unet_"
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")


def _peft():
    try:
        import peft
    except ImportError:
        raise OmniditError("LoRA needs the peft package", hint="pip install 'omnidit[lora]' (or pip install peft)") \
            from None
    return peft


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's LoRA-wrapped layers by module path."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's own linear layers by module path (a LoRA-wrapped one by its own path, as its base layer;
    the adapters' matrices are not counted)."""
    from peft.tuners.lora import LoraLayer

    wrapped = {n: m.get_base_layer() for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    inner = tuple(f"{n}." for n in wrapped)
    plain = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(inner)}
    return {**plain, **wrapped}


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str = DEFAULT_TARGETS,
             name: str = "default") -> list[str]:
    """Wrap the linear layers whose module path matches the regular expression ``targets`` (the whole path)
    with a LoRA adapter ``name`` of ``rank`` and ``alpha`` (default: alpha = rank); B starts at zero, so the
    model is unchanged. Returns the wrapped module paths."""
    peft = _peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise OmniditError(f"the LoRA rank must be a whole number >= 1, got {rank!r}", hint="e.g. rank 8")
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise OmniditError(f"the LoRA target pattern {targets!r} is not a regular expression ({e})") from None
    matched = [n for n in linear_layers(model) if pattern.fullmatch(n)]
    if not matched:
        raise OmniditError(f"the LoRA target pattern {targets!r} matches no linear layer of the model",
                           hint="e.g. '.*qkv' or the default, the attention and MLP projections")
    if name in adapter_names(model):
        raise OmniditError(f"the model already has a LoRA adapter named '{name}'", hint="load it under another name")
    config = peft.LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                             target_modules="(" + "|".join(re.escape(n) for n in matched) + ")")
    with warnings.catch_warnings():  # several adapters on one model are what this module is for
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        peft.inject_adapter_in_model(config, model, adapter_name=name)
    weights = dict(getattr(model, "lora_weights", {}))
    set_adapters(model, {**weights, name: 1.0})
    return matched


def set_adapters(model: nn.Module, weights: dict[str, float]) -> None:
    """Make exactly the adapters in ``weights`` active, each at its weight (1 = as trained; 0 = off)."""
    known = adapter_names(model)
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise OmniditError(f"the model has no LoRA adapter named '{unknown[0]}'",
                           hint=f"its adapters: {', '.join(known) or 'none'}")
    for layer in lora_layers(model).values():
        names = [n for n in weights if n in layer.lora_A]
        layer.set_adapter(names)
        for n in names:
            layer.set_scale(n, weights[n])  # scaling = weight * alpha / r
    model.lora_weights = dict(weights)


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within the block ``model`` runs as its base: every LoRA adapter off (``train.prior_preservation``'s frozen
    model, at no extra memory), then each layer as it was, its adapter weights' requires_grad included."""
    layers = list(lora_layers(model).values())
    flags = [(p, p.requires_grad) for layer in layers for n, p in layer.named_parameters() if ".lora_" in f".{n}"]
    was_off = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, off in zip(layers, was_off):
            layer.enable_adapters(not off)  # peft turns requires_grad on for the active adapters: restored below
        for p, flag in flags:
            p.requires_grad_(flag)


def lora_state_dict(model: nn.Module, name: str = "default", layout: str = "peft") -> dict[str, Tensor]:
    """Adapter ``name``'s weights in ``layout`` (module docstring; "diffusers" and "original": the names of the Flux
    or SD3 transformer the model was converted from, convert.lora_keys.to_foreign), on the CPU."""
    if layout not in (*LAYOUTS, "diffusers", "original"):
        raise OmniditError(f"unknown LoRA layout '{layout}'",
                           hint=f"choose one of {', '.join(LAYOUTS)}, diffusers, original")
    if layout in ("diffusers", "original"):
        from omnidit.convert.lora_keys import to_foreign

        layer = next((m for m in lora_layers(model).values() if name in m.lora_A), None)
        if layer is None:
            raise OmniditError(f"the model has no LoRA adapter named '{name}'")
        scale = layer.lora_alpha[name] / layer.r[name]
        return to_foreign(lora_state_dict(model, name, "peft"), scale, model.config, layout)
    out = {}
    for path, layer in lora_layers(model).items():
        if name not in layer.lora_A:
            continue
        down, up = layer.lora_A[name].weight.detach().cpu(), layer.lora_B[name].weight.detach().cpu()
        if layout == "peft":
            out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = down.clone(), up.clone()
        else:
            key = KOHYA_PREFIX + path.replace(".", "_")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down.clone(), up.clone()
            out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[name]))
    if not out:
        raise OmniditError(f"the model has no LoRA adapter named '{name}'",
                           hint=f"its adapters: {', '.join(adapter_names(model)) or 'none'}")
    return out


def save_lora(model: nn.Module, path: str | Path, name: str = "default", layout: str = "peft") -> Path:
    """Write adapter ``name`` as a safetensors file in ``layout`` (with its rank and alpha in the metadata)."""
    from safetensors.torch import save_file

    tensors = lora_state_dict(model, name, layout)
    layer = next(m for m in lora_layers(model).values() if name in m.lora_A)
    folded = layout in ("diffusers", "original")  # the scale is in B: alpha = r for every loader
    meta = {"format": "pt", "lora_layout": layout, "lora_rank": str(layer.r[name]),
            "lora_alpha": str(layer.r[name] if folded else layer.lora_alpha[name])}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def _read(path: Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise OmniditError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise OmniditError(f"{path} is not a safetensors file ({type(e).__name__})",
                           hint="LoRA files are .safetensors; convert pickled .pt / .ckpt files first") from None


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def parse_lora_file(tensors: dict[str, Tensor], meta: dict, model: nn.Module) -> dict[str, tuple]:
    """{module path: (A, B, alpha)} from a file's tensors in either layout; every key must match a linear layer."""
    linear = linear_layers(model)
    underscored = {n.replace(".", "_"): n for n in linear}
    kohya = any(k.startswith(KOHYA_PREFIX) for k in tensors)
    parts: dict[str, dict] = {}
    unmatched = []
    for key in sorted(tensors):
        if kohya:
            m = re.fullmatch(re.escape(KOHYA_PREFIX) + r"(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
            path = underscored.get(m.group(1)) if m else None
            part = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}[m.group(2)] if m else None
        else:
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(\.default)?\.weight", _strip(key))
            path = m.group(1) if m and m.group(1) in linear else None
            part = m.group(2)[-1] if m else None
        if path is None:
            unmatched.append(key)
            continue
        parts.setdefault(path, {})[part] = tensors[key]
    if unmatched:
        matched = len(tensors) - len(unmatched)
        raise OmniditError(f"{matched} of {len(tensors)} keys of the LoRA file match this model; the first that "
                           f"does not: {unmatched[0]}",
                           hint="the file was trained for another model (or another layout of its names)")
    default_alpha = float(meta["lora_alpha"]) if "lora_alpha" in meta else None
    out = {}
    for path, p in parts.items():
        if "A" not in p or "B" not in p:
            raise OmniditError(f"the LoRA file has only one of the two matrices of {path}")
        a, b, layer = p["A"], p["B"], linear[path]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[1] != layer.in_features \
                or b.shape[0] != layer.out_features:
            raise OmniditError(f"the LoRA matrices of {path} are {tuple(b.shape)} x {tuple(a.shape)}, but the layer "
                               f"maps {layer.in_features} -> {layer.out_features} features",
                               hint="the file was trained for a model of another size")
        alpha = float(p["alpha"]) if "alpha" in p else default_alpha if default_alpha is not None else a.shape[0]
        out[path] = (a, b, alpha)
    return out


def load_lora(model: nn.Module, path: str | Path, name: str | None = None, weight: float = 1.0) -> str:
    """Add the adapter in ``path`` (either layout) to ``model`` as ``name`` (default: the file's stem) at
    ``weight``, keeping the other adapters active; returns its name."""
    _peft()
    path = Path(path)
    tensors, meta = _read(path)
    if not tensors:
        raise OmniditError(f"{path} holds no tensors")
    try:
        parts = parse_lora_file(tensors, meta, model)
    except OmniditError as own_names_error:  # perhaps a file for diffusers' or the original Flux / SD3 names
        from omnidit.convert.lora_keys import foreign_lora

        foreign = foreign_lora(tensors, meta, model.config) if hasattr(model, "config") else None
        if foreign is None:
            raise own_names_error from None
        parts = parse_lora_file(foreign[1], {}, model)
    name = name or re.sub(r"\W", "_", path.stem)
    # One rank and alpha for the adapter: modules of a lower rank are padded with zeros (the same product), and
    # a module's own alpha / r is folded into its B where it differs.
    rank = max(a.shape[0] for a, _, _ in parts.values())
    scales = {alpha / a.shape[0] for a, _, alpha in parts.values()}
    scale = scales.pop() if len(scales) == 1 else 1.0
    add_lora(model, rank, scale * rank, "(" + "|".join(re.escape(p) for p in parts) + ")", name)
    layers = lora_layers(model)
    with torch.no_grad():
        for p, (a, b, alpha) in parts.items():
            layer, r = layers[p], a.shape[0]
            layer.lora_A[name].weight.zero_()[:r].copy_(a)
            layer.lora_B[name].weight.zero_()[:, :r].copy_(b * (alpha / r / scale))
    weights = dict(getattr(model, "lora_weights", {}))
    weights[name] = weight
    set_adapters(model, weights)
    return name


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (file, weight): the weight defaults to 1 and must lie in [-10, 10]."""
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            if Path(head).is_file() and not Path(spec).is_file():
                raise OmniditError(f"--lora {spec}: the weight '{tail}' is not a number",
                                   hint=f"e.g. --lora {head}:0.8") from None
    if not -10 <= weight <= 10:
        raise OmniditError(f"--lora {spec}: the weight {weight:g} lies outside [-10, 10]", hint="e.g. FILE:0.8")
    return path, weight


def apply_lora_specs(model: nn.Module, specs: list[str] | None) -> list[str]:
    """``--lora FILE[:WEIGHT]`` flags: load each file at its weight (default 1); returns the specs as applied."""
    applied = []
    for spec in specs or []:
        path, weight = parse_lora_spec(spec)
        name = load_lora(model, path, weight=weight)
        applied.append(f"{name}:{weight:g}")
    return applied


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapters (at their weights) into the base weights: no cost per call afterwards."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (the base weights back, up to float rounding)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def describe(model: nn.Module) -> str:
    """One line per adapter: its name, weight, layers and rank."""
    lines = []
    weights = getattr(model, "lora_weights", {})
    for name in adapter_names(model):
        layers = [m for m in lora_layers(model).values() if name in m.lora_A]
        ranks = sorted({m.r[name] for m in layers})
        lines.append(f"{name}: weight {weights.get(name, 0)}, {len(layers)} layers, rank "
                     f"{'/'.join(map(str, ranks))}")
    return "\n".join(lines) or "no LoRA adapters"


def metadata(path: str | Path) -> dict:
    """A LoRA file's metadata (layout, rank, alpha when written by omnidit)."""
    return json.loads(json.dumps(_read(Path(path))[1]))


# ---- training adapters with omnidit's trainer (train.lora_rank) ---------------------------------------------

ADAPTER_FILE = "adapter.safetensors"  # in each checkpoint of a LoRA run: the EMA adapter, for --lora


def adapter_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter entries of a LoRA-wrapped model's state dict: the only weights a LoRA run trains and saves."""
    return {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def prepare_lora_training(model: nn.Module, config) -> dict:
    """train.lora_rank: load train.init_from's weights into ``model`` (a fresh MMDiT of ``config.model``) and add
    an adapter of train.lora_rank / lora_alpha on train.lora_targets, every other weight frozen. Returns the
    provenance of the weights started from (kept in every checkpoint, as for train.init_from)."""
    from omnidit.checkpoint import load_adapter_base

    tc = config.train
    source = load_adapter_base(model, config)
    add_lora(model, tc.lora_rank, tc.lora_alpha or None, tc.lora_targets or DEFAULT_TARGETS)
    return source


def load_adapter_state(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Load a LoRA run's adapter-only ``state`` into a model prepared like it (every adapter weight, nothing else)."""
    from omnidit.checkpoint import load_adapter_only

    load_adapter_only(model, state, adapter_state(model.state_dict()), source, "adapter",
                      "train.lora_rank, lora_targets and the model must be those the run trained with")


def merged_lora_model(config, adapter: dict[str, Tensor], source: Path) -> nn.Module:
    """A plain MMDiT for sampling: train.init_from's weights with a LoRA run's ``adapter`` folded in."""
    from omnidit.model import MMDiT

    wrapped = MMDiT(config.model)
    prepare_lora_training(wrapped, config)
    load_adapter_state(wrapped, adapter, source)
    merge_lora(wrapped)
    model = MMDiT(config.model)
    model.load_state_dict({k.replace(".base_layer.", "."): v for k, v in wrapped.state_dict().items()
                           if ".lora_" not in k}, strict=True)
    return model
