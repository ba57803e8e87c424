"""The audio and av suites: prompts, judging a perfect model (the data themselves) right in every direction and
a wrong-on-purpose one wrong, and a run on a tiny trained model with the JSON the issue asks for."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from omnidit.av import AudioVideo
from omnidit.config import config_from_dict
from omnidit.data.bounce import BounceDataset
from omnidit.data.tones import ToneDataset
from omnidit.evaluate.av_suite import (
    AUDIO_CATEGORIES,
    AV_DIRECTIONS,
    EVAL_SEED,
    audio_prompts,
    evaluate_audio,
    evaluate_av,
    tones_seen,
)


def fake_config(**data):
    return config_from_dict({
        "model": {"preset": "tiny", "extra_streams": {"audio": 200}, "rope_time_scale": 8.0},
        "data": {"name": "bounce", "width": 32, "height": 32, "frames": 8, "fps": 8.0, "sample_rate": 8000,
                 "mix_name": "tones", "mix_every": 4, "seconds": 2.0, **data},
        "train": {"steps": 400, "batch_size": 16}})


class DataModel:
    """A 'model' that returns the data itself: the clip and sound of the scene each caption came from, optionally
    with the sound moved later by ``delay`` seconds or every beep at the next colour's pitch (wrong on purpose)."""

    def __init__(self, delay: float = 0.0, wrong_pitch: bool = False, still: bool = False):
        self.config = fake_config()
        self.model = SimpleNamespace(config=self.config.model)
        dc = self.config.data
        self.bounce = BounceDataset(dc.width, dc.height, dc.frames, dc.fps, dc.sample_rate, seed=EVAL_SEED,
                                    held_out=dc.held_out)
        self.scenes = {self.bounce[i]["caption"]: i for i in range(40)}
        self.tone_data = ToneDataset(2.0, 8000, EVAL_SEED)
        self.tones = {self.tone_data.scene(i).caption: i for i in range(3000)}
        self.delay, self.wrong_pitch, self.still = delay, wrong_pitch, still

    def sampling_settings(self, **kwargs):
        return {}

    def sound(self, index: int) -> torch.Tensor:
        from omnidit.data.bounce import Bounce, render_bounce_audio
        from omnidit.data.shapes import COLOURS

        events = self.bounce.bounces(index)
        if self.wrong_pitch:
            colours = list(COLOURS)
            events = [Bounce(e.time, e.object, colours[(colours.index(e.colour) + 1) % len(colours)]) for e in events]
        events = [Bounce(e.time + self.delay, e.object, e.colour) for e in events]
        return torch.from_numpy(render_bounce_audio(events, 1.0, 8000))[None]

    def generate_av(self, prompts, audio_only=False, seed=0, **kwargs):
        if audio_only:
            return AudioVideo(None, torch.stack([self.tone_data[self.tones[p]]["audio"] for p in prompts]), 8.0, 8000)
        index = [self.scenes[p] for p in prompts]
        video = torch.stack([self.bounce[i]["video"] for i in index])
        audio = torch.stack([self.sound(i) for i in index])
        if self.still:  # the first frame held, and silence (the given half kept, as a model must)
            kept = len(kwargs.get("given_frames", [0]))
            video[:, :, kept:] = video[:, :, kept - 1:kept]
            audio[..., kept * 1000:] = 0
        return AudioVideo(video, audio, 8.0, 8000)


def test_audio_prompts_fill_every_category_and_novel_ones_are_new():
    seen = tones_seen(fake_config())
    assert len(seen) > 1000  # 100 tones batches of 16
    prompts = audio_prompts(6, seen)
    counts = {c: sum(1 for k, _ in prompts if k == c) for c in AUDIO_CATEGORIES}
    assert counts == dict.fromkeys(AUDIO_CATEGORIES, 6)
    for category, caption in prompts:
        beeps = caption.count(" then ") + 1
        if category == "novel_sequences":
            assert beeps >= 3 and caption not in seen
        else:
            assert beeps == AUDIO_CATEGORIES.index(category) + 1
    assert prompts == audio_prompts(6, seen)  # seeded


def test_audio_suite_scores_the_data_right():
    report = evaluate_audio(DataModel(), limit=8, progress=False, frechet=True)
    assert report.overall >= 0.97, report.to_json()["failures"]
    facts = report.to_json()["beep_facts"]
    assert facts["clips"] == 40 and facts["count_right"] >= 0.97 and facts["beeps"] >= 80
    assert min(facts[f] for f in ("pitch", "duration", "glide")) >= 0.97
    assert "as many beeps as asked in" in report.table()
    assert report.frechet is not None and report.frechet < 5.0


