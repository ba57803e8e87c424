"""The checkpoint folder: ``config.json``, ``model.safetensors``, ``ema.safetensors`` and, for
resuming, ``training_state/`` (``state.safetensors`` + ``state.json``). Nothing is ever pickled.

A training run writes ``OUT_DIR/checkpoint-000500/`` folders; anywhere a model folder is expected,
the run folder works too and means its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from omnidit import __version__
from omnidit.codecs import load_audio_codec
from omnidit.config import Config, config_from_dict, read_json
from omnidit.errors import OmniditError
from omnidit.model.layers import MLPEmbedder
from omnidit.model.mmdit import TIME_EMBED_DIM, MMDiT, MMDiTConfig

FORMAT = "omnidit-checkpoint/1"
CHECKPOINT_PREFIX = "checkpoint-"
# Seconds to pause in the middle of every checkpoint write; only tests set it (to SIGKILL a run mid-save).
SAVE_DELAY_ENV = "OMNIDIT_TEST_SAVE_DELAY"
# The shapes model shipped inside the package (an ``export_for_inference`` folder): what `omnidit generate`,
# `eval` and `demo` use when no model is given. docs/default_model.md tells how it was trained.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
VIDEO_MODEL_DIR = Path(__file__).resolve().parent / "video_model"
AV_MODEL_DIR = Path(__file__).resolve().parent / "av_model"
TURBO_MODEL_DIR = Path(__file__).resolve().parent / "turbo_model"
VIDEO_TURBO_MODEL_DIR = Path(__file__).resolve().parent / "video_turbo_model"
LAYOUT_MODEL_DIR = Path(__file__).resolve().parent / "layout_model"
GUIDED_MODEL_DIR = Path(__file__).resolve().parent / "guided_model"
INPAINT_MODEL_DIR = Path(__file__).resolve().parent / "inpaint_model"
# Models shipped inside the package, addressable by name: (the module global holding its folder, how to train it).
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "shapes": ("DEFAULT_MODEL_DIR", "docs/default_model.md"),
    "shapes-video": ("VIDEO_MODEL_DIR", "omnidit train configs/shapes_video.json, docs/video_model.md"),
    "shapes-av": ("AV_MODEL_DIR", "omnidit train configs/shapes_av.json, docs/av_model.md"),
    "shapes-turbo": ("TURBO_MODEL_DIR", "omnidit distill, docs/distillation.md"),
    "shapes-video-turbo": ("VIDEO_TURBO_MODEL_DIR", "omnidit distill shapes-video OUT --recipe "
                                                    "configs/recipes/video_turbo.json, docs/distillation.md"),
    "shapes-layout": ("LAYOUT_MODEL_DIR", "omnidit train configs/layout.json, docs/editing.md#layout-boxes"),
    "shapes-guided": ("GUIDED_MODEL_DIR", "omnidit distill shapes OUT --method guidance, docs/distillation.md"),
    "shapes-inpaint": ("INPAINT_MODEL_DIR", "omnidit train configs/inpaint_lora.json, docs/editing.md"
                                            "#shapes-inpaint-the-same-training-as-an-adapter-on-the-shipped-model"),
}
PROVENANCE_FILE = "provenance.json"  # written by export_for_inference: the source step and images seen


def _cpu_contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(directory: str | Path, config: Config, model_state: dict[str, Tensor],
                    ema_state: dict[str, Tensor] | None = None, state_tensors: dict[str, Tensor] | None = None,
                    state_meta: dict | None = None) -> Path:
    """Write a checkpoint folder atomically: into ``NAME.tmp`` first, then renamed into place.

    A crash while writing leaves any earlier checkpoint untouched. Returns the folder.
    """
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": FORMAT, "omnidit_version": __version__, **config.to_dict()}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_file(_cpu_contiguous(model_state), str(tmp / "model.safetensors"))
    if os.environ.get(SAVE_DELAY_ENV):  # test hook: hold the write open so a test can kill it
        time.sleep(float(os.environ[SAVE_DELAY_ENV]))
    if ema_state is not None:
        save_file(_cpu_contiguous(ema_state), str(tmp / "ema.safetensors"))
    if state_tensors is not None or state_meta is not None:
        (tmp / "training_state").mkdir()
        save_file(_cpu_contiguous(state_tensors or {}), str(tmp / "training_state" / "state.safetensors"))
        (tmp / "training_state" / "state.json").write_text(json.dumps(state_meta or {}, indent=2) + "\n")
    return publish_folder(tmp, final)


def publish_folder(tmp: Path, final: Path) -> Path:
    """Make a fully written ``tmp`` folder visible as ``final`` in one rename (after an fsync).

    Readers see either the old ``final`` or the new one, never a half-written folder; a crash before
    the rename leaves ``tmp`` behind, which listings ignore.
    """
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (half-written ``.tmp`` ones are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
             and (p / "config.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints of a run."""
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def named_model_path(path: str | Path) -> Path:
    """``path``, or the shipped model's folder where ``path`` is a shipped model's name (``SHIPPED_MODELS``:
    shapes, shapes-video, shapes-av, shapes-turbo, shapes-video-turbo, shapes-layout, shapes-guided,
    shapes-inpaint) and no folder of that name exists."""
    if str(path) in SHIPPED_MODELS and not Path(path).exists():
        return shipped_model_dir(str(path))
    return Path(path)


