"""Training smoke tests: the loss falls on real data, and one batch can be memorised."""

from __future__ import annotations

import pytest
import torch
from helpers import random_condition, tiny_config

from omnidit.config import TrainConfig, config_from_dict
from omnidit.errors import OmniditError
from omnidit.flow import training_loss
from omnidit.model.mmdit import MMDiT
from omnidit.tokens import image_position_ids, patchify
from omnidit.train import Trainer, ema_decay_at, learning_rate, parameter_groups
from omnidit.train_batches import batch_indices, object_loss_weights


def test_thirty_steps_on_tiny_shapes_reduce_the_loss(tmp_path):
    config = config_from_dict({
        "model": {"preset": "tiny", "hidden_size": 64, "num_heads": 2, "depth": 1, "depth_single": 1},
        "data": {"name": "shapes", "width": 16, "height": 16},
        "train": {"out_dir": str(tmp_path), "batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "steps": 30},
    })
    trainer = Trainer(config, progress=False)
    losses = [trainer.train_step()[0] for _ in range(30)]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.75 * first, losses


def test_overfitting_one_batch_reaches_a_low_loss():
    cfg = tiny_config(depth=1, depth_single=1)
    torch.manual_seed(0)
    model = MMDiT(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = patchify(torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, 2)
    noise, t = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g)
    cond = random_condition(cfg, 4)
    ids = image_position_ids(4, 4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_fn():
        return training_loss(lambda x, tt, c: model(x, ids, tt, c), x0, cond, t, noise)

    initial = loss_fn().item()
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02 * initial, (initial, loss.item())


def test_schedule_ema_and_parameter_groups():
    assert learning_rate(0, 1.0, 10) == 0.1 and learning_rate(9, 1.0, 10) == 1.0 and learning_rate(50, 1.0, 10) == 1.0
    assert learning_rate(10, 1.0, 10, 110, "cosine", 0.1) == 1.0
    assert abs(learning_rate(60, 1.0, 10, 110, "cosine", 0.1) - 0.55) < 1e-9
    assert abs(learning_rate(110, 1.0, 10, 110, "cosine", 0.1) - 0.1) < 1e-9


def test_wsd_schedule_is_flat_then_linear_to_the_floor():
    # 10 warmup, flat to step 80, linear over the last 20 steps down to 0.1 at step 100.
    lr = [learning_rate(s, 2.0, 10, 100, "wsd", 0.1, 20) for s in range(101)]
    assert lr[9] == 2.0 and lr[10] == 2.0 and lr[80] == 2.0
    assert abs(lr[90] - 2.0 * 0.55) < 1e-9 and abs(lr[100] - 0.2) < 1e-9
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    # decay_steps=0 means the last 20%; the stable phase does not depend on the run's length.
    assert learning_rate(79, 1.0, 0, 100, "wsd", 0.0) == 1.0
    assert abs(learning_rate(90, 1.0, 0, 100, "wsd", 0.0) - 0.5) < 1e-9
    assert learning_rate(500, 1.0, 0, 1000, "wsd", 0.0, 100) == learning_rate(500, 1.0, 0, 2000, "wsd", 0.0, 100)


def test_wsd_decay_longer_than_the_run_is_rejected():
    with pytest.raises(OmniditError, match="lr_decay_steps"):
        TrainConfig(steps=100, warmup_steps=10, lr_schedule="wsd", lr_decay_steps=95)
    with pytest.raises(OmniditError, match="only applies to train.lr_schedule=wsd"):
        TrainConfig(steps=100, lr_schedule="cosine", lr_decay_steps=20)
    assert ema_decay_at(0, 0.999) == 0.1 and ema_decay_at(10**6, 0.999) == 0.999
    groups = parameter_groups(MMDiT(tiny_config()), 0.1)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0


def _shapes_trainer(tmp_path, kinds: dict, data: dict | None = None, **train) -> Trainer:
    return Trainer(config_from_dict({
        "model": {"preset": "tiny", "hidden_size": 64, "num_heads": 2, "depth": 1, "depth_single": 1},
        "data": {"name": "shapes", "width": 16, "height": 16, "scene_kinds": kinds, **(data or {})},
        "train": {"out_dir": str(tmp_path), "batch_size": 8, "lr": 2e-3, "warmup_steps": 0, "steps": 3,
                  "tensorboard": False, **train},
    }), progress=False)


def test_counterfactual_pairs_add_a_loss_only_where_the_data_has_pairs(tmp_path):
    def weights(t: Trainer) -> list[torch.Tensor]:
        return [p.detach().clone() for p in t.net.parameters()]

    base = _shapes_trainer(tmp_path / "a", {"relation": 1})
    paired = _shapes_trainer(tmp_path / "b", {"relation": 1}, counterfactual_weight=1.0)
    for _ in range(3):  # at the zero init the text cannot change the output yet: the first update agrees
        base.train_step(), paired.train_step()
    assert base.counterfactual_loss is None and paired.counterfactual_loss > 0
    assert max((p - q).abs().max() for p, q in zip(weights(base), weights(paired))) > 1e-4
    # Without relation scenes there are no pairs: the run is exactly the run without the option.
    base = _shapes_trainer(tmp_path / "c", {"single": 1})
    paired = _shapes_trainer(tmp_path / "d", {"single": 1}, counterfactual_weight=1.0)
    for _ in range(2):
        assert base.train_step() == paired.train_step()
    assert paired.counterfactual_loss is None
    assert all(torch.equal(p, q) for p, q in zip(weights(base), weights(paired)))


def _clip_trainer(out, **train) -> Trainer:
    """A tiny video model's trainer on 16x16 shapes_video clips of 4 frames (given_p 0.5)."""
    return Trainer(config_from_dict({
        "model": {"preset": "tiny", "hidden_size": 64, "num_heads": 2, "depth": 1, "depth_single": 1},
        "data": {"name": "shapes_video", "width": 16, "height": 16, "frames": 4, "fps": 8.0},
        "train": {"out_dir": str(out), "batch_size": 4, "lr": 2e-3, "warmup_steps": 0, "steps": 3,
                  "tensorboard": False, "given_p": 0.5, **train}}), progress=False)


def test_clips_pair_with_their_direction_changed(tmp_path):
    """shapes_video: a single-object clip's partner moves another way (ShapesVideoDataset.counterfactual); the
    pairs' loss runs on the clips' tubelets and changes the update."""
    base = _clip_trainer(tmp_path / "a", counterfactual_weight=0.0)
    paired = _clip_trainer(tmp_path / "b", counterfactual_weight=1.0)
    for _ in range(3):
        base.train_step(), paired.train_step()
    assert base.counterfactual_loss is None and paired.counterfactual_loss > 0
    assert max((p - q).abs().max() for p, q in zip(base.net.parameters(), paired.net.parameters())) > 1e-4


def test_object_loss_weight_on_clips_changes_the_update(tmp_path):
    """train.object_loss_weight on shapes_video: the clips' object pixels weigh more (a weighted mean per
    sample), so the same seeded steps end at other weights."""
    base = _clip_trainer(tmp_path / "a")
    weighted = _clip_trainer(tmp_path / "b", object_loss_weight=4.0)
    # the weights line up with the clip's tokens: 4 exactly on the tokens' pixels that differ from the background
    # or touch such a pixel in the same frame
    data = weighted.dataset
    clips = torch.stack([data[i]["video"] for i in (0, 1)])  # (2, 3, T, H, W)
    drawn = (clips != 1).any(1, keepdim=True).float()  # the background is white: 1 in every channel
    near = torch.nn.functional.max_pool3d(drawn, (1, 3, 3), stride=1, padding=(0, 1, 1)).expand_as(clips)
    assert torch.equal(weighted._patches(object_loss_weights(data, [0, 1], 4.0)) == 4, weighted._patches(near) > 0)
    losses = [(base.train_step(), weighted.train_step()) for _ in range(2)]
    assert all(a != b for a, b in losses)
    assert max((p - q).abs().max() for p, q in zip(base.net.parameters(), weighted.net.parameters())) > 1e-4


def test_counterfactual_weight_is_checked(tmp_path):
    with pytest.raises(OmniditError, match="counterfactual_weight"):
        TrainConfig(counterfactual_weight=-1)
    with pytest.raises(OmniditError, match="counterfactual_t_min"):
        TrainConfig(counterfactual_t_min=1.0)
    digits = config_from_dict({"model": {"preset": "tiny", "num_classes": 10, "in_channels": 1, "context_dim": 0,
                                         "pooled_dim": 0, "patch_size": 2},
                               "data": {"name": "digits", "width": 16, "height": 16}, "text": {"encoder": "none"},
                               "train": {"out_dir": str(tmp_path), "counterfactual_weight": 1.0}})
    with pytest.raises(OmniditError, match="counterfactual pairs.*'digits'"):
        Trainer(digits, progress=False)


def test_counterfactual_facts_reach_the_trainer_and_are_checked(tmp_path):
    # Count scenes have partners only when data.counterfactuals names "count".
    relation_only = _shapes_trainer(tmp_path / "a", {"count": 1}, counterfactual_weight=1.0)
    relation_only.train_step()
    assert relation_only.counterfactual_loss is None
    counted = _shapes_trainer(tmp_path / "b", {"count": 1}, {"counterfactuals": ["count"]}, counterfactual_weight=1.0)
    counted.train_step()
    assert counted.counterfactual_loss > 0
    with pytest.raises(OmniditError, match="data.counterfactuals"):
        config_from_dict({"data": {"name": "shapes", "counterfactuals": ["colour"]}})
    with pytest.raises(OmniditError, match="data.counterfactuals.*shapes"):
        config_from_dict({"data": {"name": "digits", "counterfactuals": ["count"]}})


def test_batch_indices_cover_each_epoch_once_and_depend_only_on_the_step():
    n, b = 10, 4
    seen = [i for step in range(5) for i in batch_indices(step, b, n, seed=0)]  # 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # reshuffled per epoch
    assert batch_indices(3, b, n, 0) == batch_indices(3, b, n, 0)
    assert batch_indices(2, 8, None, 0) == list(range(16, 24))


def test_tensorboard_scalars_are_written_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from omnidit.config import load_config
    from omnidit.train import train

    config = load_config("configs/digits.json", [
        "model.hidden_size=64", "model.num_heads=2", "model.depth=1", "train.steps=4", "train.log_every=2",
        "train.checkpoint_every=4", "train.batch_size=8", f"train.out_dir={tmp_path}", "train.device=cpu"])
    train(config, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s"} <= set(events.Tags()["scalars"])
    assert [s.step for s in events.Scalars("train/loss")] == [2, 4]


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path, make_tiny_config, monkeypatch):
    from omnidit import validate
    from omnidit.train import Trainer

    trainer = Trainer(make_tiny_config(tmp_path / "run", train={"steps": 2, "batch_size": 8}), progress=False)
    memory = trainer.memory_estimate()
    need = memory["grads"] + memory["optimizer"] + memory["activations"]
    monkeypatch.setattr(validate, "available_memory", lambda device: need)  # 90% of it is usable: too little
    with pytest.raises(OmniditError, match=r"training with batch 8 of 64 tokens needs about [0-9.]+ MiB of memory"):
        trainer.run()
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(validate, "available_memory", lambda device: 2 * need)
    assert trainer.run().name == "checkpoint-0000002"
