"""The ``audio`` and ``av`` suites: sound from a caption judged by the exact tone judge, and clips with sound
judged by the exact sync judge in every generation direction.

**audio** (text -> sound, ``tones`` captions). Prompts are the captions of ``ToneDataset(seed=EVAL_SEED)``
scenes, sorted by beep count into ``one_beep``, ``two_beeps``, ``three_beeps`` and ``four_beeps``, plus
``novel_sequences``: three- or four-beep captions that the model's training data never held (checked against
every tones caption the run drew, from its config: data seed, steps, batch size, mixing). Each clip passes
when ``audio_judge.judge_tones`` hears the caption's beeps, in order, with their pitch, length and glide;
``beep_facts`` in the report (``audio_judge.beep_facts``) says how often the count was right and, over those
clips, each fact of each beep. A Fréchet distance compares fixed spectral features (``audio_features``) with
REFERENCE_CLIPS training clips.

**av** (``bounce`` captions and clips). One set of scenes from ``BounceDataset(seed=EVAL_SEED)``, each sampled
in every direction:

- ``text_to_av``: the caption alone; bounces seen in the made clip against beeps heard in the made sound;
- ``video_to_audio``: the true clip given; its true bounces against the beeps heard in the made sound;
- ``audio_to_video``: the true sound given; the bounces seen in the made clip against its true beeps;
- ``extend``: the first half of the clip and its sound given, which fixes the motion: the beeps made after the
  cut against the true bounces there, and the made picture must bounce there too.

A made picture in which the tracker follows no object or an object stands still is wrong however it sounds.

Per direction the report gives ``sync_within_one_frame`` (bounces with a beep within one frame, over all
bounces judged), ``pitch_match`` (of those, the beep at the bouncing object's pitch), the mean sync error,
missing and extra beeps, the bounces judged, clips with no bounce to judge, clips with a faulty picture, and
``clips_right`` (clips where every bounce has its beep at its
pitch and no beep is extra), the direction's score; ``overall`` is the mean over directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from omnidit.audio_io import mono, spectrogram, stft_magnitude
from omnidit.data.tones import ToneDataset
from omnidit.errors import OmniditError
from omnidit.evaluate.audio_judge import beep_facts, judge_tones
from omnidit.evaluate.runner import EvalReport, Judged, _aggregate, _seeds
from omnidit.evaluate.sync import Heard, Seen, SyncReport, hear_beeps, judge_sync, moving_objects, see_bounces

AUDIO_CATEGORIES = ("one_beep", "two_beeps", "three_beeps", "four_beeps", "novel_sequences")
AV_DIRECTIONS = ("text_to_av", "video_to_audio", "audio_to_video", "extend")
EVAL_SEED = 7_777  # the suites' scenes: a data seed no recipe trains on (they use 0)
DEFAULT_PER_CATEGORY = 32
REFERENCE_CLIPS = 500
BANDS = 24  # log-spaced spectral bands of the audio features, 150 Hz to 1.8 kHz


# ---------------------------------------------------------------------------------------------
# audio suite

def tones_seen(config) -> frozenset[str]:
    """Every tones caption the training run of ``config`` drew (empty when it trained on no tones)."""
    dc, tc = config.data, config.train
    if "tones" not in (dc.name, dc.mix_name):
        return frozenset()
    batches = tc.steps // dc.mix_every if dc.mix_name == "tones" else tc.steps
    return _captions(dc.seed, dc.seconds, dc.sample_rate, batches * tc.batch_size)


@lru_cache(maxsize=4)
def _captions(seed: int, seconds: float, sample_rate: int, n: int) -> frozenset[str]:
    ds = ToneDataset(seconds, sample_rate, seed)
    return frozenset(ds.scene(i).caption for i in range(n))


def audio_prompts(per_category: int | None = None, seen: frozenset[str] = frozenset(),
                  seconds: float = 2.0, sample_rate: int = 8000) -> list[tuple[str, str]]:
    """(category, caption) pairs, ``per_category`` each (DEFAULT_PER_CATEGORY), in category order."""
    n = DEFAULT_PER_CATEGORY if per_category is None else int(per_category)
    ds = ToneDataset(seconds, sample_rate, EVAL_SEED)
    chosen: dict[str, list[str]] = {c: [] for c in AUDIO_CATEGORIES}
    by_count = dict(zip(range(1, 5), AUDIO_CATEGORIES))
    for i in range(200_000):
        if all(len(v) >= n for v in chosen.values()):
            break
        caption = ds.scene(i).caption
        count = caption.count(" then ") + 1
        novel = count >= 3 and caption not in seen and len(chosen["novel_sequences"]) < n
        category = "novel_sequences" if novel else by_count[count]
        if len(chosen[category]) < n and caption not in chosen[category]:
            chosen[category].append(caption)
    return [(c, p) for c in AUDIO_CATEGORIES for p in chosen[c]]


def audio_features(audio: Tensor, sample_rate: int) -> Tensor:
    """(B, 1, S) sound -> (B, 2 * BANDS + 1) float64: the mean and spread over time of log band energies (32 ms
    windows every 8 ms, BANDS log-spaced bands), and the fraction of loud windows."""
    length, hop = int(0.032 * sample_rate), int(0.008 * sample_rate)
    edges = np.geomspace(150.0, 1800.0, BANDS + 1) * length / sample_rate
    out = []
    for clip in audio:
        _, spectrum = stft_magnitude(mono(clip), length, hop)  # (W, F)
        bands = np.stack([spectrum[:, int(a):max(int(a) + 1, int(b))].sum(1) for a, b in zip(edges, edges[1:])], 1)
        energy = np.log1p(bands)  # (W, BANDS)
        loud = (energy.max(1) > np.log1p(1.0)).mean()
        out.append(np.concatenate([energy.mean(0), energy.std(0), [loud]]))
    return torch.from_numpy(np.stack(out))


@lru_cache(maxsize=4)
def _audio_reference(n: int, seconds: float, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    from omnidit.evaluate.frechet import fit_gaussian

    ds = ToneDataset(seconds, sample_rate, seed=0)
    return fit_gaussian(audio_features(torch.stack([ds[i]["audio"] for i in range(n)]), sample_rate))


def spectrogram_image(audio: Tensor, sample_rate: int) -> Tensor:
    """A spectrogram for the report's grid: (3, F', W') in [-1, 1], loud bright on dark, 0 Hz at the bottom."""
    image = torch.from_numpy(spectrogram(audio, sample_rate).astype(np.float32)) / 127.5 - 1  # (F, W)
    image = torch.nn.functional.interpolate(image[None, None], size=(64, 128), mode="area")[0]
    return image.expand(3, -1, -1)


