"""Whole-folder conversion between omnidit checkpoints and diffusers transformer folders (``omnidit convert``).

- omnidit checkpoint (or run folder) -> diffusers: the first family (Flux, SD3, DiT) that can hold the model
  config *exactly* is chosen; ``config.json`` (``_class_name`` + constructor arguments) and
  ``diffusion_pytorch_model.safetensors`` (EMA weights unless ``use_ema=False``) are written.
- diffusers transformer folder -> omnidit: a checkpoint folder whose config has the converted model section
  and default other sections, with the weights as both ``model.safetensors`` and ``ema.safetensors``.

"Exactly" means more than the family's shape checks: the family's config, translated back, must give the
same model function (``_lost_setting``), so an export never silently drops a setting such as
``time_freq_shift`` or ``mlp_norm_eps``. Both directions reuse the key maps, so round trips are bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from omnidit.checkpoint import (
    list_checkpoints,
    named_model_path,
    publish_folder,
    read_config,
    read_safetensors,
    resolve_model_dir,
    save_checkpoint,
    weights_file,
)
from omnidit.config import Config, TextConfig, read_json
from omnidit.convert.dit import (
    DIT_CLASS,
    LEGACY_CLASS,
    dit_config_to_omnidit,
    load_dit_transformer,
    omnidit_config_to_dit,
    omnidit_to_dit,
)
from omnidit.convert.flux import (
    FLUX_CLASS,
    flux_config_to_omnidit,
    load_flux_transformer,
    omnidit_config_to_flux,
    omnidit_to_flux,
)
from omnidit.convert.sd3 import (
    SD3_CLASS,
    load_sd3_transformer,
    omnidit_config_to_sd3,
    omnidit_to_sd3,
    sd3_config_to_omnidit,
)
from omnidit.errors import OmniditError
from omnidit.model.mmdit import MMDiTConfig

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SD3_SAMPLE_SIZE = 128  # SD3's default resolution in latent pixels (capped by the position table on export)


@dataclass(frozen=True)
class Family:
    """One diffusers transformer class and the functions that translate it."""

    name: str
    class_names: tuple[str, ...]  # the first is written on export; all are accepted on import
    config_to_diffusers: Callable[[MMDiTConfig], dict]
    config_to_omnidit: Callable[[dict], MMDiTConfig]
    weights_to_diffusers: Callable[[dict[str, Tensor], MMDiTConfig], dict[str, Tensor]]
    load: Callable[[Path], tuple]


def _sd3_kwargs(config: MMDiTConfig) -> dict:
    return omnidit_config_to_sd3(config, sample_size=min(SD3_SAMPLE_SIZE, config.pos_table_size * config.patch_size))


FAMILIES: dict[str, Family] = {  # in the order 'auto' tries them
    "flux": Family("flux", (FLUX_CLASS,), omnidit_config_to_flux, flux_config_to_omnidit, omnidit_to_flux,
                   load_flux_transformer),
    "sd3": Family("sd3", (SD3_CLASS,), _sd3_kwargs, sd3_config_to_omnidit, omnidit_to_sd3, load_sd3_transformer),
    "dit": Family("dit", (DIT_CLASS, LEGACY_CLASS), omnidit_config_to_dit, dit_config_to_omnidit, omnidit_to_dit,
                  load_dit_transformer),
}


# ---- choosing a family ----------------------------------------------------------------------------


def _function_settings(config: MMDiTConfig) -> dict:
    """The config's fields, with equivalent spellings made equal (out_channels 0 = in_channels; the rotary
    settings do not matter with rope off)."""
    d = dataclasses.asdict(config)
    d["out_channels"] = config.out_channels or config.in_channels
    d["mlp_ratio"] = float(config.mlp_ratio)
    if not config.rope:
        d["axes_dim"] = d["rope_theta"] = None
    return d


def _lost_setting(config: MMDiTConfig, back: MMDiTConfig) -> str | None:
    """'key a (would be b)' for the first setting the family's config cannot carry; None if none is lost."""
    ours, theirs = _function_settings(config), _function_settings(back)
    for key, value in ours.items():
        if theirs[key] != value:
            return f"{key} {value!r} (it would become {theirs[key]!r})"
    return None


def family_problem(config: MMDiTConfig, family: str) -> str | None:
    """Why ``family`` cannot hold ``config`` exactly (one sentence), or None if it can."""
    fam = FAMILIES[family]
    try:
        kwargs = fam.config_to_diffusers(config)
        back = fam.config_to_omnidit({"_class_name": fam.class_names[0], **kwargs})
    except OmniditError as e:
        return e.message
    lost = _lost_setting(config, back)
    return f"{fam.class_names[0]} cannot express {lost}" if lost else None


