"""Mixed precision, regional compilation without graph breaks, and the NaN guard."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build, random_condition, tiny_config

from omnidit.config import load_config
from omnidit.errors import OmniditError
from omnidit.model.math import rope_rotations
from omnidit.tokens import image_position_ids, patchify
from omnidit.train import Trainer

DIGITS = ["model.hidden_size=64", "model.num_heads=2", "model.depth=1", "model.depth_single=1",
          "train.batch_size=8", "train.lr=1e-3", "train.device=cpu", "train.tensorboard=false"]


def block_inputs(cfg, batch=2, n_img=16, n_txt=5):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, n_img, cfg.hidden_size, generator=g)
    txt = torch.randn(batch, n_txt, cfg.hidden_size, generator=g)
    vec = torch.randn(batch, cfg.hidden_size, generator=g)
    ids = torch.cat([image_position_ids(4, 4, 3).expand(batch, -1, -1), torch.zeros(batch, n_txt, 3)], 1)
    mask = torch.ones(batch, n_img + n_txt, dtype=torch.bool)
    mask[1, -2:] = False
    return img, txt, vec, rope_rotations(ids, cfg.axes_dim), mask


def test_blocks_compile_with_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    cfg = tiny_config()
    model = build(cfg)
    img, txt, vec, pe, mask = block_inputs(cfg)
    double = torch.compile(model.double_blocks[0], fullgraph=True, backend="eager")
    single = torch.compile(model.single_blocks[0], fullgraph=True, backend="eager")
    with torch.no_grad():
        out = double([img, txt], vec, pe, mask)  # fullgraph=True raises on any graph break
        eager = model.double_blocks[0]([img, txt], vec, pe, mask)
        torch.testing.assert_close(out[0], eager[0])
        joint = torch.cat([img, txt], 1)
        torch.testing.assert_close(single(joint, vec, pe, mask), model.single_blocks[0](joint, vec, pe, mask))
    # the SD3-style last block, whose text stream is pre-only
    last = build(tiny_config(depth_single=0)).double_blocks[-1]
    with torch.no_grad():
        out = torch.compile(last, fullgraph=True, backend="eager")([img, txt], vec, pe, None)
    assert out[1] is None


def test_bf16_autocast_keeps_modulation_fp32_and_matches_fp32():
    cfg = tiny_config()
    model = build(cfg)
    x = patchify(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), 2)
    ids, t, cond = image_position_ids(4, 4, 3), torch.tensor([0.3, 0.8]), random_condition(cfg, 2)
    with torch.no_grad():
        ref = model(x, ids, t, cond)
        with torch.autocast("cpu", torch.bfloat16):
            mods = model.double_blocks[0].streams["img"].mod(torch.randn(2, cfg.hidden_size))
            out = model(x, ids, t, cond)
    assert all(m.dtype == torch.float32 for m in mods)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    weights = []
    for accum in (1, 4):
        cfg = load_config("configs/digits.json", DIGITS + [f"train.out_dir={tmp_path / str(accum)}",
                                                          f"train.grad_accum={accum}", "train.steps=3"])
        trainer = Trainer(cfg, progress=False)
        losses = [trainer.train_step()[0] for _ in range(3)]
        weights.append((losses, [p.detach().clone() for p in trainer.model.parameters()]))
    (l1, w1), (l4, w4) = weights
    assert l1 == pytest.approx(l4, rel=1e-5)
    for a, b in zip(w1, w4):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_nan_guard_skips_a_bad_step_and_stops_after_patience(tmp_path):
    cfg = load_config("configs/digits.json", DIGITS + [f"train.out_dir={tmp_path}", "train.steps=20",
                                                      "train.checkpoint_every=2", "train.nan_patience=3"])
    trainer = Trainer(cfg, progress=False)
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    poison = {"left": 1}

    def nan_once(grad):
        if poison["left"]:
            poison["left"] -= 1
            return grad * float("nan")
        return grad

    handle = trainer.model.img_in.weight.register_hook(nan_once)
    loss, norm = trainer.train_step()
    assert trainer.bad_steps == 1 and trainer.step == 2
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))  # update skipped
    trainer.train_step()
    assert trainer.bad_steps == 0  # recovered
    handle.remove()

    # now a persistent failure: every step from the 5th on is NaN -> stop after 3 in a row, naming
    # the last checkpoint (written at step 6 with the weights of step 4: skipped steps change nothing)
    def always_nan(module, args, output):
        return output if trainer.step < 4 else output * float("nan")

    trainer.model.final_layer.register_forward_hook(always_nan)
    with pytest.raises(OmniditError, match=r"stopped at step 7.*steps 5-7.*checkpoint-0000006") as err:
        trainer.run()
    assert "train.lr" in err.value.hint
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [5, 6, 7]
