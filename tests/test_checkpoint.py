"""omnidit.checkpoint: folder format, bit-exact round trips, atomic saves, clear errors; exact resume."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config_dict
from helpers import fixed_inputs
from safetensors.torch import load_file, save_file

import omnidit.checkpoint as ckpt
from omnidit.checkpoint import (
    FORMAT,
    list_checkpoints,
    load_model,
    load_state_into,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    prune_checkpoints,
    read_config,
    resolve_model_dir,
    save_checkpoint,
)
from omnidit.config import config_from_dict
from omnidit.errors import OmniditError


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- round trips --------------------------------------------------------------------------------


def test_layout_and_config(tiny_run, tmp_path):
    latest = tiny_run / "checkpoint-0000020"
    for name in ("config.json", "model.safetensors", "ema.safetensors", "training_state/state.safetensors",
                 "training_state/state.json"):
        assert (latest / name).is_file(), name
    meta = json.loads((latest / "config.json").read_text())
    assert meta["format"] == FORMAT
    expected = config_from_dict(tiny_config_dict(tiny_run))
    assert read_config(latest) == expected
    assert json.loads((latest / "training_state" / "state.json").read_text())["step"] == 20


def test_save_load_round_trip_is_bit_exact(tiny_run, tmp_path):
    model, config = load_model(tiny_run, use_ema=False)
    ema, _ = load_model(tiny_run, use_ema=True)
    out = save_checkpoint(tmp_path / "copy", config, model.state_dict(), ema.state_dict())
    assert out == tmp_path / "copy" and not (tmp_path / "copy.tmp").exists()
    assert read_config(out) == config
    raw2, _ = load_model(out, use_ema=False)
    ema2, _ = load_model(out, use_ema=True)
    assert_same_state(model.state_dict(), raw2.state_dict())
    assert_same_state(ema.state_dict(), ema2.state_dict())
    assert not raw2.training and not any(p.requires_grad for p in raw2.parameters())
    x, ids, t, cond = fixed_inputs(config)
    with torch.no_grad():
        y1, y2 = model(x, ids, t, cond), raw2(x, ids, t, cond)
    assert y1.abs().max() > 1e-3  # a trained model: the zero-initialised output layer has moved
    assert torch.equal(y1, y2)


def test_ema_versus_raw_weights(tiny_run, tmp_path):
    latest = resolve_model_dir(tiny_run)
    raw, _ = load_model(latest, use_ema=False)
    ema, _ = load_model(latest, use_ema=True)
    assert_same_state(raw.state_dict(), load_file(str(latest / "model.safetensors")))
    assert_same_state(ema.state_dict(), load_file(str(latest / "ema.safetensors")))
    differ = [k for k, v in raw.state_dict().items() if not torch.equal(v, ema.state_dict()[k])]
    assert differ  # 20 steps with ema_decay 0.9: the average lags the raw weights
    # without ema.safetensors, use_ema=True falls back to the raw weights
    copy = copy_checkpoint(latest, tmp_path / "noema")
    (copy / "ema.safetensors").unlink()
    fallback, _ = load_model(copy, use_ema=True)
    assert_same_state(raw.state_dict(), fallback.state_dict())


# ---- atomic saves, listing, pruning -------------------------------------------------------------


def _crash_on_second_file(monkeypatch):
    calls = []
    real = ckpt.save_file

    def flaky(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    return calls


def _small_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def test_crashed_save_leaves_earlier_checkpoint_intact(tmp_path, monkeypatch):
    config = config_from_dict(tiny_config_dict(tmp_path))
    run = tmp_path / "run"
    first = save_checkpoint(run / "checkpoint-0000010", config, _small_state(1), _small_state(2))
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}

    calls = _crash_on_second_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(run / "checkpoint-0000020", config, _small_state(3), _small_state(4))
    assert len(calls) == 2
    # the half-written folder is left as NAME.tmp and is not a checkpoint
    assert (run / "checkpoint-0000020.tmp").is_dir()
    assert not (run / "checkpoint-0000020").exists()
    assert list_checkpoints(run) == [first]
    assert resolve_model_dir(run) == first

    # overwriting the same folder and crashing keeps the old content byte for byte
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(first, config, _small_state(5), _small_state(6))
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before
    assert_same_state(load_file(str(first / "model.safetensors")), _small_state(1))
    assert list_checkpoints(run) == [first]


def test_overwrite_and_leftover_tmp_is_replaced(tmp_path):
    config = config_from_dict(tiny_config_dict(tmp_path))
    target = tmp_path / "checkpoint-0000001"
    (tmp_path / "checkpoint-0000001.tmp").mkdir()
    (tmp_path / "checkpoint-0000001.tmp" / "junk").write_text("x")
    save_checkpoint(target, config, _small_state(1))
    save_checkpoint(target, config, _small_state(2))
    assert_same_state(load_file(str(target / "model.safetensors")), _small_state(2))
    assert not (target / "ema.safetensors").exists() and not (target / "training_state").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000001"]


def test_list_prune_and_resolve(tmp_path):
    config = config_from_dict(tiny_config_dict(tmp_path))
    run = tmp_path / "run"
    steps = [5, 40, 300, 1000, 20]  # saved out of order; sorted by number, not by name or time
    for s in steps:
        save_checkpoint(run / f"checkpoint-{s:07d}", config, _small_state(s))
    save_checkpoint(run / "checkpoint-99999999", config, _small_state(0))  # wider than 7 digits
    (run / "checkpoint-0009999.tmp").mkdir()  # half-written
    (run / "checkpoint-0007777").mkdir()  # no config.json: incomplete
    (run / "checkpoint-latest").mkdir()
    (run / "metrics.jsonl").write_text("")
    names = [p.name for p in list_checkpoints(run)]
    assert names == [f"checkpoint-{s:07d}" for s in sorted(steps)] + ["checkpoint-99999999"]
    assert resolve_model_dir(run) == run / "checkpoint-99999999"
    assert resolve_model_dir(run / "checkpoint-0000040") == run / "checkpoint-0000040"

    prune_checkpoints(run, 3)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-0000300", "checkpoint-0001000",
                                                        "checkpoint-99999999"]
    assert (run / "checkpoint-0009999.tmp").is_dir() and (run / "metrics.jsonl").is_file()
    prune_checkpoints(run, 1)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-99999999"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_training_keeps_last_checkpoints(tiny_run):
    assert [p.name for p in list_checkpoints(tiny_run)] == ["checkpoint-0000010", "checkpoint-0000020"]
    assert resolve_model_dir(tiny_run) == tiny_run / "checkpoint-0000020"


def test_resolve_errors(tmp_path):
    with pytest.raises(OmniditError, match="not found"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OmniditError, match="not an omnidit model folder"):
        resolve_model_dir(tmp_path / "empty")


# ---- corrupt and mismatched checkpoints ---------------------------------------------------------


@pytest.fixture
def ckpt_copy(tiny_run, tmp_path) -> Path:
    return copy_checkpoint(tiny_run / "checkpoint-0000020", tmp_path / "ck")


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 8, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad"])
def test_corrupt_weights_name_the_file(ckpt_copy, content):
    (ckpt_copy / "model.safetensors").write_bytes(content)
    with pytest.raises(OmniditError) as info:
        load_model(ckpt_copy, use_ema=False)
    assert str(ckpt_copy / "model.safetensors") in str(info.value) and "corrupt" in str(info.value)


def test_truncated_weights(ckpt_copy):
    path = ckpt_copy / "ema.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OmniditError, match="ema.safetensors"):
        load_model(ckpt_copy)


def test_missing_weights_file(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(OmniditError, match="missing checkpoint file.*model.safetensors"):
        load_model(ckpt_copy, use_ema=False)


def _rewrite(path: Path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_wrong_shape_names_the_key(ckpt_copy):
    key = "final_layer.linear.weight"

    def edit(state):
        assert key in state
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])

    _rewrite(ckpt_copy / "model.safetensors", edit)
    with pytest.raises(OmniditError) as info:
        load_model(ckpt_copy, use_ema=False)
    assert f"'{key}'" in str(info.value) and "shape" in str(info.value) and "model.safetensors" in str(info.value)


def test_extra_and_missing_keys_are_named(ckpt_copy):
    _rewrite(ckpt_copy / "model.safetensors", lambda s: s.update({"bogus.weight": torch.zeros(2)}))
    with pytest.raises(OmniditError, match="unexpected key 'bogus.weight'"):
        load_model(ckpt_copy, use_ema=False)
    _rewrite(ckpt_copy / "ema.safetensors", lambda s: s.pop("final_layer.linear.bias"))
    with pytest.raises(OmniditError, match="missing key 'final_layer.linear.bias'"):
        load_model(ckpt_copy, use_ema=True)


def test_load_state_into_is_strict_without_partial_load():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OmniditError, match="'bias'"):
        load_state_into(model, {"weight": torch.ones(2, 3), "bias": torch.ones(3)}, Path("x.safetensors"))
    assert_same_state(model.state_dict(), before)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="something-else/9"), "not an omnidit checkpoint config"),
    (lambda d: d.pop("format"), "not an omnidit checkpoint config"),
    (lambda d: d["train"].update(lrr=1.0), "did you mean 'train.lr'"),
])
def test_bad_config_json(ckpt_copy, edit, match):
    d = json.loads((ckpt_copy / "config.json").read_text())
    edit(d)
    (ckpt_copy / "config.json").write_text(json.dumps(d))
    with pytest.raises(OmniditError, match=match):
        load_model(ckpt_copy)


def test_malformed_config_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{oops")
    with pytest.raises(OmniditError, match="not valid JSON"):
        read_config(ckpt_copy)


# ---- optimizer state ----------------------------------------------------------------------------


def test_optimizer_state_flat_round_trip_restores_adamw_exactly(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    params = [p for p in net.parameters()]
    groups = [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.95))
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def step(model, optimizer):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step(net, opt)
    tensors, meta = optimizer_state_to_flat(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    # through the real storage formats: safetensors for tensors, JSON for the rest
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "s.safetensors"))
    tensors2 = load_file(str(tmp_path / "s.safetensors"))
    meta2 = json.loads(json.dumps(meta))

    clone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    clone.load_state_dict(net.state_dict())
    cparams = list(clone.parameters())
    opt2 = torch.optim.AdamW([{"params": cparams[::2], "weight_decay": 0.1},
                              {"params": cparams[1::2], "weight_decay": 0.0}], lr=0.5)
    opt2.load_state_dict(optimizer_state_from_flat(tensors2, meta2))
    assert opt2.param_groups[0]["lr"] == 1e-2 and tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.95)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for pid in s1:
        assert_same_state(s1[pid], s2[pid])
    for _ in range(2):
        step(net, opt)
        step(clone, opt2)
    assert_same_state(net.state_dict(), clone.state_dict())


def test_no_torch_load_in_source():
    offenders = []
    for path in sorted((REPO / "src" / "omnidit").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btorch\.load\s*\(|\bpickle\b|\bload\(.*weights_only\s*=\s*False", line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, offenders


# ---- exact resume (train.py) --------------------------------------------------------------------


@pytest.fixture
def restore_global_rng():
    """Trainer seeds (and resume restores) the global torch RNG; give other tests theirs back."""
    with torch.random.fork_rng(devices=[]):
        yield


# clips: shapes_video with some frames given as context (per-token timesteps drawn from the run's generator)
VIDEO_RUN = {"data": {"name": "shapes_video", "frames": 4, "fps": 8.0}, "train": {"given_p": 0.5}}


@pytest.mark.parametrize("counterfactual_weight,sections", [
    (0.0, {}), (1.0, {}),  # 1: with its own generator and extra pass
    (0.0, VIDEO_RUN), (1.0, VIDEO_RUN)])  # clips pair with their direction changed
def test_resume_is_bit_exact(tmp_path, make_tiny_config, monkeypatch, restore_global_rng, counterfactual_weight,
                             sections):
    from omnidit.train import Trainer

    small = {"steps": 6, "batch_size": 4, "checkpoint_every": 3, "log_every": 3, "warmup_steps": 2,
             "cond_dropout": 0.5, "ema_decay": 0.9, "seed": 3, "counterfactual_weight": counterfactual_weight,
             **sections.get("train", {})}
    extra = {k: v for k, v in sections.items() if k != "train"}
    straight = Trainer(make_tiny_config(tmp_path / "straight", train=small, **extra), progress=False)
    straight.run()

    split_dir = tmp_path / "split"
    first = Trainer(make_tiny_config(split_dir, train={**small, "steps": 3}, **extra), progress=False)
    first.run()
    half = {k: v.clone() for k, v in first.model.state_dict().items()}

    torch.manual_seed(12345)  # disturb the global RNG: resume must restore what it needs
    # A new process: a fresh text encoder whose cache is empty, so captions that the straight run took from its
    # cache are encoded again here, in other batches (shapes_quick stopped at 200 and resumed differed by 1e-9
    # when encodings depended on the batch's padding).
    monkeypatch.setattr("omnidit.text._LOADED", {})
    second = Trainer(make_tiny_config(split_dir, train=small, **extra), progress=False)
    trained = []
    real_step = second.train_step
    monkeypatch.setattr(second, "train_step", lambda: trained.append(second.step) or real_step())
    second.run()

    assert trained == [3, 4, 5]  # it resumed at step 3 instead of training again from scratch
    assert second.step == straight.step == 6
    assert_same_state(straight.model.state_dict(), second.model.state_dict())
    assert_same_state(straight.ema.state_dict(), second.ema.state_dict())
    for pid, state in straight.optimizer.state_dict()["state"].items():
        assert_same_state(state, second.optimizer.state_dict()["state"][pid])
    assert torch.equal(straight.generator.get_state(), second.generator.get_state())
    assert torch.equal(straight.counterfactual_generator.get_state(), second.counterfactual_generator.get_state())
    assert any(not torch.equal(v, straight.model.state_dict()[k]) for k, v in half.items())  # it did train
    # the saved final checkpoints agree too
    assert_same_state(load_file(str(tmp_path / "straight" / "checkpoint-0000006" / "ema.safetensors")),
                      load_file(str(split_dir / "checkpoint-0000006" / "ema.safetensors")))


# ---- fine-tuning from another run (train.init_from) ------------------------------------------------


def test_init_from_loads_the_ema_weights_and_starts_fresh(tmp_path, make_tiny_config, monkeypatch, capsys,
                                                          restore_global_rng):
    from omnidit.checkpoint import export_for_inference
    from omnidit.train import Trainer

    small = {"steps": 3, "batch_size": 4, "checkpoint_every": 3, "log_every": 3, "warmup_steps": 1, "ema_decay": 0.5}
    base = Trainer(make_tiny_config(tmp_path / "base", train=small), progress=False)
    base.run()
    ema = load_file(str(tmp_path / "base" / "checkpoint-0000003" / "ema.safetensors"))
    assert any(not torch.equal(v, base.model.state_dict()[k]) for k, v in ema.items())  # EMA != raw weights

    # A run folder (its latest checkpoint) and an fp16 export both work as sources.
    export_for_inference(tmp_path / "base", tmp_path / "export")
    for source, tolerance in ((tmp_path / "base", 0.0), (tmp_path / "export", 1e-3)):
        tuned = Trainer(make_tiny_config(tmp_path / f"tuned_{source.name}",
                                         train={**small, "steps": 1, "init_from": str(source)}), progress=False)
        loaded = []

        def fake_step(t=tuned, loaded=loaded):  # record what the first step would start from
            loaded.append(({k: v.clone() for k, v in t.model.state_dict().items()}, t.step, len(t.optimizer.state)))
            t.step += 1
            return 0.0, 0.0

        monkeypatch.setattr(tuned, "train_step", fake_step)
        tuned.run()
        assert [(step, n_state) for _, step, n_state in loaded] == [(0, 0)]  # step 0, fresh optimizer
        for k, v in ema.items():
            assert torch.allclose(loaded[0][0][k], v, atol=tolerance, rtol=0), k
            assert torch.allclose(tuned.ema.state_dict()[k], v, atol=tolerance, rtol=0), k

    # The history carries over: own steps x batch plus the source's images, through a resume and an export.
    history = ckpt.training_provenance(tmp_path / "tuned_base" / "checkpoint-0000001")
    assert history["step"] == 1 and history["images_seen"] == 1 * 4 + 3 * 4
    assert history["init_from"] == {"folder": str(tmp_path / "base"), "step": 3, "images_seen": 12}
    exported = export_for_inference(tmp_path / "tuned_base", tmp_path / "tuned_export")
    assert ckpt.training_provenance(exported) == history

    # An existing checkpoint of the fine-tuning run wins over init_from (resume continues it).
    again = Trainer(make_tiny_config(tmp_path / "tuned_base", train={**small, "steps": 1,
                                                                   "init_from": str(tmp_path / "missing")}),
                    progress=False)
    assert again.run().name == "checkpoint-0000001" and again.init_source == history["init_from"]

    # omnidit info tells the history of the exported fine-tuned model.
    from omnidit.cli import main

    assert main(["info", str(exported)]) == 0
    out = capsys.readouterr().out
    assert f"fine-tuned from {tmp_path / 'base'}, step 3" in out and "images seen   16" in out
    assert f"initialised from the weights in {tmp_path / 'base' / 'checkpoint-0000003'} at its step 3" in out


def test_init_from_a_different_model_is_a_clear_error(tmp_path, make_tiny_config, restore_global_rng):
    from omnidit.train import Trainer

    Trainer(make_tiny_config(tmp_path / "base", train={"steps": 1, "batch_size": 4}), progress=False).run()
    cases = (({"model": {"hidden_size": 128, "num_heads": 4}}, tmp_path / "base",
              "model.hidden_size: 64 there, 128 here; model.num_heads: 2 there, 4 here"),
             ({"text": {"max_length": 9}}, tmp_path / "base", "text.max_length: 32 there, 9 here"),
             ({}, tmp_path / "nowhere", "train.init_from=.*nowhere: model folder not found"))
    for sections, source, message in cases:
        other = make_tiny_config(tmp_path / "other", **sections,
                                 train={"steps": 1, "batch_size": 4, "init_from": str(source)})
        with pytest.raises(OmniditError, match=message) as e:
            Trainer(other, progress=False).run()
        assert "train.init_from" in e.value.hint


def test_init_grow_adds_identity_blocks_and_keeps_the_function(tmp_path, make_tiny_config, monkeypatch,
                                                              restore_global_rng):
    """train.init_grow: a deeper model starts from a shallower one's EMA weights and computes exactly the
    same velocity (the new blocks' adaLN gates are zero) until it trains; the old blocks are spread out."""
    from omnidit.train import Trainer

    base = Trainer(make_tiny_config(tmp_path / "base", model={"depth_single": 2},
                                    train={"steps": 2, "batch_size": 4, "ema_decay": 0.5}), progress=False)
    base.run()
    source, _ = ckpt.load_model(tmp_path / "base")
    deep_model = {"depth": 2, "depth_single": 4}
    grown = Trainer(make_tiny_config(tmp_path / "grown", model=deep_model,
                                     train={"steps": 1, "batch_size": 4, "init_from": str(tmp_path / "base"),
                                            "init_grow": True}), progress=False)
    monkeypatch.setattr(grown, "train_step", lambda: (setattr(grown, "step", grown.step + 1), (0.0, 0.0))[1])
    grown.run()
    model = grown.ema.eval()
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in source.parameters())
    x, ids, t, cond = fixed_inputs(grown.config)
    with torch.no_grad():
        before, after = source(x, ids, t, cond), model(x, ids, t, cond)
    assert before.abs().mean() > 1e-3  # the source does something, so equality below is informative
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # Old double block 0 of 1 stays at 0; old single blocks 0 and 1 of 2 go to 0 and 2 of 4; double block 1
    # and single blocks 1 and 3 are new, with zeroed modulations.
    state, old = model.state_dict(), source.state_dict()
    for k, v in old.items():
        assert torch.equal(state[k.replace("single_blocks.1.", "single_blocks.2.")], v), k
    for name in ("double_blocks.1.streams.img.mod.lin.weight", "single_blocks.1.mod.lin.weight",
                 "single_blocks.3.mod.lin.weight"):
        assert state[name].abs().max() == 0
    assert old["single_blocks.1.mod.lin.weight"].abs().max() > 0  # trained, so the moves above are informative
    assert state["single_blocks.3.linear1.weight"].abs().max() > 0  # trainable weights, not zeros

    # Without the flag the depths must match; shrinking or changing anything else is refused either way.
    cases = (({**deep_model}, False, "model.depth: 1 there, 2 here"),
             ({"depth": 1, "depth_single": 2, "hidden_size": 128, "num_heads": 4}, True, "model.hidden_size"))
    for model_section, flag, message in cases:
        other = make_tiny_config(tmp_path / "other", model=model_section,
                                 train={"steps": 1, "batch_size": 4, "init_from": str(tmp_path / "base"),
                                        "init_grow": flag})
        with pytest.raises(OmniditError, match=message):
            Trainer(other, progress=False).run()
    shallower = make_tiny_config(tmp_path / "shallower", model={"depth": 1, "depth_single": 0},
                                 train={"steps": 1, "batch_size": 4, "init_from": str(tmp_path / "base"),
                                        "init_grow": True})
    with pytest.raises(OmniditError, match="blocks can only be added") as e:
        Trainer(shallower, progress=False).run()
    assert "train.init_grow" in e.value.hint


def test_models_whose_blocks_differ_by_index_cannot_grow():
    """A model without single-stream blocks (its last double block's text branch is pre-only) or with SD3.5's
    dual-attention blocks has blocks that are not interchangeable: growing it is a clear error, not a misfit."""
    from omnidit.checkpoint import check_growable
    from omnidit.model.mmdit import MMDiTConfig

    small = dict(hidden_size=32, num_heads=2, axes_dim=(4, 6, 6))
    check_growable(MMDiTConfig(depth=1, depth_single=1, **small), MMDiTConfig(depth=2, depth_single=3, **small), "h")
    for source in (MMDiTConfig(depth=2, depth_single=0, **small),
                   MMDiTConfig(depth=2, depth_single=1, dual_attention_layers=(0,), **small)):
        check_growable(source, source, "h")  # the same depth: nothing moves
        with pytest.raises(OmniditError, match="cannot grow"):
            check_growable(source, replace(source, depth=3), "h")
