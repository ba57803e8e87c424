"""Analytic FLOPs and memory of an MMDiT, GPU peak throughput, and model FLOPs utilisation (MFU).

Counting convention: a multiply-add is 2 FLOPs, and only matrix products are counted (every
``nn.Linear`` and the two attention matmuls, as ``torch.utils.flop_counter`` does). Bias adds,
norms, modulation, activations, softmax, RoPE and the sinusoidal embeddings are elementwise and
ignored: they are a few percent of the time at most and none of the FLOPs a GPU's peak refers to.
"""

from __future__ import annotations

import re

import torch

from omnidit.model.mmdit import TIME_EMBED_DIM, MMDiT, MMDiTConfig
from omnidit.tokens import check_image_size


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attention(tokens: int, dim: int) -> int:
    # QK^T and AV over the joint sequence, all heads together: 2 matmuls * 2 FLOPs * N^2 * D.
    return 2 * 2 * tokens * tokens * dim


def forward_flops(config: MMDiTConfig, image_tokens: int, text_tokens: int = 0, batch: int = 1) -> int:
    """FLOPs of one MMDiT forward on ``batch`` samples of ``image_tokens`` + ``text_tokens`` tokens.

    Counts img_in, txt_in, the timestep / pooled / guidance embedders, every modulation, QKV,
    output projection and MLP of the double blocks (the text stream of the last double block is
    pre-only when there are no single blocks: modulation and QKV only), linear1 / linear2 of the
    single blocks, the final layer, and attention (QK^T and AV: 4 * N_total^2 * D per block).
    Padded text tokens cost the same as real ones. Elementwise ops, norms, softmax and RoPE are
    not counted; the class-label embedding is a lookup, 0 FLOPs.

    This matches ``torch.utils.flop_counter.FlopCounterMode`` when attention goes through bmm or
    a counted SDPA kernel (CUDA flash / efficient / cuDNN, or the CPU math backend). The CPU's
    fused ``_scaled_dot_product_flash_attention_for_cpu`` has no formula there and counts 0.
    """
    c = config
    if text_tokens and not c.context_dim:
        raise ValueError(f"the model has no text stream (context_dim=0) but text_tokens={text_tokens}")
    d, h, n_img, n_txt = c.hidden_size, c.mlp_hidden, image_tokens, text_tokens
    n = n_img + n_txt

    def stream(tokens: int) -> int:  # one stream of a double block: modulation, qkv, proj, MLP
        return (_linear(1, d, 6 * d) + _linear(tokens, d, 3 * d) + _linear(tokens, d, d)
                + _linear(tokens, d, h) + _linear(tokens, h, d))

    def pre_only(tokens: int) -> int:  # a stream that only supplies keys and values
        return _linear(1, d, 2 * d) + _linear(tokens, d, 3 * d)

    flops = _linear(n_img, c.token_dim, d) + _linear(1, TIME_EMBED_DIM, d) + _linear(1, d, d)
    if c.pooled_dim:
        flops += _linear(1, c.pooled_dim, d) + _linear(1, d, d)
    if c.guidance_embed:
        flops += _linear(1, TIME_EMBED_DIM, d) + _linear(1, d, d)
    if c.context_dim:
        flops += _linear(n_txt, c.context_dim, d)
    for i in range(c.depth):
        flops += stream(n_img) + _attention(n, d)
        if i in c.dual_attention_layers:  # SD3.5: 3 more modulation chunks and an image-only attention
            flops += _linear(1, d, 3 * d) + _linear(n_img, d, 3 * d) + _linear(n_img, d, d) + _attention(n_img, d)
        if c.context_dim:
            last_pre_only = i == c.depth - 1 and c.depth_single == 0
            flops += pre_only(n_txt) if last_pre_only else stream(n_txt)
    single = _linear(1, d, 3 * d) + _linear(n, d, 3 * d + h) + _linear(n, d + h, d) + _attention(n, d)
    flops += c.depth_single * single
    flops += _linear(1, d, 2 * d) + _linear(n_img, d, c.out_token_dim)  # final layer
    return batch * flops


def training_flops(config: MMDiTConfig, image_tokens: int, text_tokens: int = 0, batch: int = 1) -> int:
    """FLOPs of one training step: 3x the forward, the usual approximation (as in Kaplan et al.).

    The backward of every matmul takes two matmuls of the same size (gradient of the input and
    of the weight). It is a slight overestimate: the inputs (image tokens, text tokens, timestep
    features) need no gradient. Recomputation (gradient checkpointing, flash attention's
    backward) is not counted: this is the model FLOPs that MFU is defined on.
    """
    return 3 * forward_flops(config, image_tokens, text_tokens, batch)


