"""Prompts the model reads differently from how they were written: truncated by the text encoder, or with
words its training captions never contain. Each gets one warning per prompt; the command line prints
warnings as one line."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from omnidit.cli import main
from omnidit.data import caption_vocabulary
from omnidit.data.digits import DigitsDataset
from omnidit.data.shapes import ShapesDataset
from omnidit.data.shapes_video import ShapesVideoDataset, video_caption
from omnidit.errors import PromptWarning
from omnidit.pipeline import warn_unknown_words
from omnidit.text import TextEncoder


def caption_words(captions) -> set[str]:
    return {w for c in captions for w in re.findall(r"\w+", c.lower())}


def test_shapes_vocabulary_is_exactly_the_words_of_its_captions():
    ds = ShapesDataset(width=32, height=32, seed=0)
    words = caption_words(ds.scene(i).caption for i in range(3000))
    assert words == caption_vocabulary("shapes")


def test_shapes_video_vocabulary_is_exactly_the_words_of_its_captions():
    ds = ShapesVideoDataset(width=32, height=32, frames=8, fps=8.0, seed=0)
    scenes = [ds.scene(i) for i in range(300)]
    rng = np.random.default_rng(0)  # many more wordings of the same scenes, without simulating new ones
    captions = [video_caption(rng, scenes[i % len(scenes)].objects) for i in range(3000)]
    assert caption_words(captions + [s.caption for s in scenes]) == caption_vocabulary("shapes_video")


def test_digits_vocabulary_and_open_captions():
    ds = DigitsDataset(width=16, height=16)
    assert caption_words(ds[i]["caption"] for i in range(0, 400, 7)) == caption_vocabulary("digits")
    assert caption_vocabulary("imagefolder") is None


def test_unknown_words_warn_once_per_prompt_naming_them():
    vocabulary = caption_vocabulary("shapes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unknown_words(["a red circle above a blue square", "A Red Circle."], vocabulary)
        assert caught == []  # case and punctuation are not words
        warn_unknown_words(["a purple hexagon", "a purple hexagon", "un cercle rouge", "ein roter Kreis"],
                           vocabulary)
    messages = [str(w.message) for w in caught]
    assert all(w.category is PromptWarning for w in caught)
    assert len(messages) == 3  # the repeated prompt once
    assert "(hexagon)" in messages[0] and "purple," in messages[0]  # the unknown word, then the vocabulary
    assert "(un, cercle, rouge)" in messages[1]
    assert "(ein, roter, kreis)" in messages[2]
    warn_unknown_words(["anything at all"], None)  # open captions: nothing to check


def test_truncated_prompts_warn_with_the_number_of_dropped_tokens():
    encoder = TextEncoder("minilm", max_length=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder.encode(["a red circle"])  # 3 words + [CLS] [SEP]: fits
        assert caught == []
        encoder.encode(["a red circle above a blue square and a green triangle"])  # 11 words + 2
    assert len(caught) == 1 and caught[0].category is PromptWarning
    assert "13 tokens long" in str(caught[0].message) and "drops 5" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder.encode([f"{n} red circles above {n} blue squares and more" for n in range(10)])
    assert len(caught) == 2  # three in all per encoder, the last says so
    assert "not reported" in str(caught[-1].message)


def test_the_command_line_prints_a_warning_as_one_line(tmp_path, capfd):
    out = tmp_path / "x.png"
    code = main(["generate", "a purple hexagon", "--steps", "1", "--candidates", "1", "-o", str(out),
                 "--no-progress"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 0 and out.is_file()
    assert len(err) == 1 and err[0].startswith("omnidit: warning: the prompt \"a purple hexagon\" has words")


def test_info_lists_the_vocabulary(capsys):
    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("vocabulary"))
    assert "32 words" in line and "triangle" in line


@pytest.mark.parametrize("prompt", ["a red circle", "two small blue squares"])
def test_known_prompts_give_no_warning(tmp_path, capfd, prompt):
    assert main(["generate", prompt, "--steps", "1", "--candidates", "1", "-o", str(tmp_path / "x.png"),
                 "--no-progress"]) == 0
    assert capfd.readouterr().err.strip() == ""
