"""Audio, step one: tokens and their positions on the shared time axis, the tones data, its exact judge
(right on ground truth, wrong on purpose-made mistakes) and WAV files."""

from __future__ import annotations

import dataclasses
import wave

import numpy as np
import pytest
import torch

from omnidit.audio_io import load_wav, save_wav
from omnidit.data.tones import (
    COUNTERFACTUAL_STREAM,
    DURATIONS,
    GLIDES,
    MARGIN,
    MIN_GAP,
    PITCHES,
    VOCABULARY,
    ToneDataset,
    counterfactual_tone_scene,
    render_tones,
    tone_caption,
)
from omnidit.errors import OmniditError
from omnidit.evaluate.audio_judge import find_beeps, judge_tones, parse_tone_caption
from omnidit.tokens import audio_patchify, audio_position_ids, audio_unpatchify, video_position_ids


def test_audio_tokens_round_trip_exactly_and_order_features_like_a_conv1d():
    x = torch.randn(2, 3, 4000, generator=torch.Generator().manual_seed(0))
    tokens = audio_patchify(x, 400)
    assert tokens.shape == (2, 10, 1200)
    assert torch.equal(audio_unpatchify(tokens, 4000, 400), x)
    assert torch.equal(tokens[1, 7, 400:800], x[1, 1, 2800:3200])  # token 7, channel 1: samples 2800..3199


def test_a_length_the_frame_does_not_divide_names_the_nearest_lengths():
    with pytest.raises(OmniditError, match="4001 audio samples .* 4000 or 4400"):
        audio_patchify(torch.zeros(1, 1, 4001), 400)


def test_an_audio_token_and_a_video_frame_at_the_same_instant_share_their_time():
    audio = audio_position_ids(16000, 1000, 8000.0)  # 16 frames of 1/8 s
    video = video_position_ids(16, 2, 2, fps=8.0)  # 16 frames at 8 fps, 4 patches each
    assert audio.shape == (1, 16, 3) and torch.equal(audio[0, :, 1:], torch.zeros(16, 2))
    assert torch.allclose(audio[0, :, 0], video[0, ::4, 0])
    finer = audio_position_ids(16000, 250, 8000.0)  # four audio tokens per video frame
    assert torch.allclose(finer[0, ::4, 0], video[0, ::4, 0]) and finer[0, 1, 0] == pytest.approx(1 / 32)
    # tubelets of two frames start at frames 0, 2, 4...: the audio tokens that start with them share their time
    pairs = video_position_ids(16, 2, 2, fps=8.0, temporal_patch=2)
    assert torch.allclose(pairs[0, ::4, 0], audio[0, ::2, 0]) and pairs[0, 4, 0] == pytest.approx(0.25)


def test_tones_clips_are_seeded_and_their_captions_use_the_vocabulary():
    a, b = ToneDataset(seed=3), ToneDataset(seed=3)
    assert torch.equal(a[5]["audio"], b[5]["audio"]) and a[5]["caption"] == b[5]["caption"]
    assert not torch.equal(a[5]["audio"], a[6]["audio"])
    seen = set()
    for i in range(300):
        scene = a.scene(i)
        seen |= set(scene.caption.split())
        gaps = [n.onset - (p.onset + p.seconds) for p, n in zip(scene.beeps, scene.beeps[1:])]
        assert all(g >= MIN_GAP - 1e-9 for g in gaps) and scene.beeps[-1].onset + scene.beeps[-1].seconds <= 2.0
        assert [(s.pitch, s.duration, s.glide) for s in parse_tone_caption(scene.caption)] == \
            [(b.pitch, b.duration, b.glide) for b in scene.beeps]
    assert seen == set(VOCABULARY)  # every word is used, and no other
    audio = a[0]["audio"]
    assert audio.shape == (1, 16000) and audio.abs().max() <= 0.5 + 1e-6


def test_the_judge_is_right_on_600_ground_truth_clips():
    data = ToneDataset(seed=11)
    wrong = [(i, data[i]["caption"], judge_tones(data[i]["audio"], data[i]["caption"])[1]) for i in range(600)]
    wrong = [w for w in wrong if w[1] and w[2]]
    assert wrong == []


