"""``omnidit generate`` for a model with a sound stream (e.g. shapes-av): a clip with its sound from a caption, sound
for a given clip (``--video``), a clip for a given sound (``--audio``), a clip that starts from an image (``--image``)
or continues a given clip with its sound (``--extend``), or sound alone (``--audio-only``).

Outputs by suffix: ``.mp4`` the clip with its sound muxed in (AAC), ``.wav`` the sound alone, ``.png`` a
spectrogram of the sound. Every input is read and checked before sampling, and nothing is written on an error.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import torch

from omnidit.av import MAX_SECONDS
from omnidit.errors import OmniditError
from omnidit.tokens import clip_samples, exact
from omnidit.validate import check_number, check_output_path

SILENT = 1e-4  # a given sound whose samples all stay below this is silent
SUFFIXES = (".mp4", ".wav", ".png")


def cmd_generate_av(args: argparse.Namespace, pipe, width: int | None, height: int | None) -> None:
    """Everything after the model is loaded (``generate_command.cmd_generate`` dispatches here)."""
    from omnidit.audio_io import save_spectrogram, save_wav
    from omnidit.generate_command import batch_size, draw_in_batches, output_files, recorded_model, sampling_args
    from omnidit.video_io import save_video

    dc = pipe.config.data
    args.output = args.output or ("out.wav" if args.audio_only else "out.mp4")
    suffix = Path(args.output).suffix.lower()
    if suffix not in SUFFIXES:
        raise OmniditError(f"a clip with sound cannot be written to {args.output}",
                           hint="end the output in .mp4 (clip with sound), .wav (the sound) or .png (its spectrogram)")
    if args.audio_only and suffix == ".mp4":
        raise OmniditError("--audio-only makes sound without a picture", hint="write it to a .wav file")
    given = [flag for flag, value in (("--video", args.video), ("--audio", args.audio), ("--image", args.image),
                                      ("--extend", args.extend)) if value]
    if len(given) > 1:
        raise OmniditError(f"{' and '.join(given)} both give what the model starts from", hint="pass one of them")
    if args.audio_only and given:
        raise OmniditError(f"--audio-only makes sound from the caption alone; {given[0]} gives a picture or sound",
                           hint=f"drop --audio-only to make sound for {given[0]}")
    if args.seconds is not None and not args.audio_only:
        raise OmniditError("--seconds sets the length of sound alone", hint="use --frames for a clip with sound")
    if args.seconds is not None:
        check_number("--seconds", args.seconds, low=0, low_open=True, high=MAX_SECONDS)
    picture_flags = [f for f, v in (("--frames", args.frames), ("--fps", args.fps), ("--size", args.size),
                                    ("--cfg-video", args.cfg_video), ("--scale", args.scale if args.scale != 1
                                                                      else None)) if v is not None]
    if args.audio_only and picture_flags:
        raise OmniditError(f"{picture_flags[0]} sets the picture, and --audio-only makes none", hint="drop it")
    if (args.video or args.audio) and args.frames is not None:
        raise OmniditError(f"--frames is set by the given {'clip' if args.video else 'sound'}", hint="drop --frames")
    if args.frames is not None:
        check_number("--frames", args.frames, low=1, high=int(MAX_SECONDS * dc.fps), integer=True)
    if args.fps is not None:
        check_number("--fps", args.fps, low=0.0, low_open=True, high=1000)
    width, height = width or dc.width, height or dc.height
    kwargs = dict(given_inputs(args, pipe, width, height))
    frames = kwargs.pop("frames", args.frames or dc.frames)
    fps = kwargs.pop("fps", args.fps or dc.fps)
    sampling = sampling_args(args, pipe)
    common = dict(cfg_video=args.cfg_video, cfg_audio=args.cfg_audio, **sampling)
    if args.audio_only:
        common.update(audio_only=True, seconds=dc.seconds if args.seconds is None else args.seconds)
    else:
        common.update(frames=frames, fps=fps, width=width, height=height)
    files = output_files(args.output, args.num_images, 1, width, height, 1)
    if files is None and args.num_images > 1:
        raise OmniditError(f"-n {args.num_images} clips with sound need one file each",
                           hint=f"put {{i}} in the name, e.g. -o 'out_{{i}}{suffix}'")
    files = files or [args.output]
    for path in files:
        check_output_path("-o", path)
    settings = {"prompt": args.prompt, "seed": args.seed, **pipe.sampling_settings(**sampling),
                "cfg_video": args.cfg_video, "cfg_audio": args.cfg_audio, "sample_rate": dc.sample_rate,
                **({"seconds": common["seconds"]} if args.audio_only else {"frames": frames, "fps": fps,
                                                                            "size": f"{width}x{height}"}),
                **{flag.lstrip("-"): getattr(args, flag.lstrip("-")) for flag in given},
                "model": recorded_model(args.model), "ema": not args.no_ema, "software": "omnidit"}
    batch = batch_size(args, pipe, frames if not args.audio_only else 1, width, height, sampling)

    def draw(seeds: list[int], progress: bool):
        return pipe.generate_av([args.prompt] * len(seeds), seed=seeds, progress=progress, **common, **kwargs)

    for first, made in draw_in_batches(draw, args.seed, args.num_images, batch, not args.no_progress):
        for k in range(made.audio.shape[0]):
            i = first + k
            meta = {**settings, "seed": args.seed + i, "index": i}
            if suffix == ".wav":
                out = save_wav(made.audio[k], files[i], dc.sample_rate)
            elif suffix == ".png":
                out = save_spectrogram(made.audio[k], files[i], dc.sample_rate, meta)
            else:
                out = save_video(made.video[k], files[i], fps, meta, scale=args.scale, audio=made.audio[k],
                                 sample_rate=dc.sample_rate)
            print(f"wrote {out}")


def given_inputs(args: argparse.Namespace, pipe, width: int, height: int) -> dict:
    """generate_av's keyword arguments for the given file (--video, --audio, --image or --extend), with the
    clip's frames and fps when a file sets them: each file read, checked and cut to the model's sample rate."""
    from omnidit.video_io import load_video

    dc, mc = pipe.config.data, pipe.model.config
    if args.video:
        video, fps, _ = load_video(args.video, max_frames=int(MAX_SECONDS * 1000), size=(width, height))
        fps = args.fps or fps
        _check_clip_length(video.shape[1], fps)
        return {"video": video[None], "frames": video.shape[1], "fps": fps}
    if args.audio:
        audio = read_sound(args.audio, dc.sample_rate)
        fps = args.fps or dc.fps
        frames = Fraction(audio.shape[-1]) / exact(dc.sample_rate) * exact(fps)
        if frames.denominator != 1 or frames % mc.temporal_patch:
            raise OmniditError(f"the sound in {args.audio} lasts {audio.shape[-1] / dc.sample_rate:g} s, which is not "
                               f"a whole number of frames at {fps:g} fps",
                               hint=f"give a sound that lasts a multiple of {mc.temporal_patch / fps:g} s")
        return {"audio": audio[None], "frames": int(frames), "fps": fps}
    if args.image:
        from omnidit.generate_command import _read_image

        frames = args.frames or dc.frames
        first = _read_image(args.image, width, height)
        pt = mc.temporal_patch
        return {"video": first[None, :, None].expand(-1, -1, frames, -1, -1).clone(), "given_frames": list(range(pt))}
    if args.extend:
        from omnidit.video_io import load_audio

        clip, fps, _ = load_video(args.extend, max_frames=int(MAX_SECONDS * 1000), size=(width, height))
        fps = args.fps or fps
        frames = clip.shape[1] + (args.frames or dc.frames - clip.shape[1])
        if args.frames is None and clip.shape[1] >= dc.frames:
            raise OmniditError(f"the clip to extend has {clip.shape[1]} frames, the model's whole window "
                               f"({dc.frames})", hint="pass --frames N for the new frames to add")
        _check_clip_length(frames, fps)
        sound, rate = load_audio(args.extend)
        _check_rate(rate, dc.sample_rate, args.extend)
        kept = clip_samples(clip.shape[1], fps, rate)
        if kept.denominator != 1:
            raise OmniditError(f"{clip.shape[1]} frames at {fps:g} fps are not a whole number of samples at {rate} Hz")
        kept = int(kept)
        sound = _mono(sound)[:, :kept]
        if sound.shape[-1] != kept:
            raise OmniditError(f"the sound of {args.extend} is shorter than its {clip.shape[1]} frames")
        pt = mc.temporal_patch
        if clip.shape[1] % pt:
            raise OmniditError(f"the clip to extend has {clip.shape[1]} frames, not whole tubelets of {pt}")
        video = torch.zeros(1, 3, frames, height, width)
        video[:, :, :clip.shape[1]] = clip
        audio = torch.zeros(1, 1, int(clip_samples(frames, fps, rate)))
        audio[..., :kept] = sound
        return {"video": video, "audio": audio, "given_frames": list(range(clip.shape[1])), "frames": frames,
                "fps": fps}
    return {}


def _check_clip_length(frames: int, fps: float) -> None:
    if frames / fps > MAX_SECONDS:
        raise OmniditError(f"{frames} frames at {fps:g} fps last {frames / fps:g} s, longer than the "
                           f"{MAX_SECONDS:g} s one window holds", hint="give a shorter clip")


def read_sound(path: str, sample_rate: int) -> torch.Tensor:
    """A given sound (.wav, or the sound track of a video file) as (1, S) mono at ``sample_rate``, or a one-line
    error: unreadable, another rate, silent, or longer than MAX_SECONDS."""
    from omnidit.audio_io import load_wav
    from omnidit.video_io import load_audio

    if not Path(path).is_file():
        raise OmniditError(f"no such sound file: {path}", hint="give a .wav file (or a clip with sound)")
    if Path(path).suffix.lower() == ".wav":
        sound, rate = load_wav(path, max_seconds=MAX_SECONDS)
    else:
        sound, rate = load_audio(path)
    _check_rate(rate, sample_rate, path)
    sound = _mono(sound)
    if sound.shape[-1] > MAX_SECONDS * rate:
        raise OmniditError(f"{path} lasts {sound.shape[-1] / rate:.1f} s, longer than the {MAX_SECONDS:g} s allowed")
    if sound.numel() == 0 or float(sound.abs().max()) < SILENT:
        raise OmniditError(f"the sound in {path} is silent", hint="give a sound with something in it to follow")
    return sound


def _check_rate(rate: int, sample_rate: int, path: str) -> None:
    if rate != sample_rate:
        raise OmniditError(f"the sound in {path} is at {rate} Hz, but the model was trained at {sample_rate} Hz",
                           hint=f"resample it first, e.g. ffmpeg -i {Path(path).name} -ar {sample_rate} "
                                f"sound_{sample_rate}.wav")


def _mono(sound: torch.Tensor) -> torch.Tensor:
    """(C, S) -> (1, S), the channels averaged."""
    return sound.float().mean(0, keepdim=True)