def resolve_model_dir(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (meaning its latest checkpoint), or a shipped model's name
    (``named_model_path``)."""
    path = named_model_path(path)
    if not path.exists():
        raise OmniditError(f"model folder not found: {path}",
                           hint="pass a folder written by 'omnidit train' (or one of its checkpoint-* folders)")
    if (path / "config.json").is_file():
        return path
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1]
    if path.is_dir() and any(p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) for p in path.iterdir()):
        raise OmniditError(f"{path} holds no complete checkpoint (its checkpoint-* folders are half-written or "
                           "have no config.json)",
                           hint="resume the run to write one, or pass a complete checkpoint folder")
    raise OmniditError(f"{path} is not an omnidit model folder (no config.json and no checkpoint-* inside)",
                       hint="pass a folder written by 'omnidit train'")


def default_model_dir() -> Path:
    """The shipped shapes model's folder, with a one-line error if this installation lacks it."""
    return shipped_model_dir("shapes")


def shipped_model_dir(name: str) -> Path:
    """The folder of a model shipped inside the package, by name, with a one-line error if it is missing."""
    variable, recipe = SHIPPED_MODELS[name]
    folder = globals()[variable]  # looked up at call time, so that tests can point it elsewhere
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        what = "default model" if name == "shapes" else f"shipped model '{name}'"
        raise OmniditError(f"the {what} is missing from this installation ({folder})",
                           hint=f"reinstall omnidit (pip install -e .), train it ({recipe}), or pass --model RUN_DIR")
    return folder


def weights_file(directory: Path, use_ema: bool = True) -> Path:
    """The weights a checkpoint folder should be loaded from: the EMA ones when asked for and present."""
    ema = directory / "ema.safetensors"
    return ema if use_ema and ema.is_file() else directory / "model.safetensors"


def export_for_inference(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16,
                         use_ema: bool = True) -> Path:
    """Write the smallest folder that sampling loads: config.json and model.safetensors holding the EMA
    (or raw) weights of ``src`` cast to ``dtype``, plus provenance.json (``training_provenance``: the
    step it was trained to, the images seen); no raw-weight copy, no optimizer state.

    float16 halves the file (the shipped default model is stored this way); loading casts the weights
    back to the model's float32 parameters, and evaluation scores are measured on the exported folder.
    """
    directory = resolve_model_dir(src)
    config = read_config(directory)
    file = weights_file(directory, use_ema)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in read_safetensors(file).items()}
    out = save_checkpoint(dst, config, state)
    provenance = {**training_provenance(directory), "weights": file.name, "dtype": str(dtype).removeprefix("torch.")}
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def training_provenance(model_dir: str | Path) -> dict:
    """{"step", "images_seen"} of a checkpoint or exported folder (None where unknown), plus "init_from"
    for a fine-tuned run: the folder it started from, and that folder's own step and images seen.
    ``images_seen`` counts the whole history: this run's steps x batch plus the starting model's."""
    directory = Path(model_dir)
    if (directory / PROVENANCE_FILE).is_file():
        meta = read_json(directory / PROVENANCE_FILE, "provenance")
        return {k: meta[k] for k in ("step", "images_seen", "init_from") if k in meta}
    state = directory / "training_state" / "state.json"
    meta = read_json(state, "checkpoint metadata") if state.is_file() else {}
    step, source = meta.get("step"), meta.get("init_from")
    seen = None if step is None else step * read_config(directory).train.batch_size
    if seen is not None and source:
        seen = None if source.get("images_seen") is None else seen + source["images_seen"]
    return {"step": step, "images_seen": seen, **({"init_from": source} if source else {})}