def evaluate_audio(pipe, n_per_prompt: int = 1, seed: int = 0, limit: int | None = None, batch_size: int = 32,
                   progress: bool = True, frechet: bool = True, **sampling) -> EvalReport:
    """The audio suite (module docstring) on a model with a sound stream: sound alone from each caption."""
    from tqdm.auto import tqdm

    dc = pipe.config.data
    _require_audio(pipe)
    prompts = [pc for pc in audio_prompts(limit, tones_seen(pipe.config), dc.seconds, dc.sample_rate)
               for _ in range(int(n_per_prompt))]
    seeds = _seeds(seed, len(prompts))
    sounds = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="audio suite", disable=not progress, leave=False):
        part = prompts[start:start + batch_size]
        sounds.append(pipe.generate_av([p for _, p in part], audio_only=True, seconds=dc.seconds,
                                       seed=seeds[start:start + batch_size], **sampling).audio)
    sounds = torch.cat(sounds)
    judged, heard = [], []
    for (category, caption), sound, k in zip(prompts, sounds, seeds):
        passed, reason, events = judge_tones(sound, caption, dc.sample_rate)
        judged.append(Judged(category, caption, spectrogram_image(sound, dc.sample_rate), passed, reason, seed=k))
        heard.append((caption, events))
    overall, scores = _aggregate("audio", judged, AUDIO_CATEGORIES)
    fd = None
    if frechet:
        from omnidit.evaluate.frechet import fit_gaussian, frechet_distance

        reference = _audio_reference(max(REFERENCE_CLIPS, len(sounds)), dc.seconds, dc.sample_rate)
        fd = frechet_distance(*fit_gaussian(audio_features(sounds, dc.sample_rate)), *reference)
    return EvalReport("audio", overall, scores, len(judged), fd, settings={"seconds": dc.seconds}, judged=judged,
                      details={"beep_facts": beep_facts(heard)})


