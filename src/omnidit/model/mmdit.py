"""The multimodal diffusion transformer: SD3-style double-stream blocks, Flux-style single blocks.

The network sees token sequences and (possibly fractional) position ids only; patchify/unpatchify and
the ids live in ``omnidit.tokens``. Streams: the generated streams, ``img`` (image patches or video
tubelets) and any ``extra_streams`` the config names (e.g. audio frames), each with its own input and
output projection and its own branch in the double-stream blocks; and, when the config has a text
context, the conditioning stream ``txt``. Single-stream blocks run on the joint sequence (generated
streams in config order, then text). Every stream may carry its own timestep, per sample or per token.
Parameter names follow Flux's layout (img_in, time_in, vector_in, guidance_in, txt_in, double_blocks,
single_blocks, final_layer) so key maps to SD3 / Flux / DiT checkpoints stay one-to-one renames; the
extra streams' projections are ``stream_in.NAME`` and ``stream_out.NAME``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from omnidit.condition import Condition
from omnidit.errors import OmniditError
from omnidit.model.layers import (
    MLP,
    FinalLayer,
    Linear,
    MLPEmbedder,
    Modulation,
    RMSNorm,
    TokenVectors,
    gated_residual,
    gelu_tanh,
    layer_norm,
    modulate,
)
from omnidit.model.math import (
    attention,
    rope_rotations,
    sincos_2d_table,
    sincos_position_embedding,
    timestep_embedding,
)

TIME_EMBED_DIM = 256  # sinusoidal frequency channels fed to the timestep / guidance MLPs


@dataclass
class MMDiTConfig:
    """Architecture of an MMDiT. Validated on construction.

    in_channels / patch_size / temporal_patch describe the ``img`` stream's tokens (token features =
    in_channels * temporal_patch * patch**2; a video tubelet spans temporal_patch frames, an image is one
    frame); extra_streams maps the names of further generated streams to their token features (e.g.
    ``{"audio": 64}``). context_dim = 0 means no text stream, pooled_dim = 0 no pooled vector,
    num_classes = 0 no class labels. axes_dim gives the rotary dims per position axis (time in seconds
    first, then the stream's own axes) and must sum to the head dim; rope_time_scale multiplies the time
    axis before the rotation (rotary units per second), so that frames 1 / fps apart rotate by a useful angle
    while positions stay in seconds.
    """

    in_channels: int = 3
    patch_size: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    depth: int = 2  # double-stream (joint attention) blocks
    depth_single: int = 2  # single-stream parallel blocks after them
    mlp_ratio: float = 4.0
    context_dim: int = 384
    pooled_dim: int = 384
    num_classes: int = 0
    guidance_embed: bool = False
    axes_dim: tuple[int, ...] = (8, 12, 12)
    rope_theta: float = 10000.0
    abs_pos_embed: bool = False  # add a sin-cos embedding computed from the position ids
    qk_norm: bool = True
    qkv_bias: bool = True
    rope: bool = True  # rotary positions in attention (SD3 and DiT use absolute positions instead)
    pos_table_size: int = 0  # > 0: a fixed (S, S, D) position table, centre-cropped to the grid (SD3, DiT)
    out_channels: int = 0  # output channels per pixel; 0 = in_channels (DiT's learned sigma doubles them)
    time_freq_shift: float = 0.0  # timestep embedding frequency shift (diffusers' DiT uses 1)
    dual_attention_layers: tuple[int, ...] = ()  # double blocks whose img stream also self-attends (SD3.5)
    mlp_norm_eps: float = 1e-6  # eps of the LayerNorm before each double-block MLP (diffusers' DiT: 1e-5)
    temporal_patch: int = 1  # frames per img token (video tubelets); 1 for images
    extra_streams: dict[str, int] = field(default_factory=dict)  # further generated streams: name -> token features
    rope_time_scale: float = 1.0  # rotary units per second on the time axis (axis 0)

    def __post_init__(self) -> None:
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        self.extra_streams = {str(k): int(v) for k, v in dict(self.extra_streams).items()}
        checks = [
            (self.hidden_size > 0 and self.num_heads > 0, "hidden_size and num_heads must be positive"),
            (self.hidden_size % max(self.num_heads, 1) == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"),
            (self.depth >= 1, "depth (double-stream blocks) must be at least 1"),
            (self.depth_single >= 0, "depth_single must be >= 0"),
            (self.in_channels > 0 and self.patch_size > 0, "in_channels and patch_size must be positive"),
            (all(a > 0 and a % 2 == 0 for a in self.axes_dim), f"axes_dim {self.axes_dim} must be positive and even"),
            (self.context_dim >= 0 and self.pooled_dim >= 0 and self.num_classes >= 0,
             "context_dim, pooled_dim and num_classes must be >= 0"),
            (self.mlp_ratio > 0, "mlp_ratio must be positive"),
            (self.pos_table_size >= 0 and self.out_channels >= 0, "pos_table_size and out_channels must be >= 0"),
            (all(0 <= i < self.depth for i in self.dual_attention_layers),
             f"dual_attention_layers {self.dual_attention_layers} must index double blocks 0..{self.depth - 1}"),
            (self.pos_table_size == 0 or self.hidden_size % 4 == 0, "pos_table_size needs hidden_size % 4 == 0"),
            (self.temporal_patch > 0, "temporal_patch must be positive"),
            (all(n.isidentifier() and n not in ("img", "txt") for n in self.extra_streams),
             f"extra_streams names {list(self.extra_streams)} must be identifiers other than 'img' and 'txt'"),
            (all(d > 0 for d in self.extra_streams.values()), "extra_streams token features must be positive"),
            (self.rope_time_scale > 0 and self.rope_time_scale < float("inf"), "rope_time_scale must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise OmniditError(f"invalid model config: {message}")
        if self.rope and sum(self.axes_dim) != self.head_dim:
            raise OmniditError(
                f"invalid model config: axes_dim {self.axes_dim} sums to {sum(self.axes_dim)}, "
                f"but the head dim is {self.head_dim} (hidden_size / num_heads)",
                hint="make the rotary axes add up to hidden_size // num_heads",
            )
        if self.abs_pos_embed and self.hidden_size % (2 * len(self.axes_dim)):
            raise OmniditError(
                f"invalid model config: abs_pos_embed needs hidden_size divisible by {2 * len(self.axes_dim)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def token_dim(self) -> int:
        """Features per img token: in_channels * temporal_patch * patch_size**2."""
        return self.in_channels * self.temporal_patch * self.patch_size**2

    @property
    def out_token_dim(self) -> int:
        """Features per img output token: (out_channels or in_channels) * temporal_patch * patch_size**2."""
        return (self.out_channels or self.in_channels) * self.temporal_patch * self.patch_size**2

    @property
    def generated_streams(self) -> tuple[str, ...]:
        """The generated streams in joint-sequence order: img, then the extra streams in config order."""
        return ("img", *self.extra_streams)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        d["extra_streams"] = dict(self.extra_streams)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MMDiTConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise OmniditError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


def _preset(hidden: int, heads: int, depth: int, single: int, axes: tuple[int, ...]) -> MMDiTConfig:
    return MMDiTConfig(hidden_size=hidden, num_heads=heads, depth=depth, depth_single=single, axes_dim=axes)


# Size presets. S/B/L/XL follow DiT's widths and depths (XL: 1152 wide, 28 blocks, 16 heads of 72).
PRESETS: dict[str, MMDiTConfig] = {
    "tiny": _preset(128, 4, 2, 2, (8, 12, 12)),
    "S": _preset(384, 6, 12, 0, (16, 24, 24)),
    "B": _preset(768, 12, 12, 0, (16, 24, 24)),
    "L": _preset(1024, 16, 24, 0, (16, 24, 24)),
    "XL": _preset(1152, 16, 28, 0, (8, 32, 32)),
}


class StreamBranch(nn.Module):
    """One stream's weights inside a joint-attention block (SD3: x_block / context_block).

    ``pre_only``: the stream only contributes keys and values (its output is never read), as
    SD3's last block does for text; it then has no output projection or MLP.
    """

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.pre_only, self.dual = pre_only, dual
        self.mod = Modulation(dim, 2 if pre_only else 9 if dual else 6)
        self.norm1 = layer_norm(dim)
        self.qkv = Linear(dim, 3 * dim, bias=cfg.qkv_bias)
        # A pre-only stream's queries only shape outputs that are discarded, so they need no norm
        # (and a norm there would be a weight without gradient).
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm and not pre_only else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        if not pre_only:
            self.proj = Linear(dim, dim)
            self.norm2 = layer_norm(dim, cfg.mlp_norm_eps)
            self.mlp = MLP(dim, cfg.mlp_hidden)
        if dual:  # SD3.5's MMDiT-X: a second, stream-only self-attention
            self.qkv2 = Linear(dim, 3 * dim, bias=cfg.qkv_bias)
            self.q_norm2 = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
            self.k_norm2 = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
            self.proj2 = Linear(dim, dim)

    def _heads(self, qkv: nn.Linear, q_norm: nn.Module, k_norm: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
        q, k, v = qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        return q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), v.transpose(1, 2)

    def qkv_heads(self, x: Tensor, mods: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, N, D) -> q, k, v each (B, H, N, D / H), q and k normalised."""
        return self._heads(self.qkv, self.q_norm, self.k_norm, modulate(self.norm1(x), mods[0], mods[1]))

    def finish(self, x: Tensor, attn: Tensor, mods: tuple[Tensor, ...],
               pe: Tensor | None = None) -> Tensor | None:
        """Add the attention branch (and the self-attention branch when dual), then the MLP branch.

        x: (B, N, D) the block's input; attn: (B, N, D) this stream's rows of the joint attention;
        pe: this stream's rotary angles, for the dual self-attention.
        """
        if self.pre_only:
            return None
        _, _, gate1, shift2, scale2, gate2 = mods[:6]
        out = gated_residual(x, gate1, self.proj(attn))
        if self.dual:  # reads the block input, normalised as for the joint attention
            shift3, scale3, gate3 = mods[6:]
            q, k, v = self._heads(self.qkv2, self.q_norm2, self.k_norm2, modulate(self.norm1(x), shift3, scale3))
            out = gated_residual(out, gate3, self.proj2(attention(q, k, v, pe, None)))
        return gated_residual(out, gate2, self.mlp(modulate(self.norm2(out), shift2, scale2)))


class DoubleStreamBlock(nn.Module):
    """Joint attention over all streams, each stream with its own modulation, QKV, norms and MLP.

    streams: list of (B, N_i, D) in the order of ``names`` (all of the block's streams unless ``names``
    picks some); vec: one (B, D) conditioning vector for all streams, or a list with one per stream, each
    (B, D) or per token (``TokenVectors``). Attention runs once over the concatenation; both the attention and the
    MLP branch add to each stream's residual.
    """

    def __init__(self, cfg: MMDiTConfig, names: tuple[str, ...], pre_only: tuple[str, ...] = (),
                 dual: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.names = names
        self.streams = nn.ModuleDict({n: StreamBranch(cfg, pre_only=n in pre_only, dual=n in dual) for n in names})

    def forward(self, streams: list[Tensor], vec: Tensor | TokenVectors | list, pe: Tensor | None,
                mask: Tensor | None, names: Sequence[str] | None = None) -> list[Tensor | None]:
        branches = [self.streams[n] for n in (names or self.names)]
        vecs = vec if isinstance(vec, list) else [vec] * len(branches)
        mods = [b.mod(v) for b, v in zip(branches, vecs)]
        qkv = [b.qkv_heads(x, m) for b, x, m in zip(branches, streams, mods)]
        q, k, v = (torch.cat([t[i] for t in qkv], dim=2) for i in range(3))  # (B, H, sum N_i, Dh)
        lengths = [x.shape[1] for x in streams]
        attn = attention(q, k, v, pe, mask).split(lengths, dim=1)
        own_pe = [None] * len(streams) if pe is None else pe.split(lengths, dim=2)
        return [b.finish(x, a, m, p) for b, x, a, m, p in zip(branches, streams, attn, mods, own_pe)]


class SingleStreamBlock(nn.Module):
    """Flux's parallel block: one modulated norm feeds attention and MLP in a single matmul.

    x: (B, N, D) joint sequence of all streams; vec: (B, D), TokenVectors or per-stream segments (see
    ``Modulation``).
    """

    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        dim, self.num_heads, self.mlp_hidden = cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden
        self.mod = Modulation(dim, 3)
        self.pre_norm = layer_norm(dim)
        self.linear1 = Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = Linear(dim + self.mlp_hidden, dim)
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor | None, mask: Tensor | None) -> Tensor:
        shift, scale, gate = self.mod(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [3 * x.shape[-1], self.mlp_hidden], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        attn = attention(q, k, v, pe, mask)
        out = self.linear2(torch.cat([attn, gelu_tanh(mlp)], dim=-1))
        return gated_residual(x, gate, out)


class MMDiT(nn.Module):
    """Velocity network: ``model(x, x_ids, t, cond) -> v``.

    x: the generated streams, a (B, N, token_dim) tensor for the ``img`` stream alone or a mapping
    {name: (B, N_s, D_s)} (any of the config's generated streams; absent ones are left out of the joint
    sequence); x_ids: position ids like x, (B or 1, N_s, A) floats per stream (time in seconds first); t in
    [0, 1] (1 = noise): a scalar, per sample (B,), per token over the generated streams in order (B or 1,
    sum N_s), or a mapping {name: scalar | (B,) | (B or 1, N_s)}; cond: text tokens / mask / pooled /
    labels / guidance as the config needs. Returns velocities like x (a tensor or a mapping).

    Per-token timesteps modulate each token by its own time; the text stream takes the largest time of
    the sample (the noise level of what is being generated). Where t is equal over a stream's tokens it
    is reduced to one vector per sample first, so the uniform case runs exactly the per-sample path.
    """

    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.has_text = cfg.context_dim > 0
        names = (*cfg.generated_streams, "txt") if self.has_text else cfg.generated_streams
        self.img_in = Linear(cfg.token_dim, dim)
        self.stream_in = nn.ModuleDict({n: Linear(d, dim) for n, d in cfg.extra_streams.items()})
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, dim)
        self.vector_in = MLPEmbedder(cfg.pooled_dim, dim) if cfg.pooled_dim else None
        self.label_in = nn.Embedding(cfg.num_classes + 1, dim) if cfg.num_classes else None  # +1: null class
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, dim) if cfg.guidance_embed else None
        self.txt_in = Linear(cfg.context_dim, dim) if self.has_text else None
        # With no single blocks after it, the last double block's text output is never read.
        last_pre_only = ("txt",) if cfg.depth_single == 0 else ()
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(cfg, names, last_pre_only if i == cfg.depth - 1 else (),
                              ("img",) if i in cfg.dual_attention_layers else ())
            for i in range(cfg.depth)
        )
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = FinalLayer(dim, cfg.out_token_dim)
        self.stream_out = nn.ModuleDict({n: FinalLayer(dim, d) for n, d in cfg.extra_streams.items()})
        if cfg.pos_table_size:  # fixed, not trained: a buffer that checkpoints carry (SD3 stores its own)
            self.register_buffer("pos_table", sincos_2d_table(cfg.pos_table_size, dim))
        self.gradient_checkpointing = False
        self.step_cache = None  # an omnidit.step_cache.StepCache while one is installed (using_step_cache)
        self._positions_cache: tuple | None = None  # (weakrefs to ids, key, (tables, pe)); see positions()
        self.initialize_weights()

    @property
    def null_label(self) -> int:
        """The class id used for the unconditional branch of classifier-free guidance."""
        return self.config.num_classes

    def initialize_weights(self) -> None:
        """Xavier linears, N(0, 0.02) embedders, and adaLN-Zero: modulations and outputs zeroed."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb in (self.time_in, self.vector_in, self.guidance_in):
            if emb is not None:
                nn.init.normal_(emb.in_layer.weight, std=0.02)
                nn.init.normal_(emb.out_layer.weight, std=0.02)
        if self.label_in is not None:
            nn.init.normal_(self.label_in.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m.lin.weight)
                nn.init.zeros_(m.lin.bias)
        for layer in (self.final_layer, *self.stream_out.values()):
            nn.init.zeros_(layer.linear.weight)
            nn.init.zeros_(layer.linear.bias)

    def conditioning_vector(self, t: Tensor, cond: Condition) -> Tensor | TokenVectors:
        """Timestep embedding (+ pooled text, + class label, + guidance).

        t: (B,) -> (B, D). Per token, t (B, N) -> ``TokenVectors``: the vectors of the distinct times only,
        (B, K, D), and each token's index into them, (B, N); K is small (given tokens sit at 0, the others
        share the sampler's time), so adaLN projects B * K vectors instead of B * N.
        """
        index = None
        if t.dim() == 2:
            t, index = torch.unique(t, return_inverse=True)  # (K,), (B, N)
        shift = self.config.time_freq_shift
        emb = timestep_embedding(t, TIME_EMBED_DIM, freq_shift=shift).to(self.img_in.weight.dtype)
        vec = self.time_in(emb)  # (B or K, D)
        if index is not None:
            vec = vec[None].expand(index.shape[0], -1, -1)  # (B, K, D)
        per_sample = (slice(None), None) if index is not None else (slice(None),)
        if self.vector_in is not None:
            vec = vec + self.vector_in(_required(cond.pooled, "pooled", "a pooled text vector"))[per_sample]
        if self.label_in is not None:
            vec = vec + self.label_in(_required(cond.labels, "labels", "class labels"))[per_sample]
        if self.guidance_in is not None:
            g = _required(cond.guidance, "guidance", "a guidance scale")
            g_emb = timestep_embedding(g, TIME_EMBED_DIM, freq_shift=shift).to(vec.dtype)
            vec = vec + self.guidance_in(g_emb)[per_sample]
        return vec if index is None else TokenVectors(vec, index)

    def stream_times(self, t: Tensor | float | Mapping[str, Tensor | float], batch: int,
                     lengths: Mapping[str, int]) -> dict[str, Tensor]:
        """Each stream's times: (B,) where equal over the stream's tokens, else (B, N_s).

        t: scalar, (B,), (B or 1, sum N_s) over the streams of ``lengths`` in order, or {name: ...}.
        """
        if isinstance(t, Mapping):
            missing = [n for n in lengths if n not in t]
            if missing:
                raise OmniditError(f"no timestep given for the stream '{missing[0]}'")
            per = {n: torch.as_tensor(t[n], device=self.time_in.in_layer.weight.device) for n in lengths}
        else:
            t = torch.as_tensor(t, device=self.time_in.in_layer.weight.device)
            if t.dim() == 0:
                t = t.expand(batch)  # once, so that every stream shares this one tensor (and one vector)
            if t.dim() == 2:
                total = sum(lengths.values())
                if t.shape[1] != total:
                    raise OmniditError(f"per-token timesteps cover {t.shape[1]} tokens, but the streams have {total}")
                per = dict(zip(lengths, t.split(list(lengths.values()), dim=1)))
            else:
                per = dict.fromkeys(lengths, t)
        out = {}
        for name, ts in per.items():
            if ts.dim() == 2:
                if ts.shape[1] != lengths[name]:
                    raise OmniditError(f"the '{name}' timesteps cover {ts.shape[1]} tokens, "
                                       f"but the stream has {lengths[name]}")
                ts = ts.expand(batch, -1)
                if bool((ts == ts[:, :1]).all()):  # uniform over the stream: the per-sample path, no extra cost
                    ts = ts[:, 0]
            elif ts.dim() == 0:
                ts = ts.expand(batch)
            if ts.shape[0] != batch or ts.dim() > 2:
                raise OmniditError(f"timesteps of shape {tuple(ts.shape)} do not fit a batch of {batch}")
            out[name] = ts
        return out

    def stream_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that only the generated stream ``name`` uses: its input and output projections and its
        branch of each double-stream block; everything else is shared by the streams."""
        if name not in self.config.generated_streams:
            raise OmniditError(f"the model has no generated stream {name!r}",
                               hint=f"its generated streams are {', '.join(self.config.generated_streams)}")
        ends = (self.img_in, self.final_layer) if name == "img" else (self.stream_in[name], self.stream_out[name])
        modules = [*ends, *(block.streams[name] for block in self.double_blocks)]
        return [p for m in modules for p in m.parameters()]

    def compile_blocks(self) -> None:
        """``torch.compile`` each transformer block in place (regional compilation): the blocks of one kind share
        their code, so Dynamo compiles it once per kind and input form and reuses it for every block, and the
        compile time does not grow with depth. The step cache and skip-layer guidance stay in eager Python
        around the blocks, so they neither break the graphs nor recompile them per step. A batch of another size
        (the rows a step cache computes, another request) compiles once more, with the batch size dynamic (torch's
        automatic dynamic shapes), and a single row once; after that no batch size compiles again. int8 layers
        (``quantize.Int8Linear``) trace into the graphs, so Inductor fuses their quantization with the ops around."""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.compile()
        self.compiled = True  # read by quantize.speed_variant: a copy of the model compiles its own blocks

    def forward(self, x: Tensor | Mapping[str, Tensor], x_ids: Tensor | Mapping[str, Tensor],
                t: Tensor | Mapping[str, Tensor], cond: Condition,
                skip_single: Sequence[int] = ()) -> Tensor | dict[str, Tensor]:
        """skip_single: indices of single-stream blocks to leave out (skip-layer guidance's weaker model)."""
        single = not isinstance(x, Mapping)
        inputs = {"img": x} if single else dict(x)
        ids = {"img": x_ids} if not isinstance(x_ids, Mapping) else x_ids
        names = [n for n in self.config.generated_streams if n in inputs]
        unknown = sorted(set(inputs) - set(names))
        if unknown or not names:
            raise OmniditError(f"the model has no generated stream '{(unknown or ['(none)'])[0]}'",
                               hint=f"its streams are {', '.join(self.config.generated_streams)}")
        if self.config.pos_table_size and names[0] != "img":  # the fixed table is the img stream's grid
            raise OmniditError("a model with a fixed position table needs its img stream in every call")
        batch = inputs[names[0]].shape[0]
        lengths = {n: inputs[n].shape[1] for n in names}
        times = self.stream_times(t, batch, lengths)
        shared = len({id(ts) for ts in times.values()}) == 1  # one time tensor for all: one vector for all
        vecs = {}
        for n in names:
            vecs[n] = vecs[names[0]] if shared and n != names[0] else self.conditioning_vector(times[n], cond)
        streams = [self.img_in(inputs[n]) if n == "img" else self.stream_in[n](inputs[n]) for n in names]
        txt = self.txt_in(_required(cond.txt, "txt", "text tokens")) if self.has_text else None  # (B, L, D)
        tables, pe = self.positions([ids[n] for n in names], 0 if txt is None else txt.shape[1])
        streams = [s if tab is None else s + tab.to(s.dtype) for s, tab in zip(streams, tables)]
        stream_vecs = [vecs[n] for n in names]
        n_gen = sum(lengths.values())
        mask = None
        if txt is not None:
            streams.append(txt)
            txt_vec = vecs[names[0]] if shared and times[names[0]].dim() == 1 else self._text_vector(times, cond)
            stream_vecs.append(txt_vec)
            if cond.txt_mask is not None:
                mask = torch.cat([torch.ones(batch, n_gen, dtype=torch.bool, device=txt.device), cond.txt_mask], 1)
        block_names = [*names, "txt"] if txt is not None else names
        uniform = all(v is stream_vecs[0] for v in stream_vecs)
        block_vec = stream_vecs[0] if uniform else stream_vecs
        joint_vec = stream_vecs[0] if uniform else [(v, s.shape[1]) for v, s in zip(stream_vecs, streams)]
        blocks = [*self.double_blocks, *(b for i, b in enumerate(self.single_blocks) if i not in skip_single)]

        def run(state: list[Tensor] | Tensor, start: int, stop: int, rows: Tensor | None = None) -> list | Tensor:
            """Blocks start..stop-1 on a list of streams (double blocks) or the joint sequence (single); ``state``
            holds the batch rows ``rows`` only (a (k,) index tensor; None: every row)."""
            bvec, jvec, rpe, rmask = (block_vec, joint_vec, pe, mask) if rows is None else \
                (take_rows(v, rows, batch) for v in (block_vec, joint_vec, pe, mask))
            for j in range(start, stop):
                if j < len(self.double_blocks):
                    state = self._run(blocks[j], state, bvec, rpe, rmask, block_names)
                else:
                    state = torch.cat(state, dim=1) if isinstance(state, list) else state  # (B, N + L, D)
                    state = self._run(blocks[j], state, jvec, rpe, rmask)
            return state

        def generated(state: list[Tensor] | Tensor) -> Tensor:  # the generated tokens, (B, N, D)
            return state[:, :n_gen] if isinstance(state, Tensor) else torch.cat(state[:len(names)], dim=1)

        def rest(first: list[Tensor] | Tensor, rows: Tensor | None) -> Tensor:
            """The generated tokens after the blocks past the first, computed on the batch rows ``rows`` only (a
            (k,) index tensor; None: every row). Compiled blocks compile a bounded number of row counts
            (``compile_blocks``)."""
            return generated(run(first if rows is None else take_rows(first, rows, batch), 1, len(blocks), rows))

        cache = getattr(self, "step_cache", None)
        if cache is None or self.training or len(blocks) < 2:
            hidden = generated(run(streams, 0, len(blocks)))
        else:  # step caching (omnidit.step_cache): the first block always runs, the rest when the cache says
            first = run(streams, 0, 1)
            key = (tuple(skip_single), batch, tuple(lengths.values()))
            t_now = float(torch.stack([ts.max() for ts in times.values()]).max())
            hidden = cache.hidden(key, t_now, generated(streams), generated(first), lambda rows: rest(first, rows),
                                  lambda: self._modulated_input(streams, block_vec, joint_vec, n_gen))
        outs = hidden.split(list(lengths.values()), dim=1)
        result = {n: (self.final_layer if n == "img" else self.stream_out[n])(h, vecs[n])
                  for n, h in zip(names, outs)}  # (B, N_s, out features) each
        return result["img"] if single else result

    def _modulated_input(self, streams: list[Tensor], block_vec, joint_vec, n_gen: int) -> Tensor:
        """The first block's normalised, modulated input of the first generated stream (TeaCache's signal)."""
        if self.double_blocks:
            branch = self.double_blocks[0].streams[self.double_blocks[0].names[0]]
            vec = block_vec[0] if isinstance(block_vec, list) else block_vec
            shift, scale = branch.mod(vec)[:2]
            return modulate(branch.norm1(streams[0]), shift, scale)
        block = self.single_blocks[0]
        shift, scale = block.mod(joint_vec)[:2]
        return modulate(block.pre_norm(torch.cat(streams, dim=1)), shift, scale)[:, :n_gen]

    def _text_vector(self, times: dict[str, Tensor], cond: Condition) -> Tensor:
        """The text stream's vector: the conditioning vector at each sample's largest time. (B, D)."""
        largest = torch.stack([ts if ts.dim() == 1 else ts.amax(dim=1) for ts in times.values()]).amax(dim=0)
        return self.conditioning_vector(largest, cond)

    def positions(self, x_ids: Tensor | Sequence[Tensor], n_txt: int) -> tuple:
        """What the forward derives from the position ids alone, for ids (B or 1, N, A) (or a list of them, one
        per generated stream in joint order, the first being ``img``) and n_txt text tokens.

        Returns the absolute embedding added to the tokens, (B or 1, N, D) or None (a list of them, one per
        stream, when a list was given; the fixed position table applies to ``img`` only), and the rotary
        rotations of the joint sequence, (B or 1, 1, sum N + n_txt, head_dim // 2, 2) or None. Both broadcast
        over the batch when the ids do. Samplers and trainers pass the same ids tensors at every call, so
        the last result is reused while the same tensor objects come back unmodified (same
        ``_version``), with the same text length, device, position table and inference mode: the
        embeddings are then built once per sampling run instead of once per step, and the position-table
        crop's host sync happens once. Inference tensors have no version counter, so ids changed in place
        inside ``torch.inference_mode`` are not noticed.
        """
        one = isinstance(x_ids, Tensor)
        id_list = [x_ids] if one else list(x_ids)
        # Inference tensors have no version counter (and can only change inside inference mode).
        versions = tuple(None if i.is_inference() else i._version for i in id_list)
        table = self.pos_table if self.config.pos_table_size else None
        table_version = None if table is None or table.is_inference() else table._version
        key = (versions, id_list[0].device, n_txt, table_version, torch.is_inference_mode_enabled())
        cached = self._positions_cache
        use_cache = not torch.compiler.is_compiling()
        if (use_cache and cached is not None and len(cached[0]) == len(id_list)
                and all(r() is i for r, i in zip(cached[0], id_list)) and cached[1] == key):
            tables, pe = cached[2]
            return (tables[0] if one else tables), pe
        tables = []
        for k, ids in enumerate(id_list):
            table = None
            if self.config.abs_pos_embed:
                table = sincos_position_embedding(ids, self.config.hidden_size)
            if self.config.pos_table_size and k == 0:
                rows = self.table_positions(ids)
                table = rows if table is None else table + rows
            tables.append(table)
        pe = None
        if self.config.rope:
            batch = max(i.shape[0] for i in id_list)
            # Text tokens share position 0 on every axis: the text encoder already ordered them.
            txt_ids = id_list[0].new_zeros(batch, n_txt, id_list[0].shape[-1])
            joint = torch.cat([i.expand(batch, -1, -1) for i in id_list] + [txt_ids], dim=1)
            if self.config.rope_time_scale != 1.0:
                scale = torch.ones(joint.shape[-1], dtype=joint.dtype, device=joint.device)
                scale[0] = self.config.rope_time_scale
                joint = joint * scale
            pe = rope_rotations(joint, self.config.axes_dim, self.config.rope_theta)
        if use_cache:
            self._positions_cache = (tuple(weakref.ref(i) for i in id_list), key, (tables, pe))
        return (tables[0] if one else tables), pe

    def table_positions(self, ids: Tensor) -> Tensor:
        """Rows of the fixed position table for (B, N, A) ids, centre-cropped to the grid: (B, N, D).

        SD3 keeps a table for its largest grid and uses its centre for smaller images.
        """
        size = self.config.pos_table_size
        rows, cols = ids[..., -2].long(), ids[..., -1].long()
        grid_h, grid_w = int(rows.max()) + 1, int(cols.max()) + 1  # a host sync, once per ids (see positions)
        if grid_h > size or grid_w > size:
            raise OmniditError(f"a {grid_w}x{grid_h} token grid exceeds the model's {size}x{size} position table",
                               hint="generate at a smaller size")
        return self.pos_table[rows + (size - grid_h) // 2, cols + (size - grid_w) // 2]

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def _required(value: Tensor | None, field: str, what: str) -> Tensor:
    if value is None:
        raise OmniditError(f"this model is conditioned on {what}, but cond.{field} is None")
    return value


def take_rows(value, rows: Tensor, batch: int):
    """``value`` (a tensor, or lists / tuples of them and of other things) with only the batch rows ``rows``:
    tensors whose first dimension is the batch are indexed, the rest (broadcast over the batch: size 1, or
    not tensors) stay as they are."""
    if isinstance(value, Tensor):
        return value.index_select(0, rows) if value.dim() and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple such as TokenVectors
        return type(value)(*(take_rows(v, rows, batch) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(take_rows(v, rows, batch) for v in value)
    return value