def read_step(model_dir: str | Path) -> int | None:
    """The training step a checkpoint (or exported) folder was saved at, or None if it does not say."""
    return training_provenance(model_dir).get("step")


def read_config(model_dir: str | Path) -> Config:
    """The Config stored in a checkpoint folder's config.json."""
    d = read_json(Path(model_dir) / "config.json", "checkpoint config")
    if d.pop("format", None) != FORMAT:
        raise OmniditError(f"{model_dir}/config.json is not an omnidit checkpoint config (format {FORMAT} expected)")
    d.pop("omnidit_version", None)
    return config_from_dict(d)


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file with a one-line error for a missing or corrupt file."""
    if not path.is_file():
        raise OmniditError(f"missing checkpoint file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise OmniditError(f"checkpoint file {path} is corrupt or not a safetensors file ({e})",
                           hint="re-save the checkpoint or pick an earlier one") from None


def load_state_into(model: torch.nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Strict load with errors that name the file and the first offending key."""
    check_state_matches(model, state, source)
    model.load_state_dict(state, strict=True)


def load_adapter_base(model: torch.nn.Module, config: Config) -> dict:
    """Adapter runs (LoRA, layout): load train.init_from's weights into ``model`` (before the adapter is added) and
    return their provenance, which every checkpoint keeps, as for train.init_from."""
    directory, state = initial_weights(config.train.init_from, config)
    model.load_state_dict(state, strict=True)
    source = {"folder": str(config.train.init_from), **training_provenance(directory)}
    source.pop("init_from", None)
    return source


def load_adapter_only(model: torch.nn.Module, state: dict[str, Tensor], expected: dict[str, Tensor], source: Path,
                      what: str, hint: str) -> None:
    """Load an adapter-only checkpoint's ``state`` into ``model`` when its keys are exactly ``expected``'s (the
    adapter's entries of the model's state dict); else a one-line error naming ``what`` and the first bad key."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise OmniditError(f"{source} does not hold the {what} that config.json describes: {first}", hint=hint)
    model.load_state_dict(state, strict=False)


def check_state_matches(model: torch.nn.Module, state: dict[str, Tensor], source: Path,
                        skip: tuple[str, ...] = ()) -> None:
    """Raise a one-line error naming ``source`` and the first key that is missing, unexpected or of
    the wrong shape; ``model`` may live on the meta device. ``skip``: submodules (dotted names) left out of the
    comparison, e.g. layers already built from the file."""
    prefixes = tuple(f"{name}." for name in skip)
    expected = {k: v for k, v in model.state_dict().items() if not prefixes or not k.startswith(prefixes)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise OmniditError(f"{source} does not match the model in config.json: {first} "
                           f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise OmniditError(f"{source}: key '{k}' has shape {tuple(v.shape)}, the model expects "
                               f"{tuple(expected[k].shape)}")


def check_growable(a: MMDiTConfig, b: MMDiTConfig, hint: str) -> None:
    """Raise a clear error unless a model of config ``a`` can grow into ``b`` by ``deepen_state``: only added blocks,
    and none where a block's own layout depends on its index (the last double block of a model without
    single-stream blocks, whose text branch is pre-only; SD3.5's dual-attention blocks)."""
    if b.depth < a.depth or b.depth_single < a.depth_single or (a.depth_single == 0 < b.depth_single):
        raise OmniditError(
            f"blocks can only be added: the source has {a.depth} double- and {a.depth_single} single-stream "
            f"blocks, this config {b.depth} and {b.depth_single} (and a source needs at least one single-stream "
            "block to grow more)", hint=hint)
    if (a.depth, a.depth_single) != (b.depth, b.depth_single) and (a.dual_attention_layers or a.depth_single == 0):
        raise OmniditError("this model cannot grow: its blocks differ by index (dual-attention layers, or a last "
                           "double block whose text only gives keys and values)", hint=hint)


