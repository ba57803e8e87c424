"""``omnidit generate`` with a model that has sound: every direction writes what it says (an MP4 with a sound
track, a WAV, a spectrogram), given streams come back as given, and every bad input is one line, exit 2, with
nothing written."""

from __future__ import annotations

import pytest
import torch
from test_cli import assert_one_line_error, run_main

from omnidit.audio_io import load_wav, save_wav
from omnidit.video_io import load_audio, load_video, save_video


@pytest.fixture(scope="module")
def made(av_run, tmp_path_factory):
    """A clip with sound made from a caption, and a sound alone, by the tiny model."""
    from omnidit.cli import main

    out = tmp_path_factory.mktemp("avcli")
    assert main(["generate", "a red circle moving left", "--model", str(av_run), "-o", str(out / "clip.mp4"),
                 "--steps", "2", "--no-progress"]) == 0
    assert main(["generate", "a short low beep", "--model", str(av_run), "--audio-only", "--seconds", "0.5",
                 "-o", str(out / "beeps.wav"), "--steps", "2", "--no-progress"]) == 0
    return out


def test_a_caption_makes_an_mp4_with_sound_and_sound_alone_a_wav(made):
    frames, fps, meta = load_video(made / "clip.mp4")
    sound, rate = load_audio(made / "clip.mp4")
    assert frames.shape == (3, 4, 16, 16) and fps == 8.0 and rate == 8000 and sound.shape == (1, 4000)
    assert meta["prompt"] == "a red circle moving left" and meta["sample_rate"] == 8000
    beeps, rate = load_wav(made / "beeps.wav")
    assert beeps.shape == (1, 4000) and rate == 8000


def test_video_to_audio_keeps_the_clip_and_audio_to_video_keeps_the_sound(made, av_run, capsys, tmp_path):
    from omnidit.data.bounce import BounceDataset

    save_video(BounceDataset(16, 16, 4, 8.0)[0]["video"], tmp_path / "given.mp4", 8.0)
    code, out, err = run_main(capsys, "generate", "a red circle moving left", "--model", av_run, "--video",
                              tmp_path / "given.mp4", "-o", tmp_path / "v2a.mp4", "--steps", "2", "--no-progress")
    assert code == 0, err
    given, _, _ = load_video(tmp_path / "given.mp4", as_uint8=True)
    back, _, meta = load_video(tmp_path / "v2a.mp4", as_uint8=True)
    # The clip passes through one more MP4 encode (4:2:0 colour at 16x16): within a few levels of the given one.
    assert (given.float() - back.float()).abs().mean() < 5.0 and meta["video"] == str(tmp_path / "given.mp4")
    assert load_audio(tmp_path / "v2a.mp4")[0].shape == (1, 4000)
    code, out, err = run_main(capsys, "generate", "a red circle moving left", "--model", av_run, "--audio",
                              made / "beeps.wav", "-o", tmp_path / "a2v.wav", "--steps", "2", "--no-progress")
    assert code == 0, err
    given, _ = load_wav(made / "beeps.wav")
    back, _ = load_wav(tmp_path / "a2v.wav")
    assert torch.equal(given, back)  # 16-bit PCM in, the same 16-bit PCM out
    code, out, err = run_main(capsys, "generate", "a red circle", "--model", av_run, "-o", tmp_path / "s.png",
                              "--steps", "1", "--no-progress")
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0


