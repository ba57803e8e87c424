"""The MMDiT: shapes, adaLN-Zero init, determinism, masking, RoPE and config validation."""

from __future__ import annotations

import pytest
import torch
from helpers import build, random_condition, tiny_config

from omnidit.errors import OmniditError
from omnidit.model.layers import Linear, gelu_tanh
from omnidit.model.math import apply_rope, rope_frequencies, rope_rotations, timestep_embedding
from omnidit.model.mmdit import PRESETS, MMDiT, MMDiTConfig
from omnidit.tokens import image_position_ids, patchify, unpatchify


def run(model: MMDiT, height: int, width: int, batch: int = 2, seed: int = 0, cond=None):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    tokens = patchify(x, cfg.patch_size)
    ids = image_position_ids(height // cfg.patch_size, width // cfg.patch_size, len(cfg.axes_dim))
    cond = cond or random_condition(cfg, batch, seed=seed)
    t = torch.rand(batch, generator=g)
    return model(tokens, ids, t, cond), tokens


@pytest.mark.parametrize("height,width", [(16, 16), (32, 16), (8, 24), (2, 2)])
def test_output_shape_any_resolution_and_aspect(height, width):
    model = build(tiny_config())
    with torch.no_grad():
        v, tokens = run(model, height, width)
    assert v.shape == tokens.shape == (2, (height // 2) * (width // 2), 12)
    assert unpatchify(v, height, width, 2).shape == (2, 3, height, width)
    assert torch.isfinite(v).all() and v.abs().max() > 0


def test_zero_init_outputs_zero_and_blocks_are_identity():
    cfg = tiny_config()
    model = build(cfg, random_weights=False)
    with torch.no_grad():
        v, _ = run(model, 16, 16)
        assert torch.equal(v, torch.zeros_like(v))
        x = torch.randn(2, 64, cfg.hidden_size)
        txt = torch.randn(2, 5, cfg.hidden_size)
        vec = torch.randn(2, cfg.hidden_size)
        out = model.double_blocks[0]([x, txt], vec, None, None)
        assert torch.equal(out[0], x) and torch.equal(out[1], txt)
        joint = torch.cat([x, txt], 1)
        assert torch.equal(model.single_blocks[0](joint, vec, None, None), joint)


def test_determinism_same_seed_same_weights_and_output():
    a, b = build(tiny_config(), seed=3), build(tiny_config(), seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with torch.no_grad():
        assert torch.equal(run(a, 16, 16)[0], run(b, 16, 16)[0])
        assert torch.equal(run(a, 16, 16)[0], run(a, 16, 16)[0])
    # the un-randomised init also depends only on the seed
    assert torch.equal(build(tiny_config(), 5, False).img_in.weight, build(tiny_config(), 5, False).img_in.weight)


def test_state_dict_round_trip_is_bit_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build(tiny_config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fresh = MMDiT(tiny_config()).eval()
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    with torch.no_grad():
        assert torch.equal(run(model, 16, 8)[0], run(fresh, 16, 8)[0])


@pytest.mark.parametrize("depth_single", [0, 2])
def test_padded_text_positions_do_not_change_the_output(depth_single):
    cfg = tiny_config(depth_single=depth_single)
    model = build(cfg)
    cond = random_condition(cfg, 2, length=5)
    padded = cond.pad_text(9)
    padded.txt[:, 5:] = torch.randn(2, 4, cfg.context_dim) * 10  # garbage behind the mask
    # a second sample whose prompt is shorter: mask out its last two tokens too
    cond.txt_mask[1, 3:] = False
    padded.txt_mask[1, 3:] = False
    cond.txt[1, 3:] = 0.0
    with torch.no_grad():
        a, _ = run(model, 16, 16, cond=cond)
        b, _ = run(model, 16, 16, cond=padded)
        unmasked = random_condition(cfg, 2, length=5)
        unmasked.txt[:, :] = padded.txt[:, :5]
        c, _ = run(model, 16, 16, cond=unmasked)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert (a - c).abs().max() > 1e-3  # the mask really removes those tokens


def test_text_changes_the_output():
    cfg = tiny_config()
    model = build(cfg)
    with torch.no_grad():
        a, _ = run(model, 16, 16, cond=random_condition(cfg, 2, seed=1))
        b, _ = run(model, 16, 16, cond=random_condition(cfg, 2, seed=2))
    assert (a - b).abs().max() > 1e-3


def test_class_conditional_guidance_and_abs_pos_variants():
    cfg = tiny_config(hidden_size=96, axes_dim=(16, 16, 16), context_dim=0, pooled_dim=0, num_classes=10,
                      guidance_embed=True, abs_pos_embed=True)
    model = build(cfg)
    assert not hasattr(model.double_blocks[0].streams, "txt")
    with torch.no_grad():
        v, _ = run(model, 16, 16)
    assert v.shape == (2, 64, 12) and torch.isfinite(v).all()
    with torch.no_grad():  # the label matters
        other = random_condition(cfg, 2, seed=0)
        other.labels = (other.labels + 1) % 10
        assert (run(model, 16, 16, cond=other)[0] - v).abs().max() > 1e-4
    with pytest.raises(OmniditError, match="labels"):
        run(model, 16, 16, cond=random_condition(tiny_config(), 2))


def test_every_parameter_gets_a_gradient():
    """No dead weights: SD3's last block keeps text keys/values only (matters for DDP)."""
    for depth_single in (0, 1):
        cfg = tiny_config(depth_single=depth_single)
        model = build(cfg).train()
        v, _ = run(model, 8, 8)
        v.square().mean().backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
        assert not dead, dead
    assert not hasattr(build(tiny_config(depth_single=0)).double_blocks[-1].streams["txt"], "mlp")


def test_gradient_checkpointing_gives_equal_gradients():
    cfg = tiny_config()
    grads = []
    for ckpt in (False, True):
        model = build(cfg).train()
        model.gradient_checkpointing = ckpt
        v, _ = run(model, 8, 8)
        v.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_rope_dot_product_depends_only_on_position_difference():
    axes = (4, 6, 6)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g).double()
    k = torch.randn(1, 1, 1, 16, generator=g).double()

    def score(pos_q, pos_k):
        ids = torch.tensor([[pos_q, pos_k]], dtype=torch.float64)
        rot = rope_rotations(ids, axes).double()
        rq = apply_rope(q, rot[:, :, :1])
        rk = apply_rope(k, rot[:, :, 1:])
        return (rq * rk).sum().item()

    base = score((0, 2, 3), (1, 5, 1))
    for offset in [(0, 7, -4), (3, 0, 0), (10, 20, 30)]:
        moved_q = tuple(a + o for a, o in zip((0, 2, 3), offset))
        moved_k = tuple(a + o for a, o in zip((1, 5, 1), offset))
        shifted = score(moved_q, moved_k)
        assert abs(shifted - base) < 1e-6
    assert abs(score((0, 2, 3), (1, 6, 1)) - base) > 1e-3  # a different difference changes it
    # rotation preserves norms
    rot = rope_rotations(torch.tensor([[[3.0, 4.0, 5.0]]]), axes).double()
    assert abs(apply_rope(q, rot).norm() - q.norm()) < 1e-6


def test_apply_rope_matches_the_real_valued_rotation_formula():
    # (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) per adjacent pair, on a strided (transposed) view
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g).transpose(1, 2)  # (B, H, N, D), not contiguous
    ids = torch.randint(0, 9, (2, 5, 3), generator=g)
    angles = rope_frequencies(ids, (2, 2, 4))[:, None]
    rot = rope_rotations(ids, (2, 2, 4))
    x0, x1 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([x0 * angles.cos() - x1 * angles.sin(), x0 * angles.sin() + x1 * angles.cos()], -1)
    torch.testing.assert_close(apply_rope(x, rot), expected.flatten(-2), rtol=1e-6, atol=1e-6)
    half = apply_rope(x.to(torch.bfloat16), rot)
    assert half.dtype == torch.bfloat16 and (half.float() - expected.flatten(-2)).abs().max() < 0.05


def test_gelu_tanh_at_inference_is_torchs_tanh_gelu_to_float32_rounding():
    """The sigmoid form (inference, float32) against torch's kernel in float64, on a strided view as the single
    block passes it; under autograd, and in bfloat16, it is torch's kernel itself. The input is never changed."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 40, generator=g) * 4)[..., 8:]  # a column slice, as the single block's MLP half
    before = x.clone()
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    with torch.inference_mode():
        fast = gelu_tanh(x)
    torch.testing.assert_close(fast.double(), exact, rtol=2e-6, atol=2e-6)
    assert torch.equal(x, before)
    leaf = x.clone().requires_grad_()
    out = gelu_tanh(leaf)
    assert torch.equal(out, torch.nn.functional.gelu(leaf, approximate="tanh")) and out.grad_fn is not None
    half = x.to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(gelu_tanh(half), torch.nn.functional.gelu(half, approximate="tanh"))


def test_compiled_gelu_tanh_takes_the_exp_form_at_inference_and_torchs_kernel_under_autograd():
    """Compiled at CPU float inference, the traced graph is the exp form (no gelu op) and matches torch's kernel to
    float32 rounding, far tails included (exp overflows to inf there: the output is -0); under autograd the graph
    is torch's gelu, whose gradient stays finite where the exp form's would be NaN."""
    traced: list[set[str]] = []

    def recording(graph, inputs):  # a backend that keeps each graph's ops and runs it as traced
        traced.append({str(node.target) for node in graph.graph.nodes if node.op == "call_function"})
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(gelu_tanh, backend=recording)
    x = torch.cat([torch.linspace(-30, 30, 241), torch.tensor([-1e4, 1e4])])
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).double(), exact, rtol=2e-6, atol=2e-6)
    assert any("exp" in op for op in traced[-1]) and not any("gelu" in op for op in traced[-1]), traced
    leaf = x.clone().requires_grad_()
    compiled(leaf).sum().backward()
    assert any("gelu" in op for op in traced[-1]), traced
    assert torch.isfinite(leaf.grad).all()
    reference = x.clone().requires_grad_()
    torch.nn.functional.gelu(reference, approximate="tanh").sum().backward()
    torch.testing.assert_close(leaf.grad, reference.grad)
    torch._dynamo.reset()


def test_a_linear_rows_outputs_do_not_depend_on_how_many_rows_share_the_call():
    """At inference every row count gives each row the bits of a large product (small products take other BLAS
    kernels on x86, which round differently), so a sample's modulation or an image is the same alone or batched."""
    g = torch.Generator().manual_seed(0)
    layer = Linear(48, 96)
    x = torch.randn(40, 48, generator=g)
    with torch.inference_mode():
        reference = layer(x)
        for rows in range(1, 40):
            assert torch.equal(layer(x[:rows]), reference[:rows]), rows
        assert torch.equal(layer(x[:6].reshape(2, 3, 48)), reference[:6].reshape(2, 3, 96))
    assert torch.equal(layer(x[:3]), torch.nn.functional.linear(x[:3], layer.weight, layer.bias))  # autograd: as is


def test_an_image_is_bit_identical_alone_or_in_a_batch_of_other_prompts(tiny_run):
    """Prompts of one token length: bit for bit. Longer prompts in the batch pad a short one's text with masked
    keys, which the attention kernel's blocks sum in another order: then within float32 rounding."""
    from omnidit.pipeline import load_pipeline

    pipe = load_pipeline(tiny_run, device="cpu")
    with torch.inference_mode():
        for settings in ({"steps": 3, "cfg": 3.0, "candidates": 1}, {"steps": 3, "cfg": 1.0, "candidates": 2}):
            for prompts, exact in ((["a red circle", "a blue square", "a green circle"], True),
                                   (["a red circle", "two blue squares above a green triangle", "x"], False)):
                batch = pipe.generate(prompts, seed=[4, 5, 6], **settings)
                for i, prompt in enumerate(prompts):
                    alone = pipe.generate([prompt], seed=[4 + i], **settings)[0]
                    assert torch.equal(alone, batch[i]) if exact else torch.allclose(alone, batch[i], atol=1e-5)


def test_timestep_embedding_scale_and_layout():
    emb = timestep_embedding(torch.tensor([0.0, 0.5]), 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    # t = 0.5 is step 500 on the x1000 scale: the first frequency is 1
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(500.0)))
    assert torch.allclose(emb[1, 4], torch.sin(torch.tensor(500.0)))


@pytest.mark.parametrize("bad,match", [
    (dict(hidden_size=66, num_heads=4), "not divisible"),
    (dict(axes_dim=(8, 8, 8)), "sums to 24"),
    (dict(axes_dim=(7, 13, 12)), "even"),
    (dict(depth=0), "depth"),
])
def test_config_validation(bad, match):
    with pytest.raises(OmniditError, match=match):
        tiny_config(**bad)


def test_presets_are_valid_and_round_trip():
    for name, cfg in PRESETS.items():
        assert MMDiTConfig.from_dict(cfg.to_dict()) == cfg, name
    with pytest.raises(OmniditError, match="unknown model config keys"):
        MMDiTConfig.from_dict({"hidden": 3})


def test_patchify_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(unpatchify(tokens, 4, 6, 2), x)
    # token 1 is grid cell (row 0, col 1); features ordered (c, py, px)
    assert torch.equal(tokens[0, 1, :4], x[0, 0, 0:2, 2:4].reshape(-1))
    ids = image_position_ids(2, 3, 3)
    assert ids[0, 1].tolist() == [0, 0, 1] and ids[0, 3].tolist() == [0, 1, 0]
    with pytest.raises(OmniditError, match="multiple of the patch size"):
        patchify(torch.zeros(1, 3, 5, 4), 2)


def test_batched_cfg_with_prompts_of_different_lengths_matches_separate_calls():
    from omnidit.sampling import classifier_free_guidance

    cfg = tiny_config()
    model = build(cfg)
    cond = random_condition(cfg, 2, length=7, seed=1)  # full mask
    null = random_condition(cfg, 1, length=2, seed=2)  # shorter: padded when batched
    ids = image_position_ids(4, 4, 3)
    x, t = torch.randn(2, 16, 12), torch.tensor(0.4)

    def fn(xx, tt, c):
        return model(xx, ids, tt, c)

    with torch.no_grad():
        guided = classifier_free_guidance(fn, cond, null, 3.0)(x, t)
        v_c = fn(x, t, cond.without_full_mask())
        v_u = fn(x, t, null.repeat(2))
    torch.testing.assert_close(guided, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)


def test_family_options_rope_off_position_table_dual_attention_out_channels():
    from omnidit.model.math import sincos_2d_table

    cfg = tiny_config(rope=False, pos_table_size=8, dual_attention_layers=(0,), depth_single=0, out_channels=6,
                      time_freq_shift=1.0)
    model = build(cfg)
    with torch.no_grad():
        v, tokens = run(model, 8, 12)  # a 4x6 grid, centred in the 8x8 table
    assert v.shape == (2, 24, 6 * 4)
    ids = image_position_ids(4, 6, 3)
    table = model.table_positions(ids)[0].reshape(4, 6, -1)
    assert torch.equal(table, model.pos_table[2:6, 1:7])
    assert torch.equal(model.pos_table, sincos_2d_table(8, cfg.hidden_size))
    with pytest.raises(OmniditError, match="exceeds"):
        model.table_positions(image_position_ids(9, 2, 3))
    # every weight, including the dual self-attention, gets a gradient
    model.train()
    out, _ = run(model, 8, 8)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())
    streams = [block.streams["img"] for block in model.double_blocks]
    assert hasattr(streams[0], "qkv2") and not hasattr(streams[1], "qkv2")


def test_without_positions_the_model_is_permutation_equivariant():
    cfg = tiny_config(rope=False)
    model = build(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 12, generator=g)
    perm = torch.randperm(16, generator=g)
    ids = image_position_ids(4, 4, 3)
    cond, t = random_condition(cfg, 1), torch.tensor([0.5])
    with torch.no_grad():
        permuted = model(x[:, perm], ids, t, cond)
        torch.testing.assert_close(model(x, ids, t, cond)[:, perm], permuted, rtol=1e-5, atol=1e-6)
        rope = build(tiny_config())
        assert (rope(x, ids, t, cond)[:, perm] - rope(x[:, perm], ids, t, cond)).abs().max() > 1e-4


def test_position_table_and_time_embedding_match_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

    from omnidit.model.math import sincos_2d_table

    ref = torch.as_tensor(get_2d_sincos_pos_embed(32, 6, base_size=6, interpolation_scale=1.0, output_type="pt"))
    torch.testing.assert_close(sincos_2d_table(6, 32).reshape(36, 32), ref.float(), rtol=0, atol=1e-6)
    t = torch.tensor([0.0, 0.25, 0.999])
    for shift in (0, 1):
        expected = get_timestep_embedding(t * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=shift)
        torch.testing.assert_close(timestep_embedding(t, 256, freq_shift=shift), expected, rtol=1e-5, atol=1e-4)


def test_positions_are_reused_for_the_same_ids_and_rebuilt_when_they_change():
    cfg = tiny_config(pos_table_size=8, abs_pos_embed=False)
    model = build(cfg)
    ids = image_position_ids(3, 3)
    table, pe = model.positions(ids, 5)
    assert model.positions(ids, 5)[1] is pe  # same tensor object, unmodified: cached
    assert model.positions(ids, 4)[1] is not pe  # another text length
    assert model.positions(ids.clone(), 5)[1] is not pe  # another ids tensor
    x, t, cond = torch.randn(2, 9, cfg.token_dim), torch.tensor([0.3, 0.8]), random_condition(cfg, 2)
    before = model(x, ids, t, cond)
    ids[:, :, 1:] += 1  # moved in place: the cache must notice (shift the grid by one token)
    moved = model(x, ids, t, cond)
    fresh = build(cfg)(x, ids, t, cond)  # a model that never saw the old ids
    torch.testing.assert_close(moved, fresh)
    assert not torch.allclose(before, moved)
    with torch.inference_mode():  # inference-mode results are not reused for autograd
        model(x, ids, t, cond)
    model(x, ids, t, cond).sum().backward()


def test_skip_single_leaves_out_exactly_the_named_blocks():
    """forward(..., skip_single=[i]) is the model with single-stream block i removed (skip-layer guidance)."""
    model = build(tiny_config(depth_single=3))
    x, ids = torch.randn(2, 64, 12), image_position_ids(8, 8, 3)
    t, cond = torch.tensor([0.3, 0.8]), random_condition(model.config, 2)
    with torch.no_grad():
        full = model(x, ids, t, cond)
        skipped = model(x, ids, t, cond, skip_single=[1])
        kept = model.single_blocks
        model.single_blocks = torch.nn.ModuleList([kept[0], kept[2]])
        removed = model(x, ids, t, cond)
        model.single_blocks = kept
    torch.testing.assert_close(skipped, removed, rtol=0, atol=0)
    assert (skipped - full).abs().max() > 1e-3  # the block did something, so the equality is informative
