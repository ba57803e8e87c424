"""The inpainting adapter shipped in the package (`shapes-inpaint`): a LoRA on the shipped shapes model, trained to
fill masks (configs/inpaint_lora.json). It loads offline by name, is small, is what `omnidit inpaint` uses when no
model is given, keeps every pixel outside the mask, and draws the asked object in the hole; the shipped shapes model
itself stays as it was, so generation does not pay for inpainting."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import assert_shipped_folder
from PIL import Image
from test_cli import run_main

from omnidit.checkpoint import shipped_model_dir
from omnidit.evaluate.edit_suite import INPAINTS, edit_cases, judge_edit
from omnidit.images import to_pil
from omnidit.inpaint import resolve_mode
from omnidit.lora import DEFAULT_TARGETS
from omnidit.pipeline import load_pipeline

MAX_SHIPPED_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def inpainter():
    return load_pipeline("shapes-inpaint", device="cpu")


def test_shipped_adapter_is_small_float16_and_sits_on_the_shipped_model(inpainter):
    assert_shipped_folder("shapes-inpaint", "inpaint_model", MAX_SHIPPED_BYTES)
    train = inpainter.config.train
    assert train.init_from == "shapes" and train.lora_rank == 32
    assert train.region_caption > 0 and resolve_mode("auto", inpainter.config) == "tokens"
    base = load_pipeline("shapes", device="cpu")
    adapted = dict(inpainter.model.named_parameters())
    changed = [name for name, p in base.model.named_parameters() if not torch.equal(p, adapted[name])]
    assert changed and all(n.endswith(".weight") and re.fullmatch(DEFAULT_TARGETS, n.removesuffix(".weight"))
                           for n in changed), changed  # only the adapted layers' weights; biases and norms as shipped


def test_it_fills_holes_with_the_asked_object_and_keeps_the_rest(inpainter):
    cases = [c for c in edit_cases(32, 32, inpainter.config.data.held_out, 2, data_seed=4321)
             if c["category"] in INPAINTS]
    results = [inpainter.inpaint([c["object_prompt"]], c["image"], c["mask"], seed=[i], candidates=1)[0]
               for i, c in enumerate(cases)]
    for case, result in zip(cases, results):
        assert torch.equal(result[:, ~case["mask"]], case["image"][:, ~case["mask"]])
    passed = [judge_edit(c, r) for c, r in zip(cases, results)]
    assert sum(ok for ok, _ in passed) >= 5, passed  # 6 cases, one result each; 91 of 96 on seeds 1234/4321 (best of 2)


def test_inpaint_uses_it_when_no_model_is_given(tmp_path, capsys):
    case = next(c for c in edit_cases(32, 32, (), 1, data_seed=1234) if c["category"] == "inpaint_restore")
    source, out = tmp_path / "scene.png", tmp_path / "out.png"
    to_pil(case["image"]).save(source)
    x0, y0, x1, y1 = (v / 32 for v in case["box"])
    code, _, err = run_main(capsys, "inpaint", source, f"box:{x0},{y0},{x1},{y1}", case["object_prompt"],
                            "-o", out, "--steps", 8, "--no-progress")
    assert code == 0, err
    info = Image.open(out).info
    assert info["model"] == str(shipped_model_dir("shapes-inpaint")) and info["mode"] == "tokens"
    before, after = np.asarray(Image.open(source)), np.asarray(Image.open(out))
    outside = ~case["mask"].numpy()
    assert np.array_equal(after[outside], before[outside]) and not np.array_equal(after, before)


@pytest.mark.parametrize("adapter", ["shapes-inpaint", "shapes-layout"])  # a LoRA and a layout adapter
def test_a_folder_named_shapes_in_the_working_directory_does_not_replace_a_shipped_adapters_base(adapter, tmp_path,
                                                                                                monkeypatch):
    reference = load_pipeline(adapter, device="cpu")
    (tmp_path / "shapes").mkdir()  # e.g. an eval-prompts folder: resolve_model_dir("shapes") would take it
    monkeypatch.chdir(tmp_path)
    again = load_pipeline(adapter, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(again.model.parameters(), reference.model.parameters()))


def test_the_output_records_a_shipped_model_given_by_name_as_its_package_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32), "white").save("scene.png")
    code, _, err = run_main(capsys, "inpaint", "scene.png", "box:0,0,0.5,0.5", "a red circle", "--model",
                            "shapes-inpaint", "-o", "out.png", "--steps", 2, "--no-progress")
    assert code == 0, err
    assert Image.open("out.png").info["model"] == str(shipped_model_dir("shapes-inpaint"))  # not ./shapes-inpaint