def test_a_clips_partner_changes_one_fact_of_one_beep_and_the_judge_hears_it():
    """ToneDataset.counterfactual: one beep dropped, or one beep's pitch, glide or length changed, every other
    beep as it was; seeded by (seed, index) alone; the layout still fits, and the judge reads the partner right
    against its own caption and wrong against the clip's."""
    data = ToneDataset(seed=5)
    changed = {"count": 0, "pitch": 0, "glide": 0, "duration": 0}
    for i in range(120):
        scene, item = data.scene(i), data.counterfactual(i)
        partner = ToneDataset(seed=5).counterfactual(i)
        assert torch.equal(item["audio"], partner["audio"]) and item["caption"] == partner["caption"]
        assert judge_tones(item["audio"], item["caption"])[0]
        assert not judge_tones(item["audio"], scene.caption)[0]
        heard = find_beeps(item["audio"])
        if len(heard) < len(scene.beeps):
            changed["count"] += 1
            assert len(heard) == len(scene.beeps) - 1
            kept = [b for b in scene.beeps if any(abs(e.onset - b.onset) < 0.03 for e in heard)]
            assert len(kept) == len(heard)  # the others stay where they were
            continue
        diffs = [(b.pitch != e.pitch) + (b.glide != e.glide) + (b.duration != e.duration)
                 for b, e in zip(scene.beeps, heard)]
        assert sorted(diffs) == [0] * (len(diffs) - 1) + [1]  # one beep, one fact
        b, e = next((b, e) for b, e in zip(scene.beeps, heard) if b.pitch != e.pitch or b.glide != e.glide
                    or b.duration != e.duration)
        changed["pitch" if b.pitch != e.pitch else "glide" if b.glide != e.glide else "duration"] += 1
        assert abs(e.onset - b.onset) < 0.03  # it stays where it was
    assert min(changed.values()) >= 10, changed


def test_a_longer_beep_in_a_partner_still_leaves_the_gap_and_the_margin():
    data = ToneDataset(seed=6)
    for i in range(300):
        partner = counterfactual_tone_scene(data.scene(i), np.random.default_rng([6, i, COUNTERFACTUAL_STREAM]), 2.0)
        ends = [b.onset + b.seconds for b in partner.beeps]
        assert all(end + MIN_GAP <= nxt.onset + 1e-9 for end, nxt in zip(ends, partner.beeps[1:]))
        assert ends[-1] <= 2.0 - MARGIN + 1e-9


def _variant(scene, i, **change):
    beeps = list(scene.beeps)
    beeps[i] = dataclasses.replace(beeps[i], **change)
    return dataclasses.replace(scene, beeps=tuple(beeps))


@pytest.mark.parametrize("mistake, reason", [
    ("pitch", "should be"), ("duration", "should be"), ("glide", "should be"), ("missing", "missing beep"),
    ("extra", "extra beep"),
])
def test_the_judge_fails_clips_made_wrong_on_purpose(mistake, reason):
    data = ToneDataset(seed=2)
    failed = 0
    scenes = [data.scene(i) for i in range(200)]
    if mistake == "extra":  # the caption leaves out the last beep: a clip needs two beeps for that
        scenes = [scene for scene in scenes if len(scene.beeps) > 1]
    for scene in scenes[:40]:
        caption = scene.caption
        if mistake == "pitch":  # the audio plays another pitch class than the caption says
            other = [p for p in PITCHES if p != scene.beeps[0].pitch][0]
            scene = _variant(scene, 0, frequency=PITCHES[other][0] * 1.05)
        elif mistake == "duration":
            b = scene.beeps[0]
            if b.duration == "long":
                scene = _variant(scene, 0, seconds=DURATIONS["short"][0])
            else:
                caption = tone_caption([dataclasses.replace(b, duration="long"), *scene.beeps[1:]])
        elif mistake == "glide":
            b = scene.beeps[0]
            flipped = GLIDES[(GLIDES.index(b.glide) + 1) % 3]
            scene = _variant(scene, 0, glide=flipped)
        elif mistake == "missing":
            scene = dataclasses.replace(scene, beeps=scene.beeps[1:])
        elif mistake == "extra":
            caption = tone_caption(scene.beeps[:-1])
        ok, why, _ = judge_tones(torch.from_numpy(render_tones(scene, 2.0)), caption)
        failed += not ok and reason in why
    assert failed == 40