def deepen_state(state: dict[str, Tensor], a: MMDiTConfig, b: MMDiTConfig,
                 fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights for a model of config ``b`` made from ``state``, the weights of a model of config ``a``
    that differs only in having fewer double- or single-stream blocks (``train.init_grow``). Old block i
    of n goes to index floor(i * m / n) of m; the other blocks keep their weights from ``fresh`` (a newly
    initialised ``b`` model), whose zeroed adaLN modulation makes each of them the identity, so the deeper
    model computes exactly what the shallow one did until training opens their gates (a
    function-preserving growth, as in Net2Net, Chen et al. 2016). The other model settings must be equal
    (``initial_weights`` checks them)."""
    check_growable(a, b, hint="make this config's model.depth and model.depth_single at least the source's, "
                              "or drop train.init_grow")
    moves = {}
    for name, n, m in (("double_blocks", a.depth, b.depth), ("single_blocks", a.depth_single, b.depth_single)):
        moves.update({f"{name}.{i}.": f"{name}.{i * m // n}." for i in range(n)})
    grown = dict(fresh)
    for key, value in state.items():
        prefix = next((p for p in moves if key.startswith(p)), "")
        grown[moves[prefix] + key[len(prefix):] if prefix else key] = value
    return grown


def weight_differences(source: Config, config: Config, ignore: Sequence[str] = (), there: str = "there"
                       ) -> list[str]:
    """What makes ``source``'s weights meaningless for ``config``: each differing model key (but ``ignore``), text
    encoder, text length or latent codec, as "key: A there, B here"."""
    diff = [f"model.{k}: {v} {there}, {getattr(config.model, k)} here"
            for k, v in vars(source.model).items() if getattr(config.model, k) != v and k not in ignore]
    pairs = [("text.encoder", source.text.encoder, config.text.encoder),
             ("text.max_length", source.text.max_length, config.text.max_length),
             ("data.codec", source.data.codec, config.data.codec)]
    if "audio" in source.model.extra_streams and "audio" in config.model.extra_streams:  # the sound's latent space
        pairs.append(("data.audio_codec", _sound_codec(source), _sound_codec(config)))
    return diff + [f"{name}: {a} {there}, {b} here" for name, a, b in pairs if a != b]


def _sound_codec(config: Config) -> str:
    """The sound codec of a config as a comparable name (the spectrogram's hop is part of it)."""
    dc = config.data
    return f"spectrogram (hop {dc.audio_hop})" if dc.audio_codec == "spectrogram" else dc.audio_codec


def initial_weights(path: str | Path, config: Config) -> tuple[Path, dict[str, Tensor]]:
    """``train.init_from``: (the model folder used, its EMA weights in fp32, or the raw ones when it has no
    EMA) for a model of ``config``, deepened with ``deepen_state`` under ``train.init_grow``. Every
    mismatch of architecture, text encoder or latent space is one clear error."""
    try:
        directory = resolve_model_dir(path)
    except OmniditError as e:
        raise OmniditError(f"train.init_from={path}: {e.message}",
                           hint="train that model first (e.g. omnidit train configs/recipes/shapes/shapes.json), "
                                "or point train.init_from at a run, checkpoint-* or exported model folder") from None
    source = read_config(directory)
    # The weights only make sense with the same architecture, text encoder and latent space.
    grow = ("depth", "depth_single") if config.train.init_grow else ()  # deepen_state checks those
    # The rotary time scale shapes no weight: an image model (every token at time 0) fine-tunes into a video
    # model of the same token size.
    grow += ("rope_time_scale",)
    # A distillation student learns to take the guidance scale as an input (omnidit.distill_train): its guidance
    # embedding starts with a zero output, so that it begins as the teacher's conditional model.
    new_guidance = config.model.guidance_embed and not source.model.guidance_embed
    if new_guidance:
        grow += ("guidance_embed",)
    # A model may gain streams (a video model learning sound): the new streams' weights start fresh. Its sound
    # tokens may also grow by a whole number of frames (widen_sound_tokens).
    new_streams = [n for n in config.model.extra_streams if n not in source.model.extra_streams]
    wider = _sound_token_growth(source, config)
    if all(config.model.extra_streams.get(n) == d or n == "audio" and wider > 1
           for n, d in source.model.extra_streams.items()):
        grow += ("extra_streams",)
    diff = weight_differences(source, config, ignore=grow)
    if diff:
        raise OmniditError(f"train.init_from={path} holds a model trained differently ({'; '.join(diff)})",
                           hint="use that folder's settings in this config, or drop train.init_from")
    file = weights_file(directory)
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_safetensors(file).items()}
    with torch.device("meta"):  # shapes only: clear errors for missing, extra or misshapen keys
        check_state_matches(MMDiT(source.model), state, file)
    deeper = (source.model.depth, source.model.depth_single) != (config.model.depth, config.model.depth_single)
    if deeper or new_streams:
        with torch.random.fork_rng(devices=[]):  # the new weights: the same on every rank
            torch.manual_seed(config.train.seed)
            fresh = MMDiT(config.model).state_dict()
        state = {**{k: v for k, v in fresh.items() if _stream_key(k, new_streams)}, **state}
        if deeper:
            state = deepen_state(state, source.model, config.model, fresh)
    if wider > 1:
        state = widen_sound_tokens(state, wider, load_audio_codec(config.data).channels)
    if new_guidance:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            embed = MLPEmbedder(TIME_EMBED_DIM, config.model.hidden_size)
            nn.init.normal_(embed.in_layer.weight, std=0.02)
            nn.init.zeros_(embed.out_layer.weight)
            nn.init.zeros_(embed.out_layer.bias)
        state.update({f"guidance_in.{k}": v.detach() for k, v in embed.state_dict().items()})
    return directory, state


def _sound_token_growth(source: Config, config: Config) -> int:
    """How many of ``source``'s sound tokens one of ``config``'s spans: m > 1 when config's audio tokens are m times
    as wide with the same sound codec, else 1."""
    old, new = source.model.extra_streams.get("audio"), config.model.extra_streams.get("audio")
    same_codec = _sound_codec(source) == _sound_codec(config)
    return new // old if old and new and new > old and new % old == 0 and same_codec else 1


def widen_sound_tokens(state: dict[str, Tensor], m: int, channels: int) -> dict[str, Tensor]:
    """Weights of ``state``'s audio stream for tokens m times as long (m consecutive old tokens in one), as
    FlexiViT resizes a patch embedding: the input projection reads the mean of the m old tokens' embeddings
    and the output layer writes its old prediction into each of them, so a clip whose m old tokens in each new
    one are alike gets the old model's embeddings and outputs. Token features are (channels, frames), frames
    fastest (``tokens.audio_patchify``), so the old (c, k) weights are repeated as (c, m, k)."""
    def wide(weight: Tensor, dim: int) -> Tensor:  # the feature axis ``dim`` of (c * k) -> (c * m * k)
        shape = weight.shape
        split = weight.unflatten(dim, (channels, 1, shape[dim] // channels))
        return split.expand(*split.shape[:dim + 1], m, *split.shape[dim + 2:]).flatten(dim, dim + 2).clone()

    out = dict(state)
    out["stream_in.audio.weight"] = wide(state["stream_in.audio.weight"], 1) / m
    out["stream_out.audio.linear.weight"] = wide(state["stream_out.audio.linear.weight"], 0)
    out["stream_out.audio.linear.bias"] = wide(state["stream_out.audio.linear.bias"], 0)
    return out


def _stream_key(key: str, names: Sequence[str]) -> bool:
    """Whether a parameter name belongs to one of the extra streams ``names`` (its projections or block branch)."""
    parts = key.split(".")
    return (parts[0] in ("stream_in", "stream_out") and parts[1] in names
            or "streams" in parts and parts[parts.index("streams") + 1] in names)


def load_model(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> tuple[MMDiT, Config]:
    """Build the model from a checkpoint folder and load its (EMA, if present) weights; eval mode."""
    directory = resolve_model_dir(path)
    config = read_config(directory)
    file = weights_file(directory, use_ema)
    from omnidit.quantize import load_quantized, read_scheme

    scheme = read_scheme(directory)
    if scheme is not None:  # an omnidit quantize folder: int8 layers or bf16 compute
        return load_quantized(directory, config, scheme, torch.device(device)).to(device).eval() \
            .requires_grad_(False), config
    if config.train.lora_rank:  # a LoRA run's checkpoint holds the adapter; the base is train.init_from's
        from omnidit.lora import merged_lora_model

        model = merged_lora_model(_shipped_base(config, directory), read_safetensors(file), file)
    elif config.train.layout_boxes:  # a layout run's checkpoint: the adapter, on train.init_from's model
        from omnidit.layout import layout_model

        model = layout_model(_shipped_base(config, directory), read_safetensors(file), file)
    else:
        model = MMDiT(config.model)
        load_state_into(model, read_safetensors(file), file)
    return model.to(device).eval().requires_grad_(False), config


def load_lora_base(path: str | Path, device: str | torch.device = "cpu") -> MMDiT:
    """A LoRA run's base alone: train.init_from's weights as its training started from them, in eval mode
    (sample.uncond_base's unconditional model)."""
    directory = resolve_model_dir(path)
    config = _shipped_base(read_config(directory), directory)
    model = MMDiT(config.model)
    load_adapter_base(model, config)
    return model.to(device).eval().requires_grad_(False)


def _shipped_base(config: Config, directory: Path) -> Config:
    """An adapter shipped in the package sits on the shipped model its train.init_from names, even where the
    working directory holds a folder of that name (which resolve_model_dir would take first)."""
    name = config.train.init_from
    shipped = {globals()[variable].resolve() for variable, _ in SHIPPED_MODELS.values()}
    if name not in SHIPPED_MODELS or directory.resolve() not in shipped:
        return config
    return replace(config, train=replace(config.train, init_from=str(shipped_model_dir(name))))


def load_training_state(directory: str | Path) -> tuple[dict[str, Tensor], dict]:
    """The resume state of a checkpoint folder: (tensors, JSON metadata)."""
    state_dir = Path(directory) / "training_state"
    tensors = read_safetensors(state_dir / "state.safetensors")
    meta = read_json(state_dir / "state.json", "training state")
    return tensors, meta


def optimizer_state_to_flat(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """Split a torch optimizer state_dict into safetensors-able tensors and JSON-able metadata.

    Parameters may be keyed by index (``optimizer.state_dict()``) or by name (the full state dicts of
    ``torch.distributed.checkpoint``); names hold dots but never '/', hence the separator.
    """
    tensors, scalars = {}, {}
    for pid, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{pid}/{name}"] = value
            else:
                scalars[f"{pid}/{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _param_key(pid: str) -> int | str:
    return int(pid) if pid.isdigit() else pid


def optimizer_state_from_flat(tensors: dict[str, Tensor], meta: dict) -> dict:
    """Inverse of ``optimizer_state_to_flat``."""
    state: dict[int | str, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(_param_key(pid), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        pid, name = key.rsplit("/", 1)
        state.setdefault(_param_key(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