def _require_audio(pipe) -> None:
    if "audio" not in pipe.model.config.extra_streams:
        raise OmniditError("this suite needs a model with sound (an audio stream)",
                           hint="pass a model trained on bounce or tones, e.g. shapes-av")


# ---------------------------------------------------------------------------------------------
# av suite

def judge_direction(direction: str, video: Tensor, audio: Tensor, truth: Sequence, fps: float, sample_rate: int,
                    given_frames: int = 0) -> SyncReport:
    """The sync judgement of one clip (3, T, H, W) with sound (1, S) made in ``direction``; ``truth``: the
    scene's true bounces (``bounce.Bounce``); ``given_frames``: the frames given to ``extend``.

    - text_to_av: bounces seen in the made clip against beeps heard in the made sound;
    - video_to_audio: the true bounces against the beeps heard;
    - audio_to_video: the bounces seen against the true beeps;
    - extend: the given frames fix the motion, so the true bounces after the cut are known: the beeps heard
      after it are judged against them, and the made picture must bounce there too.

    A made picture in which the tracker follows no object, or in which an object stands still, is wrong
    (``picture_fault``): silence over a still clip has no bounce to miss.
    """
    frames = video.shape[1]
    true = [Seen(b.time, b.colour) for b in truth]
    if direction == "video_to_audio":
        return judge_sync(true, hear_beeps(audio, sample_rate), fps, frames)
    objects, moving = moving_objects(video, fps)
    fault = "no object seen" if not objects else f"{objects - moving} object(s) standing still" \
        if moving < objects else ""
    seen = see_bounces(video, fps)
    if direction == "audio_to_video":
        report = judge_sync(seen, [Heard(b.time, b.colour) for b in truth], fps, frames)
    elif direction == "text_to_av":
        report = judge_sync(seen, hear_beeps(audio, sample_rate), fps, frames)
    else:  # extend: judged after the cut (a beep may sound up to a frame before a bounce just after it)
        start = given_frames / fps
        after = [t for t in true if t.time >= start]
        report = judge_sync(after, [h for h in hear_beeps(audio, sample_rate) if h.time >= start - 1 / fps],
                            fps, frames)
        before = [t.time for t in true if t.time < start]
        report.extra = [t for t in report.extra if t >= start and not any(abs(t - b) <= 1 / fps for b in before)]
        report.beeps = report.matched + len(report.extra)
        picture = judge_sync(after, [Heard(s.time, s.colour) for s in seen if s.time >= start - 1 / fps], fps,
                             frames)
        if not fault and picture.missing:
            fault = f"the clip does not bounce where the given motion does (at {picture.missing[0]:.3f} s)"
    report.picture_fault = fault
    return report