def _write(tmp_path):
    save_wav(torch.zeros(1, 4000), tmp_path / "silent.wav", 8000)
    save_wav(torch.rand(1, 8000) * 0.2 - 0.1, tmp_path / "rate16k.wav", 16000)
    save_wav(torch.rand(1, 4100) * 0.2 - 0.1, tmp_path / "odd.wav", 8000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not a wav")
    save_video(torch.zeros(3, 4, 16, 16), tmp_path / "mute.mp4", 8.0)
    save_video(torch.zeros(3, 2, 16, 16), tmp_path / "short.mp4", 8.0, audio=torch.full((1, 1000), 0.1),
               sample_rate=8000)  # 2 frames (0.25 s) with 0.125 s of sound


@pytest.mark.parametrize("args, fragments", [
    (["--audio", "{d}/silent.wav"], ["silent"]),
    (["--audio", "{d}/rate16k.wav"], ["16000 Hz", "trained at 8000 Hz"]),
    (["--audio", "{d}/odd.wav"], ["not a whole number of frames"]),
    (["--audio", "{d}/broken.wav"], ["cannot read"]),
    (["--audio", "{d}/none.wav"], ["no such sound file"]),
    (["--extend", "{d}/mute.mp4", "--frames", "2"], ["has no sound track"]),
    (["--extend", "{d}/short.mp4", "--frames", "2"], ["the sound of", "is shorter than its 2 frames"]),
    (["--audio-only", "--seconds", "0.51"], ["do not split into frames of 200"]),
    (["--audio-only", "-o", "{d}/x.mp4"], ["without a picture"]),
    (["--video", "{d}/mute.mp4", "--audio", "{d}/silent.wav"], ["pass one of them"]),
    (["--seconds", "1"], ["--seconds sets the length of sound alone"]),
    (["--audio-only", "--seconds", "1e9"], ["--seconds must be > 0 and <= 60"]),
    (["--audio-only", "--frames", "4"], ["--frames sets the picture"]),
    (["--video", "{d}/mute.mp4", "--frames", "8"], ["--frames is set by the given clip"]),
    (["-o", "{d}/x.gif"], ["cannot be written"]),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(av_run, capsys, tmp_path, args, fragments):
    _write(tmp_path)
    before = set(tmp_path.iterdir())
    args = [a.format(d=tmp_path) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.wav" if "--audio-only" in args else tmp_path / "out.mp4")]
    code, out, err = run_main(capsys, "generate", "a red circle", "--model", av_run, "--steps", "1",
                              "--no-progress", *args)
    assert_one_line_error(code, err, *fragments)
    assert set(tmp_path.iterdir()) == before


def test_sound_flags_on_a_model_without_sound_are_refused(tiny_run, capsys, tmp_path):
    code, out, err = run_main(capsys, "generate", "a red circle", "--model", tiny_run, "--audio-only", "-o",
                              tmp_path / "x.wav")
    assert_one_line_error(code, err, "--audio-only is for models with sound")


def test_demo_writes_a_clip_with_sound(av_run, capsys, tmp_path, monkeypatch):
    """The demo's clip with sound (run_demo_av, which `omnidit demo` calls with the shipped shapes-av), and
    `omnidit demo --model` on a model with sound (a row of frames per prompt)."""
    from omnidit import checkpoint
    from omnidit.checkpoint import list_checkpoints, shipped_model_dir
    from omnidit.demo import DEMO_AV_PROMPT, run_demo_av

    monkeypatch.setattr(checkpoint, "AV_MODEL_DIR", list_checkpoints(av_run)[-1])
    path, seconds = run_demo_av(tmp_path / "demo_av.mp4", shipped_model_dir("shapes-av"), steps=1, progress=False)
    frames, _, meta = load_video(path)
    assert frames.shape == (3, 4, 64, 64) and meta["prompt"] == DEMO_AV_PROMPT  # enlarged 4x
    assert load_audio(path)[0].shape == (1, 4000) and seconds > 0
    code, out, err = run_main(capsys, "demo", "--model", av_run, "--steps", "1", "-o", tmp_path / "d.png",
                              "--no-progress")
    assert code == 0, err
    assert (tmp_path / "d.png").is_file()


def test_info_describes_the_sound(av_run, capsys):
    code, out, err = run_main(capsys, "info", av_run)
    assert code == 0, err
    assert "sound         8000 Hz through the waveform:3 codec, 200 samples (25 ms) per token" in out
    assert "one batch in 2 from tones" in out