def test_wav_round_trip_keeps_rate_length_channels_and_samples(tmp_path):
    audio = torch.rand(2, 8000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_wav(audio, tmp_path / "a.wav", 16000)
    with wave.open(str(path)) as f:
        assert (f.getnchannels(), f.getframerate(), f.getnframes(), f.getsampwidth()) == (2, 16000, 8000, 2)
    back, rate = load_wav(path)
    assert rate == 16000 and back.shape == (2, 8000)
    assert (back - audio).abs().max() <= 0.5 / 32767 + 1e-7
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]  # no temporary file left


def test_wav_errors_are_one_line(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not a wav")
    with pytest.raises(OmniditError, match="cannot read .* as a WAV"):
        load_wav(tmp_path / "bad.wav")
    with pytest.raises(OmniditError, match="sample rate"):
        save_wav(torch.zeros(1, 10), tmp_path / "x.wav", 12.5)
    with pytest.raises(OmniditError, match="WAV"):
        save_wav(torch.zeros(1, 10), tmp_path / "x.mp3", 8000)
    save_wav(torch.zeros(1, 8000), tmp_path / "long.wav", 8000)
    with pytest.raises(OmniditError, match="longer than"):
        load_wav(tmp_path / "long.wav", max_seconds=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav", "long.wav"]


def test_find_beeps_hears_silence_as_nothing():
    assert find_beeps(np.zeros(16000)) == []
    assert find_beeps(np.random.default_rng(0).normal(0, 0.005, 16000)) == []


def test_mp4_with_sound_round_trip_keeps_rate_length_streams_and_pitch(tmp_path):
    av = pytest.importorskip("av")
    from omnidit.video_io import load_audio, load_video, save_video

    clip = torch.rand(3, 8, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = np.arange(8000) / 8000
    sound = torch.from_numpy((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))[None]
    path = save_video(clip, tmp_path / "clip.mp4", 8.0, {"prompt": "a beep"}, audio=sound, sample_rate=8000)
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        assert container.streams.audio[0].rate == 8000 and container.streams.audio[0].codec_context.name == "aac"
    audio, rate = load_audio(path)
    assert rate == 8000 and audio.shape == (1, 8000)  # AAC's padding cut back to the true length
    spectrum = np.abs(np.fft.rfft(audio[0].numpy()))
    assert np.argmax(spectrum) * rate / audio.shape[1] == pytest.approx(440, abs=2)
    frames = load_video(path)[0]
    assert frames.shape[1] == 8  # the picture is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_sound_is_refused_where_it_cannot_go(tmp_path):
    from omnidit.video_io import load_audio, save_video

    clip = torch.zeros(3, 4, 16, 16)
    with pytest.raises(OmniditError, match="only .mp4 clips carry sound"):
        save_video(clip, tmp_path / "c.gif", 8.0, audio=torch.zeros(1, 4000), sample_rate=8000)
    with pytest.raises(OmniditError, match="sample rate"):
        save_video(clip, tmp_path / "c.mp4", 8.0, audio=torch.zeros(1, 4000), sample_rate=100)
    with pytest.raises(OmniditError, match="mono or stereo"):
        save_video(clip, tmp_path / "c.mp4", 8.0, audio=torch.zeros(3, 4000), sample_rate=8000)
    silent = save_video(clip, tmp_path / "silent.mp4", 8.0)
    with pytest.raises(OmniditError, match="no sound track"):
        load_audio(silent)
    assert [p.name for p in tmp_path.iterdir()] == ["silent.mp4"]


def test_a_spectrogram_shows_a_tone_at_its_pitch(tmp_path):
    from PIL import Image

    from omnidit.audio_io import save_spectrogram, spectrogram

    t = np.arange(8000) / 8000
    image = spectrogram(np.sin(2 * np.pi * 1000 * t), 8000)  # bins of 8000 / 256 = 31.25 Hz
    rows = image.shape[0]
    assert rows == 129 and image.dtype == np.uint8
    loudest_row = int(np.argmax(image.mean(axis=1)))
    assert (rows - 1 - loudest_row) * 31.25 == pytest.approx(1000, abs=32)  # 0 Hz is the bottom row
    path = save_spectrogram(torch.from_numpy(np.sin(2 * np.pi * 440 * t))[None], tmp_path / "s.png", 8000,
                            {"prompt": "a beep"})
    saved = Image.open(path)
    assert saved.mode == "L" and saved.text["prompt"] == "a beep" and saved.text["sample_rate"] == "8000"