def _direction_inputs(direction: str, videos: Tensor, audios: Tensor, frames: int) -> dict:
    if direction == "video_to_audio":
        return {"video": videos}
    if direction == "audio_to_video":
        return {"audio": audios}
    if direction == "extend":
        return {"video": videos, "audio": audios, "given_frames": list(range(frames // 2))}
    return {}


def evaluate_av(pipe, n_per_prompt: int = 1, seed: int = 0, limit: int | None = None, batch_size: int = 16,
                progress: bool = True, frechet: bool = False, directions: Sequence[str] = AV_DIRECTIONS,
                **sampling) -> EvalReport:
    """The av suite (module docstring): every scene sampled in each of ``directions`` (default all of
    AV_DIRECTIONS) and judged for sync. (``frechet`` is accepted for the runner's sake: this suite has no Fréchet
    distance; the video suite reports one.)"""
    from tqdm.auto import tqdm

    from omnidit.data.bounce import BounceDataset
    from omnidit.evaluate.video_suite import clip_strip

    dc = pipe.config.data
    _require_audio(pipe)
    if dc.name != "bounce":
        raise OmniditError(f"the av suite needs a model trained on bounce clips, not '{dc.name}'",
                           hint="use --suite audio for a sound-only model")
    n = DEFAULT_PER_CATEGORY if limit is None else int(limit)
    ds = BounceDataset(dc.width, dc.height, dc.frames, dc.fps, dc.sample_rate, seed=EVAL_SEED, held_out=dc.held_out)
    scenes = [i for i in range(n) for _ in range(int(n_per_prompt))]
    seeds = _seeds(seed, len(scenes))
    judged, details = [], {}
    unknown = sorted(set(directions) - set(AV_DIRECTIONS))
    if unknown or not directions:
        raise OmniditError(f"unknown av directions {unknown or list(directions)}",
                           hint=f"choose from {', '.join(AV_DIRECTIONS)}")
    with tqdm(total=len(scenes) * len(directions), desc="av suite", disable=not progress, leave=False) as bar:
        for direction in directions:
            reports = []
            for start in range(0, len(scenes), batch_size):
                part = scenes[start:start + batch_size]
                items = [ds[i] for i in part]
                videos = torch.stack([it["video"] for it in items])
                audios = torch.stack([it["audio"] for it in items])
                made = pipe.generate_av([it["caption"] for it in items], seed=seeds[start:start + len(part)],
                                        **_direction_inputs(direction, videos, audios, dc.frames), **sampling)
                for k, i, item, video, audio in zip(seeds[start:], part, items, made.video, made.audio):
                    report = judge_direction(direction, video, audio, ds.bounces(i), dc.fps, dc.sample_rate,
                                             dc.frames // 2 if direction == "extend" else 0)
                    reports.append(report)
                    judged.append(Judged(direction, item["caption"], clip_strip(video), report.right,
                                         _reason(report), seed=k))
                bar.update(len(part))
            details[direction] = _summary(reports)
    overall, scores = _aggregate("av", judged, tuple(directions))
    return EvalReport("av", overall, scores, len(judged), None, settings={"fps": dc.fps}, judged=judged,
                      details={"directions": details})


def _reason(report: SyncReport) -> str:
    if report.picture_fault:
        return report.picture_fault
    if report.missing:
        return f"no beep within a frame of the bounce at {report.missing[0]:.3f} s"
    if report.pitch_matched < report.matched:
        return f"{report.matched - report.pitch_matched} beep(s) at another object's pitch"
    if report.extra:
        return f"an extra beep at {report.extra[0]:.3f} s"
    return ""


def _summary(reports: Sequence[SyncReport]) -> dict:
    bounces = sum(r.bounces for r in reports)
    matched = sum(r.matched for r in reports)
    errors = [abs(e) for r in reports for e in r.errors_ms]
    return {"sync_within_one_frame": matched / bounces if bounces else None,
            "pitch_match": sum(r.pitch_matched for r in reports) / matched if matched else None,
            "mean_abs_error_ms": float(np.mean(errors)) if errors else None,
            "bounces": bounces, "missing": sum(len(r.missing) for r in reports),
            "extra": sum(len(r.extra) for r in reports), "clips": len(reports),
            "clips_without_bounces": sum(r.bounces == 0 for r in reports),
            "picture_faults": sum(bool(r.picture_fault) for r in reports),
            "clips_right": sum(r.right for r in reports) / len(reports) if reports else None}