def flops_per_image(config: MMDiTConfig, height: int, width: int, text_tokens: int) -> dict[str, int]:
    """Forward and training FLOPs for one image of ``height`` x ``width`` model-input pixels.

    The size is what the model sees (the latent size for a latent-space model), so it has
    (height / patch) * (width / patch) tokens. Returns {"forward": int, "train": int}.
    """
    check_image_size(height, width, config.patch_size)
    tokens = (height // config.patch_size) * (width // config.patch_size)
    return {"forward": forward_flops(config, tokens, text_tokens),
            "train": training_flops(config, tokens, text_tokens)}


def parameter_count(config: MMDiTConfig) -> int:
    """Exact number of parameters, counted on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MMDiT(config)
    return sum(p.numel() for p in model.parameters())


# Optimizer state tensors kept per parameter ("sgd" means SGD with momentum).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}


def activation_elements(config: MMDiTConfig, image_tokens: int, text_tokens: int = 0) -> int:
    """Rough count of activation elements one sample keeps for the backward pass.

    Per token and block, a double-stream block saves about 17 * D + 2 * H values (the block
    input, the norm and modulated-norm outputs before attention and before the MLP, q and k
    before and after their RMSNorm, q, k, v and the output for SDPA, the projection's input and
    output, the MLP's output, plus the two H-wide tensors around the GELU); a single block about
    13 * D + 2 * H. D = hidden_size, H = mlp_hidden. Fused SDPA keeps only O(N) statistics, so
    there is no N^2 term. Against the bytes that ``saved_tensors_hooks`` sees on this model in
    float32 the estimate is about 10% low (the embedders, final layer and small statistics are
    left out).
    """
    c = config
    n = image_tokens + (text_tokens if c.context_dim else 0)
    d, h = c.hidden_size, c.mlp_hidden
    return n * (c.depth * (17 * d + 2 * h) + c.depth_single * (13 * d + 2 * h))


def sampling_bytes_per_sample(config: MMDiTConfig, image_tokens: int, text_tokens: int = 0,
                              dtype_bytes: int = 4) -> int:
    """Peak activation bytes of one model call on one sample while sampling (no autograd).

    Without a backward pass only a block's working set is alive: about 24 * D + 2 * H values per token
    (the residual stream, the modulated norm, q, k, v and the attention output, the MLP's H-wide hidden
    layer twice, the sampler's state), with no N^2 term because fused SDPA keeps O(N) statistics. Measured
    peak resident memory of the shipped shapes model on the CPU (guided, 2 rows per image) is about 85% of
    this at 64x64 to 256x256, so it errs on the safe side.
    """
    n = image_tokens + (text_tokens if config.context_dim else 0)
    return n * (24 * config.hidden_size + 2 * config.mlp_hidden) * dtype_bytes


def estimate_training_memory(config: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int,
                             dtype_bytes: int = 4, optimizer: str = "adamw", ema: bool = True,
                             activation_bytes: int | None = None) -> dict[str, int]:
    """Bytes needed to train: params + grads + optimizer moments + EMA copy + activations.

    params = grads = ema = P * dtype_bytes, optimizer = states * P * dtype_bytes (AdamW: 2
    moments), activations = batch * ``activation_elements`` * activation_bytes (default
    dtype_bytes; pass 2 for bf16 autocast, which is then an underestimate because the norms and
    RoPE compute in float32). Ignores the CUDA context, allocator fragmentation, temporary
    buffers and the frozen text encoder. Returns bytes per item (no total, so that
    ``sum(result.values())`` is the total).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer '{optimizer}', expected one of {sorted(OPTIMIZER_STATES)}")
    p = parameter_count(config)
    act_bytes = dtype_bytes if activation_bytes is None else activation_bytes
    return {
        "params": p * dtype_bytes,
        "grads": p * dtype_bytes,
        "optimizer": OPTIMIZER_STATES[optimizer] * p * dtype_bytes,
        "ema": p * dtype_bytes if ema else 0,
        "activations": batch * activation_elements(config, image_tokens, text_tokens) * act_bytes,
    }


# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets; the datasheets print the sparse
# figure with an asterisk, these are half of it. "fp32" is the non-tensor-core rate, which is what
# PyTorch's float32 matmuls get by default (TF32 is off unless torch.backends allows it).
#   H100 SXM / H200 (SXM):  BF16 1,979* -> 989.4, TF32 989* -> 494.7, FP32 67   (H100 / H200 datasheets)
#   H100 PCIe:              BF16 1,513* -> 756.5, TF32 756* -> 378,   FP32 51
#   H100 NVL / H200 NVL:    BF16 1,671* -> 835.5, TF32 835* -> 417.5, FP32 60
#   A100 (SXM4 and PCIe):   BF16 312, TF32 156, FP32 19.5 (A100 datasheet, dense column)
#   L40S:                   BF16 733* -> 362.05, TF32 366* -> 183, FP32 91.6
#   L4:                     BF16 242* -> 121,  TF32 120* -> 60,  FP32 30.3
#   RTX 4090:               BF16 with FP32 accumulate 165.2, TF32 82.6, FP32 82.6 (Ada whitepaper)
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}

# torch.cuda.get_device_name() strings -> table keys, first match wins. Examples: "NVIDIA H100 80GB
# HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
# "NVIDIA L4", "NVIDIA GeForce RTX 4090". Word boundaries keep "GH200" from reading as H200 and
# "L40S" from reading as L4.
_DEVICE_PATTERNS: list[tuple[str, str]] = [
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b", "H100 SXM"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200"),
    (r"\ba100\b", "A100"),
    (r"\bl40s\b", "L40S"),
    (r"\bl4\b", "L4"),
    (r"\brtx 4090\b", "RTX 4090"),
]

_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of a GPU for a dtype ("bf16", "fp16", "tf32", "fp32"), None if unknown.

    device_name: a ``torch.cuda.get_device_name()`` string or a ``PEAK_TFLOPS`` key.
    """
    name = device_name.lower().replace("-", " ").replace("_", " ")
    dtype = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    for pattern, key in _DEVICE_PATTERNS:
        if re.search(pattern, name):
            return PEAK_TFLOPS[key].get(dtype)
    return None


def mfu(achieved_flops_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (given in TFLOP/s), in [0, 1]."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be positive, got {peak_tflops}")
    return achieved_flops_per_s / (peak_tflops * 1e12)
