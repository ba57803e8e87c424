"""Quantized model folders that sampling loads directly: real int8 and bf16 compute, no simulated speed.

Schemes (``omnidit quantize MODEL OUT --scheme ...``):

- ``w8a8``: the transformer blocks' linear layers run as dynamic int8 (weights int8 per output channel,
  activations quantized per token at each call, products summed in int32 by ``torch._int_mm``: VNNI on x86) with
  Inductor fusing the quantization (``Int8Linear``); CPUs only. A token's output does not depend on its batch.
  The folder stores each such weight as int8 with its float32 scale per row (``{layer}.weight`` and
  ``{layer}.weight_scale``); everything else stays float32. With ``smooth`` α (SmoothQuant's channel balancing,
  as ViDiT-Q uses for DiTs), a calibration run records each input channel's largest activation |X_j| and the
  layer is stored as W diag(s) with s_j = max|X_j|^α / max|W_j|^(1-α) (``{layer}.smooth``), its input divided
  by s at each call: channels whose activations are outliers no longer set the scale of every activation.
- ``bf16``: every weight stored in bfloat16 and sampling run under bfloat16 autocast (AVX-512 BF16 / AMX on CPUs,
  tensor cores on GPUs); half the file.
- ``fp8``: the blocks' per-token linears (as w8a8's) run in float8 e4m3: weights stored per output row with a
  float32 scale (largest |w| of the row to 448, e4m3's largest value), activations scaled per token at each call,
  the product by ``torch._scaled_mm`` (fp8 tensor cores on GPUs of compute capability 8.9 and up: Ada, Hopper;
  torch's CPU kernel elsewhere, which computes the same fp8 products without fp8 hardware and is slower than
  float32: for checking a folder before a GPU runs it, not for speed).
- ``w8`` / ``w4``: weight-only, for memory on any device: all the blocks' linear weights (modulation layers
  included) stay int8 per output row (``w8``) or int4 per group of ``group_size`` inputs with a float32 scale
  per group (``w4``, two values packed per byte), and each call dequantizes them into the compute dtype, so a
  call costs a little more than float, never less. With ``rotate`` each group of inputs is rotated by an
  orthonormal Hadamard matrix H before quantizing (W H quantized; the activations multiplied by H at each call,
  since x Wᵀ = (x H)(W H)ᵀ): an outlier weight is spread over its group, so it no longer sets the scale of all
  the others (the rotation of QuaRot / LRQ-DiT, here block-diagonal within each quantization group).

A quantized folder is a model folder (config.json, model.safetensors) plus ``quantization.json`` naming the
scheme; ``checkpoint.load_model`` reads it. A layout adapter's folder is quantized with its base: the base's block
linears as above, the adapter's own (small) layers kept in float (bfloat16 with ``bf16``), all in one folder that
needs no base beside it. Speed and quality against float32 are measured side by side in one
run by ``benchmarks/quantize.py``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from omnidit.errors import OmniditError
from omnidit.model.layers import INVARIANT_ROWS, cpu_float_inference, linear, padded_rows

if TYPE_CHECKING:
    from omnidit.config import Config
    from omnidit.pipeline import Pipeline

SCHEMES = ("w8a8", "bf16", "fp8", "w8", "w4")
WEIGHT_ONLY = ("w8", "w4")
QUANTIZATION_FILE = "quantization.json"
# The blocks' per-token linears hold nearly all FLOPs; the modulation layers (mod.lin) act once per sample, not
# per token, so int8 compute gains nothing there and they stay float in w8a8. They do hold a third or more of the
# weights, so the weight-only schemes, which are for memory, take them too.
BLOCK_LINEARS = r"(double_blocks|single_blocks)\..*(?<!\.mod\.lin)"
BLOCK_LINEARS_WITH_MODULATION = r"(double_blocks|single_blocks)\..*"


def _block_linears(model: nn.Module, modulation: bool = False) -> dict[str, nn.Linear]:
    pattern = BLOCK_LINEARS_WITH_MODULATION if modulation else BLOCK_LINEARS
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)}


def row_scales(rows: Tensor, top: float) -> Tensor:
    """float32 scales (N, 1) that map each row's largest |value| of ``rows`` (N, K) to ``top``."""
    return rows.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top


