"""LoRA fine-tuning with omnidit's trainer (train.lora_rank): only the adapter trains and is saved, a LoRA
checkpoint loads as an ordinary model (its base from train.init_from, the adapter folded in) and equals the base
with adapter.safetensors applied through --lora, runs resume exactly, and mistakes are one-line errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config_dict
from helpers import assert_resume_matches, fixed_inputs, randomize, record_results
from safetensors.torch import load_file

from omnidit.config import config_from_dict
from omnidit.errors import OmniditError
from omnidit.train_batches import object_loss_weights, shows_shapes


def _lora_config(out_dir, base, steps=4, data=None, **train):
    return config_from_dict(tiny_config_dict(out_dir, data=data or {}, train={
        "steps": steps, "checkpoint_every": 2, "lr": 1e-2, "init_from": str(base), "lora_rank": 2, "warmup_steps": 0,
        **train}))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_run):
    from omnidit.train import train

    run = tmp_path_factory.mktemp("lora") / "run"
    train(_lora_config(run, tiny_run / "checkpoint-0000020"), progress=False)
    return run


def test_only_the_adapter_trains_and_is_saved(lora_run, tiny_run):
    final = lora_run / "checkpoint-0000004"
    for name in ("model.safetensors", "ema.safetensors"):
        state = load_file(str(final / name))
        assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
        assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in state.items())  # B left zero: it trained
    base = (tiny_run / "checkpoint-0000020" / "model.safetensors").stat().st_size
    assert (final / "model.safetensors").stat().st_size < base / 2
    assert (final / "adapter.safetensors").is_file()


def test_a_lora_checkpoint_is_its_base_with_the_adapter(lora_run, tiny_run):
    from omnidit.lora import apply_lora_specs
    from omnidit.pipeline import load_pipeline

    tuned = load_pipeline(lora_run, device="cpu")
    base = load_pipeline(tiny_run / "checkpoint-0000020", device="cpu")
    prompts = ["a red circle", "two blue squares"]
    before = base.generate(prompts, seed=[1, 2])
    apply_lora_specs(base.model, [str(lora_run / "checkpoint-0000004" / "adapter.safetensors")])
    with_adapter = base.generate(prompts, seed=[1, 2])
    after = tuned.generate(prompts, seed=[1, 2])
    torch.testing.assert_close(after, with_adapter, atol=1e-4, rtol=0)
    assert (after - before).abs().mean() > 1e-3
    assert not any(".lora_" in k or "base_layer" in k for k in tuned.model.state_dict())  # a plain, merged model


def test_a_lora_run_resumes_exactly(tmp_path, tiny_run, lora_run):
    base = tiny_run / "checkpoint-0000020"
    assert_resume_matches(lambda run, steps: _lora_config(run, base, steps), lora_run, tmp_path / "run")


@pytest.mark.parametrize("train, message", [
    ({"lora_rank": 2, "init_from": ""}, "train.init_from is empty"),
    ({"lora_rank": -1, "init_from": "x"}, "train.lora_rank must be a whole number"),
    ({"lora_rank": 2, "init_from": "x", "parallel": "fsdp"}, "DDP or one process"),
    ({"lora_targets": ".*qkv"}, "train.lora_rank is 0"),
])
def test_lora_config_mistakes_are_clear_errors(tmp_path, train, message):
    with pytest.raises(OmniditError, match=message):
        config_from_dict(tiny_config_dict(tmp_path, train=train))


def test_lora_targets_that_match_nothing_are_an_error(tmp_path, tiny_run):
    from omnidit.train import train

    with pytest.raises(OmniditError, match="matches no linear layer"):
        train(_lora_config(tmp_path / "run", tiny_run / "checkpoint-0000020", lora_targets="nothing"), progress=False)


def test_object_loss_weights_weigh_the_objects_and_the_pixels_next_to_them():
    from omnidit.data.shapes import BACKGROUND, ShapesDataset, render_scene

    dataset = ShapesDataset(32, 32, seed=5, new_shapes=["cross"])
    for index in range(6):
        image = torch.from_numpy(render_scene(dataset.scene(index), 32, 32))  # (H, W, 3)
        mask = dataset.object_mask(index)
        assert torch.equal(mask, (image != torch.tensor(BACKGROUND, dtype=torch.uint8)).any(-1)) and mask.any()
        weights = object_loss_weights(dataset, [index], 4.0)[0]  # (3, H, W)
        assert weights.shape == (3, 32, 32) and torch.equal(weights[0], weights[2])
        assert (weights[0][mask] == 4).all()
        near = torch.zeros(34, 34, dtype=torch.bool)  # every pixel within one pixel of an object's, by hand
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                near[dy:dy + 32, dx:dx + 32] |= mask
        near = near[1:33, 1:33]
        assert (weights[0][near] == 4).all() and (weights[0][~near] == 1).all()
        assert near.sum() > mask.sum()


def test_object_masks_of_some_shapes_are_the_pixels_those_objects_keep():
    from omnidit.data.shapes import COLOURS, Scene, ShapeObject, ShapesDataset, object_mask, render_scene

    # A red cross, then a blue square drawn over its right arm: the cross's mask is what stays red.
    scene = Scene((ShapeObject("cross", "red", "large", (0.1, 0.1, 0.7, 0.7)),
                   ShapeObject("square", "blue", "small", (0.5, 0.3, 0.8, 0.6))), "", "pair")
    image = torch.from_numpy(render_scene(scene, 32, 32))
    for shapes, colour in ((["cross"], "red"), (["square"], "blue")):
        painted = (image == torch.tensor(COLOURS[colour], dtype=torch.uint8)).all(-1)
        assert torch.equal(torch.from_numpy(object_mask(scene, 32, 32, shapes)), painted) and painted.any()
    assert torch.equal(torch.from_numpy(object_mask(scene, 32, 32, ["circle"])), torch.zeros(32, 32, dtype=bool))
    dataset = ShapesDataset(32, 32, seed=5, new_shapes=["cross"], new_shape_weight=3.0)
    index = next(i for i in range(100) if {o.shape for o in dataset.scene(i).objects} > {"cross"})  # a cross and more
    crosses = object_loss_weights(dataset, [index], 4.0, ["cross"])[0, 0]
    every = object_loss_weights(dataset, [index], 4.0)[0, 0]
    assert (crosses == 4).sum() < (every == 4).sum() and ((crosses == 4) <= (every == 4)).all()


def test_object_loss_weight_trains_another_adapter_and_resumes_exactly(tmp_path, tiny_run, lora_run):
    base = tiny_run / "checkpoint-0000020"

    def config(run, steps):
        return _lora_config(run, base, steps, object_loss_weight=4.0)

    from omnidit.train import train

    train(config(tmp_path / "straight", 4), progress=False)
    weighted = load_file(str(tmp_path / "straight" / "checkpoint-0000004" / "model.safetensors"))
    plain = load_file(str(lora_run / "checkpoint-0000004" / "model.safetensors"))
    assert max((weighted[k] - plain[k]).abs().max() for k in plain) > 1e-4  # the same draws, another loss
    assert_resume_matches(config, tmp_path / "straight", tmp_path / "resumed")


def test_adapters_off_runs_the_base_and_restores_each_adapter_weight():
    from omnidit.lora import adapters_off, add_lora, lora_layers
    from omnidit.model import MMDiT

    torch.manual_seed(0)
    config = config_from_dict(tiny_config_dict("unused"))
    model = randomize(MMDiT(config.model)).eval()  # not the zero init, whose output is zero
    base = MMDiT(config.model).eval()
    base.load_state_dict(model.state_dict())
    add_lora(model, 2)
    for layer in lora_layers(model).values():  # B away from zero, so that the adapter changes the output
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    frozen = next(iter(lora_layers(model).values())).lora_A["default"].weight
    frozen.requires_grad_(False)  # a weight frozen before stays frozen
    inputs = fixed_inputs(config)
    with torch.no_grad():
        adapted = model(*inputs)
        with adapters_off(model):
            off = model(*inputs)
        again = model(*inputs)
    torch.testing.assert_close(off, base(*inputs), atol=1e-6, rtol=0)
    assert (adapted - off).abs().max() > 1e-2
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)
    flags = [p.requires_grad for layer in lora_layers(model).values() for n, p in layer.named_parameters()
             if "lora_" in n]
    assert not frozen.requires_grad and sum(flags) == len(flags) - 1


def test_shows_shapes_finds_the_scenes_whose_caption_names_the_shape():
    from omnidit.data.shapes import ShapesDataset

    dataset = ShapesDataset(32, 32, seed=5, new_shapes=["cross"], new_shape_weight=3.0)
    shows = shows_shapes(dataset, range(60), ["cross"]).tolist()
    assert shows == ["cross" in dataset.scene(i).caption for i in range(60)]
    assert 10 < sum(shows) < 50


CROSS = {"new_shapes": ["cross"]}


def _preserving_trainer(tmp_path, base, monkeypatch, known: bool | None = None, **train):
    """A Trainer of a LoRA run on data with crosses; ``known``: every scene taken as showing no new shape (True)
    or as showing one (False), None: as the data says."""
    from omnidit import train as train_module

    if known is not None:
        monkeypatch.setattr(train_module, "shows_shapes", lambda dataset, idx, shapes: torch.full((len(idx),),
                                                                                                   not known))
    return train_module.Trainer(_lora_config(tmp_path, base, 4, CROSS, **train), progress=False)


def test_prior_preservation_regresses_known_scenes_on_the_base(tmp_path, tiny_run, monkeypatch):
    base = tiny_run / "checkpoint-0000020"
    # The adapter starts as the identity (B = 0): a scene without a new shape has nothing to learn (up to the
    # rounding of the separate forward passes), in each of the two micro-batches.
    loss, norm = _preserving_trainer(tmp_path / "a", base, monkeypatch, True, prior_preservation=True,
                                     grad_accum=2).train_step()
    assert loss < 1e-12 and norm < 1e-5
    # A scene that shows one keeps the data's target: the same step as without the option.
    with_new = _preserving_trainer(tmp_path / "b", base, monkeypatch, False, prior_preservation=True).train_step()
    plain = _preserving_trainer(tmp_path / "c", base, monkeypatch, False).train_step()
    assert with_new == plain and with_new[0] > 0.05


@pytest.mark.parametrize("key, dropout, factor", [("prior_weight", 0.0, 5.0), ("prior_weight", 0.99999, 1.0),
                                                  ("prior_weight_dropped", 0.99999, 5.0),
                                                  ("prior_weight_dropped", 0.0, 1.0)])
def test_prior_weight_multiplies_the_known_scenes_errors_where_the_caption_is_kept(tmp_path, tiny_run, monkeypatch,
                                                                                   key, dropout, factor):
    # prior_weight_dropped does the same where the caption was dropped (the unconditional velocity).
    from omnidit import train as train_module

    base = tiny_run / "checkpoint-0000020"
    losses = {}
    for weight in (1.0, 5.0):
        trainer = _preserving_trainer(tmp_path / str(weight), base, monkeypatch, False, prior_preservation=True,
                                      cond_dropout=dropout, **{key: weight})
        for _ in range(2):  # scenes with a new shape: the adapter moves alike under both weights
            trainer.train_step()
        monkeypatch.setattr(train_module, "shows_shapes",
                            lambda dataset, idx, shapes: torch.zeros(len(idx), dtype=torch.bool))
        losses[weight] = trainer.train_step()[0]  # every scene known: its error against the base
    # Weighted when the caption is kept; a dropped caption's row (the unconditional velocity) keeps weight 1.
    assert losses[1.0] > 1e-9
    assert losses[5.0] == pytest.approx(factor * losses[1.0], rel=1e-5)


def test_prior_weight_weighs_the_known_rows_with_kept_captions_in_each_micro_batch(tmp_path, tiny_run, monkeypatch):
    from omnidit import train as train_module

    base = tiny_run / "checkpoint-0000020"
    trainer = _preserving_trainer(tmp_path, base, monkeypatch, False, prior_preservation=True, prior_weight=5.0,
                                  prior_weight_dropped=2.0, grad_accum=2)
    for _ in range(2):  # scenes with a new shape: the adapter moves away from the base
        trainer.train_step()
    batch = trainer.config.train.batch_size
    known = torch.arange(batch) % 2 == 0
    kept = torch.arange(batch) % 3 != 0
    monkeypatch.setattr(train_module, "shows_shapes", lambda dataset, idx, shapes: ~known[:len(idx)])
    monkeypatch.setattr(train_module, "condition_keep_mask", lambda n, p, generator: kept[:n])
    errors = record_results(monkeypatch, train_module, "velocity_errors")
    loss = trainer.train_step()[0]
    heavy, dropped = (known & kept).chunk(2), (known & ~kept).chunk(2)
    assert len(errors) == 2 and all(e.shape == h.shape for e, h in zip(errors, heavy))
    expected = sum((e * torch.where(h, 5.0, torch.where(d, 2.0, 1.0))).mean()
                   for e, h, d in zip(errors, heavy, dropped)) / 2
    assert loss == pytest.approx(float(expected), rel=1e-6)
    # The weights did act: the loss exceeds the plain mean by 4 times the kept known rows' share of it and once the
    # dropped known rows' share.
    plain = float(sum(e.mean() for e in errors) / 2)
    heavy_share = float(sum((e * h).mean() for e, h in zip(errors, heavy)) / 2)
    dropped_share = float(sum((e * d).mean() for e, d in zip(errors, dropped)) / 2)
    assert heavy_share > 1e-6 and dropped_share > 1e-6
    assert loss - plain == pytest.approx(4 * heavy_share + dropped_share, rel=0.02)


def test_prior_preservation_targets_are_the_base_model_once_the_adapter_has_moved(tmp_path, tiny_run):
    from omnidit.flow import interpolate
    from omnidit.pipeline import load_pipeline

    base = tiny_run / "checkpoint-0000020"
    trainer = _preserving_trainer(tmp_path, base, None, prior_preservation=True)
    for _ in range(2):
        trainer.train_step()
    x0, ids, t, cond = fixed_inputs(trainer.config)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    known = torch.tensor([True, False])
    target = trainer.preserved_targets(x0, noise, t, cond, ids, known)
    x_t = interpolate(x0, noise, t)
    with torch.no_grad():
        frozen = load_pipeline(base, device="cpu").model(x_t, ids, t, cond)
        adapted = trainer.model(x_t, ids, t, cond)
    torch.testing.assert_close(target[0], frozen[0], atol=1e-5, rtol=0)
    assert (adapted[0] - frozen[0]).abs().max() > 1e-3  # the adapter has moved: the target is not its output
    assert torch.equal(target[1], noise[1] - x0[1])
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if ".lora_" in n)


def test_prior_preservation_trains_another_adapter_and_resumes_exactly(tmp_path, tiny_run):
    base = tiny_run / "checkpoint-0000020"
    from omnidit.train import train

    train(_lora_config(tmp_path / "plain", base, 4, CROSS), progress=False)
    train(_lora_config(tmp_path / "straight", base, 4, CROSS, prior_preservation=True), progress=False)
    kept = load_file(str(tmp_path / "straight" / "checkpoint-0000004" / "model.safetensors"))
    plain = load_file(str(tmp_path / "plain" / "checkpoint-0000004" / "model.safetensors"))
    assert max((kept[k] - plain[k]).abs().max() for k in plain) > 1e-4  # the same draws, other targets
    assert_resume_matches(lambda run, steps: _lora_config(run, base, steps, CROSS, prior_preservation=True),
                          tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("sections, message", [
    ({"train": {"prior_preservation": True}, "data": CROSS}, "needs train.lora_rank"),
    ({"train": {"prior_preservation": True, "lora_rank": 2, "init_from": "shapes"}}, "data.new_shapes"),
    ({"train": {"prior_preservation": True, "lora_rank": 2, "init_from": "shapes"},
      "data": {"new_shapes": ["cross"], "mix_name": "digits", "mix_every": 4}}, "no data.mix_name"),
    ({"train": {"prior_weight": 0}}, "prior_weight must be > 0"),
    ({"train": {"prior_weight": 4}}, "train.prior_preservation is off"),
    ({"train": {"prior_weight_dropped": -1}}, "prior_weight_dropped must be > 0"),
    ({"train": {"prior_weight_dropped": 4}}, "prior_weight_dropped weighs prior preservation's scenes"),
    ({"train": {"object_loss_weight": 0}}, "must be > 0"),
    ({"train": {"object_loss_weight": 4}, "data": {"name": "digits"}}, "shapes or shapes_video in pixels"),
    ({"train": {"object_loss_weight": 4}, "data": {"cache_dir": "cache"}}, "needs data.name=shapes or shapes_video"),
    ({"train": {"object_loss_weight": 4, "object_loss_shapes": ["cross"]}}, "names 'cross', which the data never"),
    ({"train": {"object_loss_shapes": ["circle"]}}, "object_loss_weight is 1"),
])
def test_object_loss_and_prior_preservation_mistakes_are_clear_errors(tmp_path, sections, message):
    with pytest.raises(OmniditError, match=message):
        config_from_dict(tiny_config_dict(tmp_path, **sections))


def test_a_lora_run_on_two_processes_follows_the_single_process_one(tmp_path):
    import subprocess

    from test_distributed import env, failure, final_weights, train_cmd

    base = tmp_path / "base"
    subprocess.run(train_cmd(base, "train.steps=2", "train.checkpoint_every=2"), check=True, env=env(),
                   capture_output=True, timeout=300)
    lora = ["train.steps=3", "train.checkpoint_every=3", f"train.init_from={base}", "train.lora_rank=2"]
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run(train_cmd(single, *lora), check=True, env=env(), capture_output=True, timeout=300)
    done = subprocess.run(train_cmd(double, *lora, nproc=2), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure(done)
    a, b = final_weights(single), final_weights(double)
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_eval_and_serve_take_adapters(tmp_path, lora_run, tiny_run, capsys):
    import json

    from test_cli import assert_one_line_error, run_main

    from omnidit.pipeline import load_pipeline
    from omnidit.serve.command import apply_serve_loras

    adapter = lora_run / "checkpoint-0000004" / "adapter.safetensors"
    out = tmp_path / "eval.json"
    code, _, err = run_main(capsys, "eval", tiny_run, "--suite", "shapes", "--limit", "1", "--n-per-prompt", "1",
                            "--no-fd", "--no-progress", "--lora", f"{adapter}:0.5", "--json", out)
    assert code == 0, err
    assert json.loads(out.read_text())["settings"]["lora"] == [f"{adapter}:0.5"]
    code, _, err = run_main(capsys, "eval", tiny_run, "--suite", "shapes", "--limit", "1", "--lora",
                            tmp_path / "missing.safetensors")
    assert_one_line_error(code, err, "LoRA file not found")

    base = tiny_run / "checkpoint-0000020"
    pipes = {"a": load_pipeline(base, device="cpu"), "b": load_pipeline(base, device="cpu")}
    applied = apply_serve_loras(pipes, [str(adapter), f"b={adapter}:0.5"])
    assert applied == {"a": ["adapter:1"], "b": ["adapter:0.5"]}
    tuned = load_pipeline(lora_run, device="cpu")
    torch.testing.assert_close(pipes["a"].generate(["a red circle"], seed=3),
                               tuned.generate(["a red circle"], seed=3), atol=1e-4, rtol=0)


def _uncond_base_run(tmp_path, lora_run):
    """A copy of the LoRA run's last checkpoint whose config asks for sample.uncond_base."""
    import json
    import shutil

    folder = tmp_path / "uncond_base"
    shutil.copytree(lora_run / "checkpoint-0000004", folder)
    config = json.loads((folder / "config.json").read_text())
    config["sample"]["uncond_base"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_uncond_base_guides_against_the_lora_runs_base(tmp_path, lora_run, tiny_run):
    from omnidit.checkpoint import load_model
    from omnidit.pipeline import load_pipeline

    pipe = load_pipeline(_uncond_base_run(tmp_path, lora_run), device="cpu")
    base, _ = load_model(tiny_run / "checkpoint-0000020", device="cpu")
    assert pipe.uncond_model is not None
    for name, value in base.state_dict().items():  # the base's weights, the adapter not folded in
        torch.testing.assert_close(pipe.uncond_model.state_dict()[name], value, atol=0, rtol=0)
    prompts, settings = ["a red circle", "two blue squares"], {"steps": 4, "cfg": 4.0}
    against_base = pipe.generate(prompts, seed=[1, 2], **settings)
    plain = load_pipeline(lora_run, device="cpu").generate(prompts, seed=[1, 2], **settings)
    assert (against_base - plain).abs().mean() > 1e-3
    pipe.uncond_model = pipe.model  # the run's own model in the unconditional branch: plain guidance again
    torch.testing.assert_close(pipe.generate(prompts, seed=[1, 2], **settings), plain, atol=1e-5, rtol=0)
    with pytest.raises(OmniditError, match="step caching follows one model"):
        pipe.generate(prompts, seed=1, steps=4, cache="interval")
    from omnidit.editing import _velocity

    with pytest.raises(OmniditError, match="editing does not follow sample.uncond_base"):
        _velocity(pipe, prompts, 4.0, torch.zeros(1), None)


def test_uncond_base_needs_a_lora_run(tmp_path):
    with pytest.raises(OmniditError, match="this is not a LoRA run"):
        config_from_dict(tiny_config_dict(tmp_path, sample={"uncond_base": True}))
