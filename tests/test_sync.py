"""Joint audio-video (``bounce`` data) and the exact sync judge: beeps at the bounce instants in the colour's
pitch, heard back within milliseconds; bounces seen by the tracker; wrong-on-purpose soundtracks fail."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from omnidit.data.bounce import BEEP_SECONDS, COLOUR_PITCHES, MIN_BOUNCE_GAP, BounceDataset, render_bounce_audio
from omnidit.errors import OmniditError
from omnidit.evaluate.sync import Seen, hear_beeps, judge_sync, see_bounces

FPS, FRAMES = 8.0, 16


@pytest.fixture(scope="module")
def data():
    return BounceDataset(frames=FRAMES, fps=FPS, seed=0)


def truth(data, i):
    return [Seen(b.time, b.colour) for b in data.bounces(i)]


def test_colour_pitches_are_a_minor_third_apart():
    pitches = sorted(COLOUR_PITCHES.values())
    assert len(set(COLOUR_PITCHES)) == 8 and pitches[0] == pytest.approx(261.63)
    assert np.allclose(np.diff(np.log2(pitches)), 0.25)


def test_bounce_clips_have_distinct_colours_and_beeps_at_their_bounces(data):
    item = data[3]
    assert item["video"].shape == (3, FRAMES, 32, 32) and item["audio"].shape == (1, 16000)
    assert all(len({o.colour for o in data.scene(i).objects}) == len(data.scene(i).objects) for i in range(50))
    bounce = data.bounces(3)[0]
    start = int(round(bounce.time * 8000))
    beep = item["audio"][0, start:start + int(BEEP_SECONDS * 8000)].numpy()
    spectrum = np.abs(np.fft.rfft(beep, 8 * len(beep)))
    assert np.argmax(spectrum) * 8000 / (8 * len(beep)) == pytest.approx(COLOUR_PITCHES[bounce.colour], rel=0.02)
    assert np.abs(item["audio"][0, :start - 2].numpy()).max(initial=0.0) == 0.0  # silence before it
    for i in range(50):  # an object never beeps twice within MIN_BOUNCE_GAP
        for a, b in zip(data.bounces(i), data.bounces(i)[1:]):
            assert a.object != b.object or b.time - a.time >= MIN_BOUNCE_GAP


def test_a_length_that_is_not_whole_samples_is_refused():
    with pytest.raises(OmniditError, match="whole number of samples"):
        BounceDataset(frames=3, fps=7.0, sample_rate=8000)


def test_beeps_are_heard_within_milliseconds_of_every_bounce_on_500_clips(data):
    reports = [judge_sync(truth(data, i), hear_beeps(data[i]["audio"]), FPS, FRAMES) for i in range(500)]
    bounces = sum(r.bounces for r in reports)
    assert bounces > 1000
    assert sum(r.matched for r in reports) == bounces and sum(r.pitch_matched for r in reports) == bounces
    assert sum(len(r.extra) for r in reports) == 0
    errors = np.concatenate([r.errors_ms for r in reports])
    assert np.abs(errors).max() < 10.0  # a frame is 125 ms


def test_the_tracker_sees_the_bounces_of_ground_truth_clips(data):
    reports = [judge_sync(see_bounces(data[i]["video"], FPS), truth(data, i), FPS, FRAMES) for i in range(120)]
    bounces = sum(r.bounces for r in reports)
    matched = sum(r.matched for r in reports)
    # Measured on 500 clips: 99.2% of the bounces seen are real (within a frame), 99.8% of those on the right
    # object, and 97% of the real bounces are seen (the rest: two bounces a frame or two apart).
    assert matched / bounces >= 0.98, f"{matched} of {bounces}"
    assert sum(r.pitch_matched for r in reports) / matched >= 0.99
    assert sum(len(r.extra) for r in reports) <= 0.05 * bounces  # real bounces the tracker did not see


def _judge_audio(data, i, events):
    audio = render_bounce_audio(events, FRAMES / FPS)
    return judge_sync(truth(data, i), hear_beeps(audio), FPS, FRAMES)


@pytest.mark.parametrize("mistake", ["late", "pitch", "missing"])
def test_soundtracks_made_wrong_on_purpose_fail(data, mistake):
    failed = 0
    for i in range(30):
        events = data.bounces(i)
        inside = [k for k, b in enumerate(events) if 1 / FPS <= b.time <= (FRAMES - 2) / FPS - 3 / FPS]
        if not inside:
            continue
        k = inside[0]
        if mistake == "late":  # three frames late
            events = [*events[:k], dataclasses.replace(events[k], time=events[k].time + 3 / FPS), *events[k + 1:]]
        elif mistake == "pitch":
            other = next(c for c in COLOUR_PITCHES if c not in {b.colour for b in events})
            events = [*events[:k], dataclasses.replace(events[k], colour=other), *events[k + 1:]]
        else:
            events = events[:k] + events[k + 1:]
        report = _judge_audio(data, i, events)
        assert not report.right
        if mistake == "pitch":
            assert report.pitch_match < 1.0
        else:
            assert report.sync_within_one_frame < 1.0 and report.missing
        failed += 1
    assert failed >= 20