def choose_family(config: MMDiTConfig, family: str = "auto") -> str:
    """The family to export ``config`` as: ``family`` if it fits, for 'auto' the first that fits."""
    names = list(FAMILIES) if family == "auto" else [family]
    if family != "auto" and family not in FAMILIES:
        raise OmniditError(f"unknown family '{family}'", hint="use auto, " + ", ".join(FAMILIES))
    problems = {}
    for name in names:
        problems[name] = family_problem(config, name)
        if problems[name] is None:
            return name
    reasons = "; ".join(f"{name}: {why}" for name, why in problems.items())
    raise OmniditError(f"no diffusers transformer can hold this model config ({reasons})",
                       hint="only Flux-, SD3- and DiT-shaped MMDiT configs convert to diffusers")


# ---- the two directions ---------------------------------------------------------------------------


def _require_new_folder(dst: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise OmniditError(f"destination {dst} is a file", hint="name a new folder")
    if dst.exists() and any(dst.iterdir()):
        raise OmniditError(f"destination {dst} exists and is not empty", hint="choose a new folder")


def _diffusers_version() -> str | None:
    try:
        return version("diffusers")
    except PackageNotFoundError:
        return None


def export_diffusers(src: str | Path, dst: str | Path, family: str = "auto", use_ema: bool = True) -> tuple[Path, str]:
    """Write an omnidit checkpoint (or a run's latest) as a diffusers transformer folder; returns (dst, class)."""
    dst = Path(dst)
    _require_new_folder(dst)
    directory = resolve_model_dir(src)
    train = read_config(directory).train
    if train.lora_rank or train.layout_boxes:
        raise OmniditError(f"{directory} holds an adapter (LoRA or layout), not a whole model",
                           hint="export its base model (a LoRA file loads onto the diffusers model as it is)")
    config = read_config(directory).model
    fam = FAMILIES[choose_family(config, family)]
    file = weights_file(directory, use_ema)
    state = fam.weights_to_diffusers(read_safetensors(file), config)
    meta = {"_class_name": fam.class_names[0]}
    if (diffusers_version := _diffusers_version()) is not None:
        meta["_diffusers_version"] = diffusers_version
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps({**meta, **fam.config_to_diffusers(config)}, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
              metadata={"format": "pt"})
    return publish_folder(tmp, dst), fam.class_names[0]


def _transformer_folder(path: Path) -> Path:
    """``path``, or its ``transformer/`` when ``path`` is a diffusers pipeline folder."""
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return path


def import_diffusers(src: str | Path, dst: str | Path, family: str = "auto") -> tuple[Path, str]:
    """Write a diffusers transformer folder as an omnidit checkpoint folder; returns (dst, class)."""
    src, dst = _transformer_folder(Path(src)), Path(dst)
    _require_new_folder(dst)
    if not (src / "config.json").is_file():
        raise OmniditError(f"{src} has no config.json", hint="pass a diffusers transformer folder")
    name = read_json(src / "config.json", "diffusers transformer config").get("_class_name")
    found = [f for f in FAMILIES.values() if name in f.class_names]
    if not found:
        known = ", ".join(c for f in FAMILIES.values() for c in f.class_names[:1])
        raise OmniditError(f"unknown diffusers class '{name}' in {src / 'config.json'}",
                           hint=f"omnidit converts {known}")
    fam = found[0]
    if family not in ("auto", fam.name):
        raise OmniditError(f"{src} holds a {name}, not a {family} model", hint=f"pass --family {fam.name} or auto")
    model, config = fam.load(src)
    state = model.state_dict()
    # A model that reads no text must not name a text encoder (pipelines would load one for nothing).
    text = TextConfig() if config.context_dim else TextConfig(encoder="none")
    return save_checkpoint(dst, Config(model=config, text=text), state, state), name


def source_kind(src: str | Path) -> str:
    """'omnidit' for a checkpoint or run folder, 'diffusers' for a transformer (or pipeline) folder."""
    src = named_model_path(src)  # a shipped model converts by name, as every command takes it
    if not src.exists():
        raise OmniditError(f"convert source not found: {src}",
                           hint="pass an omnidit checkpoint or run folder, or a diffusers transformer folder")
    config = _transformer_folder(src) / "config.json"
    if src.is_dir() and config.is_file():
        return "diffusers" if "_class_name" in read_json(config, "model config") else "omnidit"
    if list_checkpoints(src):
        return "omnidit"
    raise OmniditError(f"{src} is neither an omnidit checkpoint nor a diffusers transformer folder",
                       hint="pass a folder with a config.json (or a training run folder)")


def convert(src: str | Path, dst: str | Path, to: str | None = None, family: str = "auto",
            use_ema: bool = True) -> tuple[Path, str]:
    """Convert ``src`` to ``dst`` in the other format (``to``: 'diffusers' or 'omnidit', default: the format
    ``src`` is not in). Returns (dst, the diffusers class name)."""
    kind = source_kind(src)
    to = to or ("diffusers" if kind == "omnidit" else "omnidit")
    if to == kind:
        raise OmniditError(f"{src} is already in {kind} format", hint=f"drop --to {to} to convert it the other way")
    if to == "diffusers":
        return export_diffusers(src, dst, family, use_ema)
    return import_diffusers(src, dst, family)