def test_beep_facts_count_every_fact_not_only_the_first():
    from omnidit.evaluate.audio_judge import Event, beep_facts

    def heard(*beeps):
        return [Event(0.1 * i, 0.1 * i + 0.05, 440.0, *b) for i, b in enumerate(beeps)]

    caption = "a short low beep then a long rising high beep"
    facts = beep_facts([
        (caption, heard(("low", "short", "steady"), ("high", "long", "rising"))),  # right
        (caption, heard(("middle", "long", "steady"), ("high", "long", "falling"))),  # pitch, length, glide wrong
        (caption, heard(("low", "short", "steady"))),  # one missing
        ("a middle beep", heard(("middle", "short", "steady"), ("middle", "long", "steady"))),  # one extra
    ])
    assert facts["clips"] == 4 and facts["count_right"] == 0.5 and facts["count_off"] == {"-1": 1, "1": 1}
    assert facts["beeps"] == 4 and facts["pitch"] == 0.75 and facts["duration"] == 0.75 and facts["glide"] == 0.75
    assert beep_facts([("a high beep", [])]) == {"clips": 1, "count_right": 0.0, "count_off": {"-1": 1},
                                                 "pitch": None, "duration": None, "glide": None, "beeps": 0}
    # A caption that leaves a length unsaid does not count it.
    assert beep_facts([("a high beep", heard(("high", "long", "steady")))])["duration"] is None


def test_av_suite_scores_the_data_right_in_every_direction():
    report = evaluate_av(DataModel(), limit=24, progress=False)
    data = report.to_json()
    assert set(data["directions"]) == set(AV_DIRECTIONS)
    for direction, d in data["directions"].items():
        assert d["bounces"] >= 10, direction
        assert d["sync_within_one_frame"] >= 0.95, (direction, d)
        assert d["pitch_match"] >= 0.9, (direction, d)  # simultaneous bounces of two objects: colours may trade
        assert d["extra"] <= 0.15 * d["bounces"], (direction, d)
    assert data["directions"]["video_to_audio"]["pitch_match"] == 1.0  # exact bounces, exact beeps
    assert report.overall >= 0.75


def test_av_suite_fails_sound_three_frames_late():
    report = evaluate_av(DataModel(delay=3 / 8), limit=24, progress=False)
    d = report.to_json()["directions"]["video_to_audio"]
    assert d["sync_within_one_frame"] < 0.3 and d["missing"] > 0 and report.categories["video_to_audio"] < 0.3


def test_a_still_silent_clip_is_wrong_in_every_direction_that_makes_a_picture():
    report = evaluate_av(DataModel(still=True), limit=12, progress=False)
    for direction in ("text_to_av", "audio_to_video", "extend"):
        assert report.categories[direction] == 0.0, direction
    faults = report.to_json()["directions"]["extend"]["picture_faults"]
    assert faults == 12
    assert report.categories["video_to_audio"] < 0.5  # the true clip given, silence made: missing beeps


def test_av_suite_fails_wrong_pitches():
    report = evaluate_av(DataModel(wrong_pitch=True), limit=24, progress=False)
    d = report.to_json()["directions"]["video_to_audio"]
    assert d["pitch_match"] is None or d["pitch_match"] < 0.5


@pytest.fixture(scope="module")
def tiny_av(av_run):
    from omnidit.pipeline import load_pipeline

    return load_pipeline(av_run, device="cpu")


def test_av_and_audio_suites_run_on_a_model_and_write_the_json(tiny_av, tmp_path):
    from omnidit.evaluate.runner import evaluate_model

    report = evaluate_model(tiny_av, "av", limit=1, progress=False, steps=1)
    report.save(tmp_path / "av.json", tmp_path / "av.png")
    data = json.loads((tmp_path / "av.json").read_text())
    assert {"overall", "categories", "directions"} <= set(data)
    assert set(data["categories"]) == set(AV_DIRECTIONS)
    assert {"sync_within_one_frame", "pitch_match"} <= set(data["directions"]["text_to_av"])
    assert (tmp_path / "av.png").is_file()
    audio = evaluate_model(tiny_av, "audio", limit=1, progress=False, steps=1, frechet=False)
    assert set(audio.categories) == set(AUDIO_CATEGORIES) and audio.n_images == 5