def int8_rows(rows: Tensor, scale: Tensor) -> Tensor:
    """``rows`` (N, K) divided by their ``scale`` (N, 1), rounded to int8 in [-127, 127]."""
    return torch.round(rows.float() / scale).clamp(-127, 127).to(torch.int8)


def int8_per_row(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output row: (int8 values like weight, float32 scales (out,)); weight ~= values * scale."""
    scale = row_scales(weight, 127)
    return int8_rows(weight, scale), scale[:, 0]


FP8_MAX = 448.0  # float8 e4m3fn's largest finite value


def fp8_per_row(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Float8 e4m3 per output row: (float8_e4m3fn values like weight, float32 scales (out,)); weight ~= values *
    scale, each row's largest |w| stored as 448."""
    scale = row_scales(weight, FP8_MAX)
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale[:, 0]


def int4_per_group(weight: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Symmetric int4 per group of ``group`` inputs: (uint8 (out, in // 2), two values in [-7, 7] per byte, low
    nibble first; float32 scales (out, in // group)); weight ~= values * scale of their group."""
    rows = weight.float().unflatten(1, (-1, group))  # (out, groups, group)
    scale = rows.abs().amax(dim=2).clamp_min(1e-12) / 7
    values = (torch.round(rows / scale[..., None]).clamp(-7, 7).to(torch.int16) + 8).flatten(1)  # 1..15
    return (values[:, 0::2] | (values[:, 1::2] << 4)).to(torch.uint8), scale


def unpack_int4(packed: Tensor, scale: Tensor) -> Tensor:
    """``int4_per_group``'s output, packed uint8 (out, in // 2) and scales (out, groups), back to a float32
    weight (out, in)."""
    low, high = (packed & 15).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    values = torch.stack((low, high), dim=2).flatten(1).float()  # (out, in)
    return (values.unflatten(1, (scale.shape[1], -1)) * scale[..., None]).flatten(1)


@functools.lru_cache(maxsize=16)
def hadamard(n: int) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of 2): symmetric, H H = I."""
    if n < 1 or n & (n - 1):
        raise OmniditError(f"a Hadamard rotation needs a power-of-2 size, got {n}", hint="e.g. --group-size 64")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n ** 0.5


def rotate_groups(x: Tensor, group: int, h: Tensor | None = None) -> Tensor:
    """x (..., in) with each run of ``group`` features multiplied by ``hadamard(group)`` (or ``h``, that matrix
    already on x's device)."""
    return (x.unflatten(-1, (-1, group)) @ (hadamard(group) if h is None else h).to(x.dtype)
            .to(x.device)).flatten(-2)


class WeightOnlyLinear(nn.Module):
    """A linear layer whose weight is kept int8 per row (``bits`` 8) or packed int4 per group (``bits`` 4) and
    dequantized into the input's dtype at each call; ``rotate``: the weight was quantized as W H (per group), so
    the input is rotated by H first. x: (..., in) -> (..., out)."""

    def __init__(self, values: Tensor, scale: Tensor, bias: Tensor | None, bits: int, group: int | None = None,
                 rotate: bool = False) -> None:
        super().__init__()
        self.bits, self.group, self.rotate = bits, group, rotate
        self.in_features = values.shape[1] * (2 if bits == 4 else 1)
        self.out_features = values.shape[0]
        self.register_buffer("values", values)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        # The rotation lives with the layer (moved with .to(device), not rebuilt per call); not saved.
        self.register_buffer("rotation", hadamard(group).clone() if rotate else None, persistent=False)

    @property
    def weight(self) -> Tensor:
        """The effective float weight (out, in), dequantized on each access (and un-rotated)."""
        weight = self.dequantized()
        return rotate_groups(weight, self.group, self.rotation) if self.rotate else weight

    def dequantized(self) -> Tensor:
        """The stored weight as float32 (out, in): W H per group when ``rotate``."""
        if self.bits == 4:
            return unpack_int4(self.values, self.scale)
        return self.values.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if self.rotate:
            x = rotate_groups(x, self.group, self.rotation)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.dequantized().to(x.dtype), bias)  # rows independent of their batch, as nn.Linear's


class RowScaledLinear(nn.Module):
    """What the per-token compute layers share: the weight (out, in) stored as low-precision ``values`` with a
    float32 ``scale`` per output row, and a float32 bias; subclasses compute the product."""

    def __init__(self, values: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = values.shape[1], values.shape[0]
        self.register_buffer("values", values)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @property
    def weight(self) -> Tensor:
        """The effective float32 weight (out, in)."""
        return self.values.float() * self.scale[:, None]


class Fp8Linear(RowScaledLinear):
    """A linear layer computed in float8 e4m3: the weight (out, in) stored as ``fp8_per_row`` values and scales,
    each call's input scaled per token to e4m3 and multiplied by ``torch._scaled_mm`` with both scales applied to
    its float32 accumulators. x: (..., in) -> (..., out) in x's dtype. On CUDA the product comes out in bfloat16
    (what ``_scaled_mm``'s per-row scaling gives there) and is cast back."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()
        count = len(rows)
        if not count:  # no tokens: nothing to multiply (the kernel refuses an empty scale)
            return x.new_zeros(*x.shape[:-1], self.out_features)
        # As layers.linear: few rows take other CPU kernels. The zero rows get a tiny scale, which does no harm.
        if count < INVARIANT_ROWS and cpu_float_inference(rows):
            rows = padded_rows(rows)
        x_scale = row_scales(rows, FP8_MAX)  # (M, 1): one scale per token, so a row does not depend on its batch
        x8 = (rows / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
        out = torch._scaled_mm(x8, self.values.t(), scale_a=x_scale, scale_b=self.scale[None, :],
                               out_dtype=out_dtype).float()
        if self.bias is not None:
            out = out + self.bias
        return out[:count].to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def check_fp8_device(model: nn.Module, device: torch.device) -> None:
    """One-line errors for an fp8 folder on a device that cannot compute it: a GPU below compute capability 8.9,
    or layers whose sizes its fp8 kernels cannot take (multiples of 16)."""
    if device.type == "cpu":
        try:  # torch releases before CPU fp8 matmuls raise here
            probe = torch.ones(16, 16).to(torch.float8_e4m3fn)
            torch._scaled_mm(probe, probe.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                             out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError, AttributeError) as error:
            raise OmniditError(f"this torch ({torch.__version__}) cannot compute fp8 on a CPU: {error}".split("\n")[0],
                               hint="install a newer torch, or use --scheme w8a8 on a CPU") from None
        return
    capable = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)
    if not capable:
        raise OmniditError(f"fp8 needs a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper) or a CPU, "
                           f"not {device}", hint="use --scheme bf16 on this device")
    bad = [n for n, m in _block_linears(model).items() if m.in_features % 16 or m.out_features % 16]
    if bad:
        raise OmniditError(f"fp8 on a GPU needs layer sizes that are multiples of 16; {bad[0]} is "
                           f"{model.get_submodule(bad[0]).in_features} -> {model.get_submodule(bad[0]).out_features}",
                           hint="use --scheme bf16 for this model")


def weight_only(weight: Tensor, scheme: str, group: int, rotate: bool) -> tuple[Tensor, Tensor]:
    """(stored values, scales) of one linear weight (out, in) under ``w8`` or ``w4``."""
    if rotate:
        weight = rotate_groups(weight.float(), group)
    return int4_per_group(weight, group) if scheme == "w4" else int8_per_row(weight)


def check_weight_only(model: nn.Module, scheme: str, group: int, rotate: bool) -> None:
    """One-line errors for options the model's layers cannot take."""
    if scheme not in WEIGHT_ONLY:
        if rotate:
            raise OmniditError(f"--rotate applies to the weight-only schemes (w8, w4), not {scheme}",
                               hint="drop --rotate or use --scheme w4")
        return
    if scheme == "w4" or rotate:
        if group < 2 or group & (group - 1):
            raise OmniditError(f"--group-size must be a power of 2 (>= 2), got {group}", hint="e.g. 64")
        bad = [n for n, m in _block_linears(model, modulation=True).items() if m.in_features % group]
        if bad:
            raise OmniditError(f"--group-size {group} does not divide the inputs of {bad[0]} "
                               f"({model.get_submodule(bad[0]).in_features})", hint="choose a smaller power of 2")


SMOOTH_STEPS = 8  # sampling steps of the smoothing calibration run (4 captions, one candidate)


def activation_maxima(model: nn.Module, config: Config, names: list[str]) -> dict[str, Tensor]:
    """Each named linear's largest |input| per input channel (in,) over one sampling run of 4 of the model's
    own captions (``omnidit calibrate``'s), every step and guidance branch included."""
    from omnidit.calibrate_command import calibration_prompts
    from omnidit.pipeline import build_pipeline

    maxima: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module, args) -> None:
            seen = args[0].detach().abs().flatten(0, -2).amax(dim=0).float()
            maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        build_pipeline(model.eval(), config).generate(calibration_prompts(config, 4), seed=0, steps=SMOOTH_STEPS,
                                                      candidates=1)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smoothing_factors(act_max: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's s (in,): max|X_j|^α / max_i |W_ij|^(1-α), so that X / s and W s share the range."""
    w_max = weight.float().abs().amax(dim=0).clamp_min(1e-5)
    return (act_max.clamp_min(1e-5) ** alpha / w_max ** (1 - alpha)).clamp(1e-4, 1e4)


class SmoothedLinear(nn.Module):
    """``layer`` (an ``Int8Linear`` holding W diag(s)) with its input divided by ``smooth`` (s, (in,)) first:
    x (..., in) -> (..., out)."""

    def __init__(self, layer: nn.Module, smooth: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("smooth", smooth.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x / self.smooth.to(x.dtype))


def quantize_folder(src: str | Path, dst: str | Path, scheme: str, use_ema: bool = True, group: int = 64,
                    rotate: bool = False, smooth: float | None = None) -> Path:
    """Write the model at ``src`` as a ``scheme`` folder at ``dst`` (safetensors and JSON); returns it.
    ``group`` and ``rotate``: the weight-only schemes' group size (w4; and the rotation's block) and Hadamard
    rotation; ``smooth``: w8a8's channel balancing α in (0, 1) (a calibration run of the model first)."""
    from omnidit.checkpoint import (
        PROVENANCE_FILE,
        load_model,
        resolve_model_dir,
        save_checkpoint,
        training_provenance,
    )

    if scheme not in SCHEMES:
        raise OmniditError(f"unknown quantization scheme '{scheme}'", hint=f"choose one of {', '.join(SCHEMES)}")
    directory = resolve_model_dir(src)
    if (directory / QUANTIZATION_FILE).is_file():
        raise OmniditError(f"{directory} is already quantized", hint="quantize the float model it was made from")
    if smooth is not None and (scheme != "w8a8" or not 0 < smooth < 1):
        raise OmniditError(f"--smooth is w8a8's channel balancing, an alpha in (0, 1); got {smooth} with {scheme}",
                           hint="e.g. --scheme w8a8 --smooth 0.5")
    model, config = load_model(directory, use_ema=use_ema)
    check_weight_only(model, scheme, group, rotate)
    maxima = activation_maxima(model, config, list(_block_linears(model))) if smooth else {}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if scheme == "bf16":
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    else:
        for name in _block_linears(model, modulation=scheme in WEIGHT_ONLY):
            weight = state[f"{name}.weight"]
            if name in maxima:  # X W^T = (X / s)(W s)^T
                state[f"{name}.smooth"] = smoothing_factors(maxima[name], weight, smooth)
                weight = weight.float() * state[f"{name}.smooth"]
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = (
                int8_per_row(weight) if scheme == "w8a8" else fp8_per_row(weight) if scheme == "fp8"
                else weight_only(weight, scheme, group, rotate))
    out = save_checkpoint(dst, config, state)
    provenance = training_provenance(directory)
    (out / PROVENANCE_FILE).write_text(json.dumps({**provenance, "quantized": scheme}, indent=2) + "\n")
    about = {"scheme": scheme, "source": str(directory)}
    if smooth:
        about["smooth"] = smooth
    if scheme in WEIGHT_ONLY:
        about.update(group_size=group if scheme == "w4" or rotate else None, rotate=rotate)
    (out / QUANTIZATION_FILE).write_text(json.dumps(about, indent=2) + "\n")
    return out


def read_scheme(directory: Path) -> str | None:
    """The folder's quantization scheme, or None for a float model."""
    about = read_quantization(directory)
    return None if about is None else about["scheme"]


def read_quantization(directory: Path) -> dict | None:
    """The folder's quantization.json (scheme and options), checked; None for a float model."""
    from omnidit.config import read_json

    path = directory / QUANTIZATION_FILE
    if not path.is_file():
        return None
    about = read_json(path, "quantization")
    if about.get("scheme") not in SCHEMES:
        raise OmniditError(f"{path} names an unknown scheme '{about.get('scheme')}'",
                           hint=f"one of {', '.join(SCHEMES)}")
    return about


def load_quantized(directory: Path, config, scheme: str, device: torch.device) -> nn.Module:
    """The model of a quantized folder, ready to sample (eval mode, no grad). The model is built on the meta
    device and each layer takes the file's tensors as they are, so no float copy of the quantized weights is ever
    made: w8a8, fp8, w8 and w4 load in about the file's size of memory (a float32 build first would need four to eight
    times); bf16 computes with float32 weights under autocast, so it needs twice its file."""
    from omnidit.checkpoint import check_state_matches, read_safetensors
    from omnidit.model import MMDiT

    file = directory / "model.safetensors"
    state = read_safetensors(file)
    with torch.device("meta"):
        model = MMDiT(config.model)
        if config.train.layout_boxes:  # a layout model's folder holds its base and its adapter; the adapter is float
            from omnidit.layout import add_layout_adapter

            add_layout_adapter(model, config.train.layout_boxes)
    if scheme == "w8a8" and torch.device(device).type != "cpu":
        raise OmniditError("w8a8 runs on CPUs (int8 products on x86)", hint="use --scheme bf16 on a GPU")
    if scheme == "fp8":
        check_fp8_device(model, torch.device(device))
    linears = {} if scheme == "bf16" else _block_linears(model, modulation=scheme in WEIGHT_ONLY)
    about = read_quantization(directory)
    for name, meta in linears.items():
        values, scale = _take(state, f"{name}.weight", file), _take(state, f"{name}.weight_scale", file)
        bias = _take(state, f"{name}.bias", file) if meta.bias is not None else None
        smooth = state.pop(f"{name}.smooth", None)
        columns = meta.in_features // 2 if scheme == "w4" else meta.in_features  # w4: two values per byte
        if values.shape != (meta.out_features, columns) or (bias is not None and bias.shape != meta.bias.shape):
            raise OmniditError(f"{file}: '{name}' holds a {tuple(values.shape)} weight, the model in config.json "
                               f"expects {(meta.out_features, columns)}", hint="quantize the model again")
        if scheme == "w8a8":
            layer = Int8Linear(values, scale, bias)
            layer = layer if smooth is None else SmoothedLinear(layer, smooth)
        elif scheme == "fp8":
            layer = Fp8Linear(values, scale, bias)
        else:
            layer = WeightOnlyLinear(values, scale, bias, 4 if scheme == "w4" else 8, about.get("group_size"),
                                     bool(about.get("rotate")))
        _swap_module(model, name, layer)
    if scheme == "bf16":  # stored in bfloat16, computed under bfloat16 autocast (Pipeline)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.autocast_dtype = torch.bfloat16
    check_state_matches(model, state, file, skip=tuple(linears))
    for key, value in state.items():  # the rest, every key checked just above; assigned, not copied into a float
        path, _, attr = key.rpartition(".")  # build (the model was built on the meta device)
        module = model.get_submodule(path)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    return model


def _take(state: dict[str, Tensor], key: str, source: Path) -> Tensor:
    if key not in state:
        raise OmniditError(f"{source} does not match the model in config.json: missing key '{key}'",
                           hint="quantize the model again with omnidit quantize")
    return state.pop(key)


def _to_int8(model: nn.Module, rows: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    """Swap each named linear of ``model`` for an ``Int8Linear`` holding its (int8 values, scales) and its bias."""
    for name, (values, scale) in rows.items():
        _swap_module(model, name, Int8Linear(values, scale, model.get_submodule(name).bias))
    return model


def _swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model``'s submodule ``name`` (dotted) was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def has_int8_layers(model: nn.Module) -> bool:
    """Whether ``model`` computes some layers in int8 (w8a8)."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def int8_matmul(rows: Tensor, values: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``rows`` (M, in) float32 times the int8 weight ``values`` (out, in) with per-row ``scale`` (out,), plus
    ``bias``: each row (token) is quantized to int8 on its own (``int8_per_row``'s rule), the product is summed
    exactly in int32 (``torch._int_mm``: VNNI on x86) and both scales are applied to it. Integer sums are exact
    and the scales per row, so a row's output does not depend on the other rows of the call. -> (M, out)."""
    step = row_scales(rows, 127)  # (M, 1)
    out = torch._int_mm(int8_rows(rows, step), values.t()).float() * (step * scale)
    return out if bias is None else out + bias


_int8_kernel = None  # int8_matmul as it runs eagerly: compiled on first use (_int8_matmul_compiled)


def _int8_matmul_compiled(rows: Tensor, values: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``int8_matmul`` compiled by Inductor once per process, every layer and row count sharing one graph
    (dynamic shapes): eager, its quantize, product and scale steps are separate passes over memory and take
    about twice as long as the fbgemm dynamic int8 Linear it replaced; compiled, the quantization is one fused
    kernel and the scales another, around the int32 product (2.7x faster than fbgemm on a (3072, 192) x
    (192, 768) product on this CPU). Where Dynamo does not run (an unsupported Python) it stays eager; where
    Inductor cannot compile (no C++ compiler) it warns once and stays eager."""
    global _int8_kernel
    if _int8_kernel is None:
        supported = torch._dynamo.is_dynamo_supported()
        _int8_kernel = torch.compile(int8_matmul, dynamic=True) if supported else int8_matmul
    try:
        return _int8_kernel(rows, values, scale, bias)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        cause = error.inner_exception
        warnings.warn(f"int8 layers run uncompiled (slower): {type(cause).__name__}: {cause}", stacklevel=2)
        _int8_kernel = int8_matmul
        return int8_matmul(rows, values, scale, bias)


class Int8Linear(RowScaledLinear):
    """A linear layer computed in int8 (w8a8): the weight (out, in) stored as ``int8_per_row`` values and scales,
    each call's input quantized per token (``int8_matmul``). Inside a compiled block the formula is traced with
    the block, so Inductor fuses its quantization and scales with the ops around it; called eagerly it runs
    compiled on its own. x: (..., in) -> (..., out) in x's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()
        traced = torch.compiler.is_compiling() or not len(rows)  # no rows: nothing to compile for
        out = (int8_matmul if traced else _int8_matmul_compiled)(rows, self.values, self.scale, self.bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


# ---- the --speed presets --------------------------------------------------------------------------------------

SPEEDS = ("default", "fast", "faster")
FAST_GUIDED_CACHE_THRESHOLD = 0.2  # first_block with the taylor forecast, for a guidance-distilled model at fast
# Shipped models whose fast presets sample with a guidance-distilled twin (shipped too; omnidit distill --method
# guidance): one pass per step where the model's guidance costs up to three, at the model's quality.
FAST_TWINS = {"shapes": "shapes-guided"}


def fast_twin(pipe: Pipeline) -> Path | None:
    """The folder of the guidance-distilled twin that ``pipe``'s fast presets sample with (``FAST_TWINS``), or None:
    only for a shipped model loaded as shipped (no LoRA adapter, not quantized), since the twin carries neither, and
    only when the twin reads the same text and data."""
    from omnidit.checkpoint import read_config, shipped_model_dir
    from omnidit.lora import lora_layers

    if pipe.model_dir is None or lora_layers(pipe.model) or not speed_quantizes(pipe):
        return None
    for name, twin in FAST_TWINS.items():
        try:
            if Path(pipe.model_dir).resolve() != shipped_model_dir(name).resolve():
                continue
            folder = shipped_model_dir(twin)
        except OmniditError:  # not installed: the preset quantizes and caches the model itself
            continue
        config = read_config(folder)
        reads = lambda c: (c.text, c.data.codec, c.data.codec_dtype, c.data.width, c.data.height)  # noqa: E731
        same_inputs = reads(config) == reads(pipe.config)
        return folder if same_inputs and config.model.guidance_embed else None
    return None


# The sampling settings a twin takes over from the model it stands in for (the rest are the twin's own: no
# guidance interval or skip-layer guidance, which its guidance input replaces).
TWIN_KEEPS = ("steps", "cfg", "sampler", "shift", "candidates", "cache", "cache_threshold", "cache_forecast",
              "cache_interval")


def _use_twin(pipe: Pipeline, folder: Path) -> None:
    """Swap ``pipe``'s model for its twin's (loaded from ``folder``), keeping the model's sampling settings
    (``TWIN_KEEPS``: its steps, guidance scale, best-of-N...) and its compilation; the text encoder and codec are
    the same and stay."""
    from omnidit.checkpoint import load_model

    model, config = load_model(folder, device=pipe.device)
    if getattr(pipe.model, "compiled", False):
        model.compile_blocks()
    for key in TWIN_KEEPS:
        setattr(config.sample, key, getattr(pipe.config.sample, key))
    # The model itself ranks the twin's best-of-N candidates, at the preset's precision (int8 on a CPU, bf16
    # autocast on a GPU): it ranks better (docs/sampling.md). A copy, since the server's presets share the float
    # model; kept at faster too, where an explicit --candidates may ask for it.
    pipe.scorer = quantize_in_memory(copy.deepcopy(pipe.model), "w8a8" if pipe.device.type == "cpu" else "bf16")
    pipe.model, pipe.config, pipe.model_dir = model, config, folder


def quantize_in_memory(model: nn.Module, scheme: str) -> nn.Module:
    """``model`` (a float MMDiT, eval) made to compute as ``scheme`` in place, without writing a folder: w8a8 swaps
    the blocks' per-token linears for int8 ones from its current weights, bf16 marks it for autocast."""
    if scheme == "bf16":
        model.autocast_dtype = torch.bfloat16
        return model
    if next(model.parameters()).device.type != "cpu":
        raise OmniditError("w8a8 runs on CPUs (int8 products on x86)", hint="use bf16 on a GPU")
    return _to_int8(model, {name: int8_per_row(layer.weight.detach()) for name, layer in _block_linears(model).items()})


def speed_variant(pipe: Pipeline, speed: str) -> Pipeline:
    """``pipe`` at the preset ``speed`` (``apply_speed``) without changing ``pipe``: its own config, and its own
    model only when the preset would quantize it or sample with the model's twin (otherwise the model, like the
    text encoder and codec, is shared, so a preset that only changes settings costs no memory). The server's
    per-request ``speed``."""
    import dataclasses

    twin = speed in ("fast", "faster") and fast_twin(pipe) is not None  # apply_speed then loads its own model
    model = copy.deepcopy(pipe.model) if speed_quantizes(pipe) and not twin else pipe.model
    variant = dataclasses.replace(pipe, model=model, config=copy.deepcopy(pipe.config))
    apply_speed(variant, speed)
    if model is not pipe.model and getattr(pipe.model, "compiled", False):
        model.compile_blocks()  # a deep copy does not carry torch.compile's wrappers
    return variant


def speed_quantizes(pipe: Pipeline) -> bool:
    """Whether a fast preset would change ``pipe``'s model: a float model that no scheme or preset has touched."""
    quantized = pipe.model_dir is not None and read_scheme(pipe.model_dir) is not None  # omnidit quantize
    if quantized or getattr(pipe.model, "autocast_dtype", None) is not None:
        return False
    return pipe.device.type != "cpu" or bool(_block_linears(pipe.model))


def apply_speed(pipe, speed: str | None) -> None:
    """``--speed``: make ``pipe`` faster in place. ``fast``: the model's guidance-distilled twin where it has one
    (``fast_twin``: one pass per step instead of guidance's three) with int8 linears on a CPU (bf16 compute on a
    GPU) and first-block step caching at 0.2 that forecasts skipped steps (TaylorSeer), as for any
    guidance-distilled model; a model without a twin gets int8 linears and first-block caching at its default
    threshold. ``faster``: int8, step caching and one candidate instead of best-of-N. Both cost some
    quality (measured in docs/sampling.md). The preset changes the pipeline's ``sample`` defaults, so settings
    passed explicitly still win."""
    if speed in (None, "default"):
        return
    if speed not in SPEEDS:
        raise OmniditError(f"unknown speed '{speed}'", hint=f"choose one of {', '.join(SPEEDS)}")
    twin = fast_twin(pipe)
    if twin is not None:
        _use_twin(pipe, twin)
    if speed_quantizes(pipe):
        quantize_in_memory(pipe.model, "w8a8" if pipe.device.type == "cpu" else "bf16")
    sample = pipe.config.sample
    if sample.cache == "none":
        sample.cache = "first_block"
        if pipe.config.model.guidance_embed and speed == "fast":
            # A guidance-distilled model (a twin) at fast: first-block caching that forecasts skipped steps
            # (TaylorSeer) at 0.2 kept its score on the validation seed (0.924 against 0.924 uncached, 1.56x
            # faster), where copying at 0.12 had cost it (0.915 against 0.933); docs/sampling.md.
            sample.cache_threshold, sample.cache_forecast = FAST_GUIDED_CACHE_THRESHOLD, "taylor"
    if speed == "faster":
        sample.candidates = 1
