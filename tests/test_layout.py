"""Layout boxes (omnidit.layout): the adapter starts as the identity and leaves rows without boxes alone, layout
tokens sit at their boxes' centres, a layout run trains and saves the adapter alone and resumes exactly, its
checkpoint samples with boxes, the layout suite's judge passes perfect layouts, and mistakes are one-line errors."""

from __future__ import annotations

import copy
import re
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config_dict
from helpers import assert_resume_matches, build, random_condition, tiny_config
from safetensors.torch import load_file
from test_cli import assert_one_line_error, run_main

from omnidit.condition import Condition
from omnidit.config import config_from_dict
from omnidit.errors import OmniditError
from omnidit.layout import Box, add_layout_adapter, layout_fields, with_layout
from omnidit.model.math import rope_rotations
from omnidit.tokens import video_position_ids


class FakeEncoder:
    """Pooled phrase vectors from a seeded generator, one per phrase (what layout_fields reads)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, phrases: list[str]) -> Condition:
        return Condition(pooled=torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(
            sum(map(ord, p)))) for p in phrases]))


def _model_and_inputs():
    cfg = tiny_config(pooled_dim=16)
    model = build(cfg)
    adapter = add_layout_adapter(model, 3)
    x = torch.randn(2, 16, cfg.token_dim, generator=torch.Generator().manual_seed(1))
    ids = video_position_ids(1, 4, 4, 1.0, 1, len(cfg.axes_dim))
    cond = random_condition(cfg, 2)
    boxes = layout_fields([[Box("a red circle", 0.1, 0.1, 0.5, 0.5), Box("a blue square", 0.6, 0.6, 0.9, 0.9)], []],
                          FakeEncoder(16), 3, 16)
    return model, adapter, x, ids, cond, replace(cond, **boxes)


def test_the_adapter_starts_as_the_identity_and_skips_rows_without_boxes():
    model, adapter, x, ids, cond, with_boxes = _model_and_inputs()
    t = torch.tensor([0.3, 0.8])
    base = model(x, ids, t, cond)
    torch.testing.assert_close(model(x, ids, t, with_boxes), base, atol=0, rtol=0)  # zero output projections
    for block in adapter.blocks:
        torch.nn.init.normal_(block.proj.weight, std=0.2)
    out = model(x, ids, t, with_boxes)
    assert (out[0] - base[0]).abs().max() > 1e-3  # the row with boxes moves
    torch.testing.assert_close(out[1], base[1], atol=0, rtol=0)  # the row without boxes does not
    torch.testing.assert_close(model(x, ids, t, cond), base, atol=0, rtol=0)  # no layout fields: the base model
    twin = copy.deepcopy(model)  # the trainer's EMA copy: its hooks use its own adapter
    for block in twin.layout_adapter.blocks:
        torch.nn.init.zeros_(block.proj.weight)
    torch.testing.assert_close(twin(x, ids, t, with_boxes), base, atol=0, rtol=0)
    torch.testing.assert_close(model(x, ids, t, with_boxes), out, atol=0, rtol=0)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    model, adapter, x, ids, _, with_boxes = _model_and_inputs()
    for block in adapter.blocks:
        torch.nn.init.normal_(block.proj.weight, std=0.2)
    model.train()
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        adapter.zero_grad()
        model(x, ids, torch.tensor([0.3, 0.8]), with_boxes).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_layout_tokens_sit_at_their_box_centres_on_the_token_grid():
    model, adapter, *_ = _model_and_inputs()
    ids = video_position_ids(1, 4, 8, 1.0, 1, 3)  # 4 rows, 8 columns of tokens
    boxes = torch.tensor([[[0.0, 0.0, 0.25, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    expected = torch.tensor([[[0.0, 0.5, 0.5], [0.0, 2.5, 5.5]]])  # (time, row, column) of each centre
    rotations = adapter.positions(ids, boxes)
    torch.testing.assert_close(rotations, rope_rotations(torch.cat([ids, expected], 1), adapter.axes_dim,
                                                         adapter.theta))


def test_guidance_rows_carry_the_layout_and_the_null_branch_has_no_boxes():
    model, _, _, _, cond, _ = _model_and_inputs()
    null = Condition(txt=cond.txt[:1], pooled=cond.pooled[:1])
    boxes = [[Box("a red circle", 0.1, 0.1, 0.5, 0.5)], [Box("a blue square", 0.5, 0.5, 0.9, 0.9)]]
    two = Condition.cat([cond, cond])  # two candidates of two prompts, candidate-major
    c, n = with_layout(model, FakeEncoder(16), two, null, boxes, prompts=2)
    assert c.layout_mask.sum(1).tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(c.layout_boxes[:, 0], torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]] * 2))
    assert n.batch_size == 1 and not n.layout_mask.any()
    both = Condition.cat([c, n.repeat(4)])  # what classifier-free guidance runs
    assert both.layout_boxes.shape == (8, 3, 4) and both.layout_mask.sum() == 4
    dropped = c.where(torch.tensor([True, False, True, False]), n)  # the trainer's caption dropout
    assert dropped.layout_mask.sum(1).tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("boxes, message", [
    ([Box("a red circle", 0.5, 0.1, 0.5, 0.5)], "has no area"),
    ([Box("a red circle", -0.1, 0.1, 0.5, 0.5)], "is not inside"),
    ([Box("", 0.1, 0.1, 0.5, 0.5)], "empty phrase"),
    ([Box("a red circle", 0.1, 0.1, 0.5, 0.5)] * 4, "takes at most 3"),
    ([("a red circle", 0.1, 0.1, 0.5, 0.5)], "must be omnidit.layout.Box objects"),
])
def test_bad_boxes_are_clear_errors(boxes, message):
    model, _, _, _, cond, _ = _model_and_inputs()
    with pytest.raises(OmniditError, match=message):
        with_layout(model, FakeEncoder(16), cond, cond.rows(slice(0, 1)), boxes, prompts=2)


def _layout_config(out_dir, base, steps=4):
    return config_from_dict(tiny_config_dict(out_dir, train={"steps": steps, "checkpoint_every": 2, "lr": 1e-2,
                                                             "init_from": str(base), "layout_boxes": 4,
                                                             "warmup_steps": 0, "sample_every": 4}))


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory, tiny_run):
    from omnidit.train import train

    run = tmp_path_factory.mktemp("layout") / "run"
    train(_layout_config(run, tiny_run / "checkpoint-0000020"), progress=False)
    return run


def test_a_layout_run_trains_and_saves_the_adapter_alone_and_samples_with_boxes(layout_run, tiny_run):
    from omnidit.pipeline import load_pipeline

    for name in ("model.safetensors", "ema.safetensors"):
        state = load_file(str(layout_run / "checkpoint-0000004" / name))
        assert state and all(k.startswith("layout_adapter.") for k in state)
        assert any(k.endswith("proj.weight") and v.abs().sum() > 0 for k, v in state.items())  # it trained
    assert (layout_run / "samples" / "step_0000004.png").is_file()  # drawn with the scenes' boxes
    tuned = load_pipeline(layout_run, device="cpu")
    base = load_pipeline(tiny_run / "checkpoint-0000020", device="cpu")
    prompts = ["a red circle", "two blue squares"]
    torch.testing.assert_close(tuned.generate(prompts, seed=[1, 2]), base.generate(prompts, seed=[1, 2]),
                               atol=0, rtol=0)  # no boxes: the base model
    boxed = tuned.generate(prompts, seed=[1, 2], boxes=[Box("a red circle", 0.5, 0.5, 1.0, 1.0)])
    assert (boxed - base.generate(prompts, seed=[1, 2])).abs().mean() > 1e-4
    with pytest.raises(OmniditError, match="no layout adapter"):
        base.generate(prompts, boxes=[Box("a red circle", 0.5, 0.5, 1.0, 1.0)])


def test_a_layout_run_resumes_exactly(tmp_path, tiny_run, layout_run):
    base = tiny_run / "checkpoint-0000020"
    assert_resume_matches(lambda run, steps: _layout_config(run, base, steps), layout_run, tmp_path / "run")


# In the slow target (pytest -m slow; 21 s) to keep the default suite within CI's 10 minutes: the trainer's own
# two-process tests (tests/test_distributed.py) stay in it.
@pytest.mark.slow
def test_a_layout_run_on_two_processes_follows_the_single_process_one(tmp_path, tiny_run):
    import json
    import subprocess
    import sys

    from test_distributed import env, failure, final_weights

    config = tmp_path / "layout.json"
    config.write_text(json.dumps(tiny_config_dict(tmp_path / "unused", train={
        "steps": 3, "checkpoint_every": 3, "lr": 1e-2, "warmup_steps": 0, "layout_boxes": 4, "tensorboard": False,
        "init_from": str(tiny_run / "checkpoint-0000020")})))

    def train_on(out, nproc: int) -> subprocess.CompletedProcess:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        return subprocess.run([*launcher, "-m", "omnidit", "train", str(config), f"train.out_dir={out}",
                               "--no-progress"], env=env(), capture_output=True, text=True, timeout=300)

    single, double = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((single, 1), (double, 2)):
        done = train_on(out, nproc)
        assert done.returncode == 0, failure(done)
    a, b = final_weights(single), final_weights(double)
    assert a.keys() == b.keys() and all(k.startswith("layout_adapter.") for k in a)
    for k in a:  # float sums in another order; a rank that skipped the gradient all-reduce would be ~lr (1e-2) off
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("train, message", [
    ({"layout_boxes": 4, "init_from": ""}, "train.layout_boxes trains a layout adapter"),
    ({"layout_boxes": 4, "init_from": "x", "lora_rank": 2}, "drop train.lora_rank"),
    ({"layout_boxes": -1}, "whole number >= 0"),
])
def test_layout_config_mistakes_are_clear_errors(tmp_path, train, message):
    with pytest.raises(OmniditError, match=message):
        config_from_dict(tiny_config_dict(tmp_path, train=train))


@pytest.mark.parametrize("box, message", [
    (["a red circle", "0.5", "0.1", "0.5", "0.5"], "has no area"),
    (["a red circle", "0.5", "0.1", "1.5", "0.9"], "is not inside"),
    (["a red circle", "a", "0.1", "0.5", "0.9"], "are not four numbers"),
    (["a red circle", "0.1", "0.1", "0.5", "0.5"], "takes at most 4"),
])
def test_generate_box_errors_are_one_line_and_write_nothing(tmp_path, layout_run, capsys, box, message):
    args = ["generate", "a red circle", "--model", layout_run, "-o", tmp_path / "out.png", "--steps", 2]
    repeat = 5 if "at most" in message else 1
    for _ in range(repeat):
        args += ["--box", *box]
    code, _, err = run_main(capsys, *args)
    assert_one_line_error(code, err)
    assert re.search(message, err), err
    assert not (tmp_path / "out.png").exists()


def test_generate_writes_the_boxes_in_the_metadata_and_info_names_the_adapter(tmp_path, layout_run, tiny_run, capsys):
    from PIL import Image

    out = tmp_path / "out.png"
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", layout_run, "--steps", 2, "-o", out,
                            "--box", "a red circle", 0.5, 0.5, 1, 1)
    assert code == 0, err
    assert Image.open(out).info["boxes"] == "[['a red circle', 0.5, 0.5, 1.0, 1.0]]"
    code, out, _ = run_main(capsys, "info", layout_run)
    assert code == 0 and "a layout adapter for up to 4 boxes" in out
    code, _, err = run_main(capsys, "generate", "a red circle", "--model", tiny_run, "-o", tmp_path / "no.png",
                            "--box", "a red circle", 0.5, 0.5, 1, 1)
    assert_one_line_error(code, err, "no layout adapter")
    assert not (tmp_path / "no.png").exists()


def test_the_layout_judge_passes_perfect_layouts_and_fails_moved_objects():
    from omnidit.data.shapes import render_scene, to_tensor
    from omnidit.evaluate.layout_suite import CATEGORIES, layout_cases, placed_objects
    from omnidit.layout import scene_boxes

    scenes = layout_cases(32, 32, ["red triangle"], per_category=6)
    assert [s.kind for s in scenes] == [k for k in CATEGORIES for _ in range(6)]
    for scene in scenes:
        want = [(o.colour, o.shape) for o in scene.objects]
        boxes = scene_boxes(scene)
        placed, count, _ = placed_objects(boxes, want, to_tensor(render_scene(scene, 32, 32)))
        assert all(placed) and count == len(boxes), scene
        flipped = [Box(b.phrase, 1 - b.x1, 1 - b.y1, 1 - b.x0, 1 - b.y0) for b in boxes]  # mirrored through the centre
        moved, _, _ = placed_objects(flipped, want, to_tensor(render_scene(scene, 32, 32)))
        assert not all(moved) or scene.kind == "count", scene


def test_the_move_judge_passes_every_perfect_move_and_no_unmoved_input():
    from omnidit.evaluate.edit_suite import MOVE, PASTE_MOVE, judge_edit, move_cases

    cases = move_cases(32, 32, ["red triangle"], 6)
    assert len(cases) == 6 and {c["category"] for c in cases} == {MOVE}
    for case in cases:
        assert judge_edit(case, case["answer"])[0], case["prompt"]
        assert not judge_edit(case, case["image"])[0], case["prompt"]
        assert case["mask"].any() and len(case["boxes"]) == 2
    pasted = move_cases(32, 32, ["red triangle"], 6, paste=True)  # the same scenes, moved by pasting
    assert all(torch.equal(a["answer"], b["answer"]) for a, b in zip(pasted, cases, strict=True))
    for case, by_layout in zip(pasted, cases):
        assert case["category"] == PASTE_MOVE and case["boxes"] is None
        assert judge_edit(case, case["answer"])[0] and not judge_edit(case, case["image"])[0]  # the hole still shows
        assert (case["mask"] & ~by_layout["mask"]).sum() == 0  # the hole lies in the old place
        filled = torch.where(case["mask"], by_layout["answer"], case["image"])  # the hole filled as the answer has it
        assert judge_edit(case, filled)[0], case["prompt"]


def test_inpaint_takes_boxes_for_a_move(tmp_path, layout_run, tiny_run, capsys):
    import numpy as np
    from PIL import Image

    source = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)).save(source)
    out = tmp_path / "moved.png"
    code, _, err = run_main(capsys, "inpaint", source, "box:0.5,0.5,1,1", "a red circle", "--model", layout_run,
                            "--box", "a red circle", 0.5, 0.5, 1, 1, "--steps", 2, "-o", out)
    assert code == 0, err
    assert Image.open(out).info["boxes"] == "[['a red circle', 0.5, 0.5, 1.0, 1.0]]"
    code, _, err = run_main(capsys, "inpaint", source, "box:0.5,0.5,1,1", "a red circle", "--model", tiny_run,
                            "--box", "a red circle", 0.5, 0.5, 1, 1, "-o", tmp_path / "no.png")
    assert_one_line_error(code, err, "no layout adapter")
    assert not (tmp_path / "no.png").exists()


def test_the_layout_and_edit_suites_run_with_and_without_an_adapter(tmp_path, layout_run, tiny_run, capsys):
    import json

    for model, given in ((layout_run, True), (tiny_run, False)):
        code, _, err = run_main(capsys, "eval", model, "--suite", "layout", "--limit", 1, "--no-progress",
                                "--json", tmp_path / "layout.json")
        assert code == 0, err
        report = json.loads((tmp_path / "layout.json").read_text())
        assert report["boxes_given"] is given and set(report["categories"]) == {"single", "count", "pair", "relation"}
        assert report["objects"] >= 4 and 0 <= report["objects_placed"] <= 1
    code, _, err = run_main(capsys, "eval", layout_run, "--suite", "edit", "--limit", 1, "--no-progress",
                            "--json", tmp_path / "edit.json")
    assert code == 0, err
    assert "inpaint_move" in json.loads((tmp_path / "edit.json").read_text())["categories"]


def test_boxes_are_batch_invariant_with_candidates_guidance_and_skip_layers(layout_run):
    from omnidit.pipeline import load_pipeline

    pipe = load_pipeline(layout_run, device="cpu")
    adapter = pipe.model.layout_adapter
    with torch.no_grad():  # a visible adapter, so that a wrong row would show
        for block in adapter.blocks:
            block.proj.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    a, b = [Box("a red circle", 0.0, 0.0, 0.5, 0.5)], [Box("a blue square", 0.5, 0.5, 1.0, 1.0)]
    settings = dict(candidates=2, skip_scale=1.0, skip_blocks=[0], steps=3)
    both = pipe.generate(["a red circle", "a blue square"], seed=[1, 2], boxes=[a, b], **settings)
    torch.testing.assert_close(both[1:], pipe.generate(["a blue square"], seed=[2], boxes=[b], **settings),
                               atol=1e-5, rtol=0)
    assert (both[1] - pipe.generate(["a blue square"], seed=[2], boxes=[a], **settings)[0]).abs().max() > 1e-3


def test_compiled_blocks_with_a_layout_adapter_sample_what_eager_samples_without_recompiling(layout_run):
    from omnidit.pipeline import load_pipeline

    torch._dynamo.reset()
    eager, compiled = (load_pipeline(layout_run, device="cpu") for _ in range(2))
    for pipe in (eager, compiled):
        with torch.no_grad():  # a visible adapter
            for block in pipe.model.layout_adapter.blocks:
                block.proj.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    compiled.model.compile_blocks()
    settings = dict(candidates=1, steps=3)
    # Each block compiles once; a traced hook would compile once per block index, past a limit of one.
    try:
        with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
            first = [Box("a red circle", 0.0, 0.0, 0.5, 0.5)]
            torch.testing.assert_close(compiled.generate(["a red circle"], seed=1, boxes=first, **settings),
                                       eager.generate(["a red circle"], seed=1, boxes=first, **settings),
                                       atol=1e-4, rtol=0)
            moved = [Box("a red circle", 0.5, 0.5, 1.0, 1.0)]
            with torch.compiler.set_stance("fail_on_recompile"):  # new boxes, seed and step count
                again = compiled.generate(["a red circle"], seed=2, boxes=moved, **{**settings, "steps": 4})
        torch.testing.assert_close(again, eager.generate(["a red circle"], seed=2, boxes=moved,
                                                         **{**settings, "steps": 4}), atol=1e-4, rtol=0)
    finally:
        torch._dynamo.reset()


def test_inpainting_with_boxes_keeps_the_pixels_outside_the_mask(layout_run):
    from omnidit.pipeline import load_pipeline

    pipe = load_pipeline(layout_run, device="cpu")
    with torch.no_grad():
        for block in pipe.model.layout_adapter.blocks:
            block.proj.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    image = pipe.generate(["a red circle"], seed=1, steps=2)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[8:, 8:] = True
    boxed = pipe.inpaint(["a red circle"], image, mask, seed=0, steps=2, boxes=[Box("a red circle", .5, .5, 1, 1)])
    plain = pipe.inpaint(["a red circle"], image, mask, seed=0, steps=2)
    assert torch.equal(boxed[:, :, ~mask], image[:, :, ~mask]) and (boxed - plain).abs().max() > 1e-3


def test_adapter_folders_are_refused_where_they_are_not_whole_models(layout_run, make_tiny_config, tmp_path):
    from omnidit.convert.export import export_diffusers
    from omnidit.train import Trainer

    with pytest.raises(OmniditError, match="holds an adapter"):
        export_diffusers(layout_run, tmp_path / "d")
    with pytest.raises(OmniditError, match="LayoutTrainer"):
        Trainer(_layout_config(tmp_path / "run", layout_run), progress=False)


@pytest.mark.parametrize("scheme", ["w8a8", "w8"])
def test_a_quantized_layout_model_keeps_its_adapter_in_float_and_samples_boxes_like_the_float_one(
        layout_run, tmp_path, scheme):
    import shutil

    from safetensors.torch import save_file

    from omnidit.pipeline import load_pipeline
    from omnidit.quantize import quantize_folder

    visible = tmp_path / "visible"  # the run's adapter made visible (a 4-step run barely moves it)
    shutil.copytree(layout_run / "checkpoint-0000004", visible, ignore=shutil.ignore_patterns("training_state"))
    for name in ("model.safetensors", "ema.safetensors"):
        state = load_file(str(visible / name))
        generator = torch.Generator().manual_seed(0)
        state = {k: torch.randn(v.shape, generator=generator) * 0.2 if k.endswith("proj.weight") else v
                 for k, v in state.items()}
        save_file(state, str(visible / name))
    out = quantize_folder(visible, tmp_path / "q", scheme)
    stored = load_file(str(out / "model.safetensors"))
    adapter = {k: v for k, v in stored.items() if k.startswith("layout_adapter.")}
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())  # the adapter stays float
    assert stored["single_blocks.0.linear1.weight"].dtype == torch.int8  # the base's blocks do not
    boxes = [Box("a red circle", 0.5, 0.5, 1.0, 1.0)]
    floats, quantized = load_pipeline(visible, device="cpu"), load_pipeline(out, device="cpu")
    settings = dict(seed=[1, 2], steps=3)
    reference = floats.generate(["a red circle", "two blue squares"], boxes=boxes, **settings)
    drawn = quantized.generate(["a red circle", "two blue squares"], boxes=boxes, **settings)
    unboxed = quantized.generate(["a red circle", "two blue squares"], **settings)
    error, effect = (drawn - reference).abs().mean(), (drawn - unboxed).abs().mean()
    assert error < 0.02 and effect > 10 * error, (error, effect)
