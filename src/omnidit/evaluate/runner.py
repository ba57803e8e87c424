"""Run a suite end to end: generate (or read) images, judge each one, aggregate, draw the grid.

``evaluate_model`` scores a Pipeline; ``evaluate_folder`` scores images made by any other system,
with each image's prompt read from the manifest that ``write_suite_prompts`` writes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from omnidit.errors import OmniditError
from omnidit.images import labelled_grid, to_pil
from omnidit.pipeline import SAMPLING_KEYS

if TYPE_CHECKING:
    from omnidit.evaluate.shapes_suite import PromptSpec

SUITES = ("shapes", "digits", "video", "audio", "av", "edit", "layout", "new_shape")
SEED_STRIDE = 1_000_003  # image i of a run with seed s uses noise seed s * SEED_STRIDE + i


@dataclass
class Judged:
    """One judged image."""

    category: str
    prompt: str
    image: Tensor  # (C, H, W) in [-1, 1]
    passed: bool
    reason: str = ""
    placement: str | None = None  # shapes position prompts: see shapes_suite.relation_verdict
    # model runs: the noise seed (`omnidit generate PROMPT --seed N` with the run's settings redraws it)
    seed: int | None = None
    file: str | None = None  # folder runs: the image file


def images_digest(keys) -> str:
    """Which images a report judged, in 16 hex digits: a hash of their sorted (category, prompt, noise seed,
    file) keys. Two reports pair image by image (``omnidit compare``) only when it agrees: some suites' prompts
    depend on the model (the audio suite sets apart the captions a run never drew), not only on the settings."""
    text = json.dumps(sorted(keys, key=repr), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class EvalReport:
    suite: str
    overall: float
    categories: dict[str, float]
    n_images: int
    frechet: float | None = None
    settings: dict = field(default_factory=dict)
    judged: list[Judged] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # suite-specific figures, top-level keys of the JSON (av: directions)

    def relation_accuracy(self) -> dict | None:
        """Shapes suite: {"rate", "axis_rate", "images"} over the position images that hold exactly the
        two named objects (rate: in the named relation; axis_rate: on its axis, either direction).
        Chance is 0.25 and 0.5. The rates are None when no image qualifies; None for other suites."""
        if self.suite != "shapes":
            return None
        verdicts = [j.placement for j in self.judged if j.placement is not None]
        n = len(verdicts)
        if not n:
            return {"rate": None, "axis_rate": None, "images": 0}
        right, reversed_ = verdicts.count("right"), verdicts.count("reversed")
        return {"rate": right / n, "axis_rate": (right + reversed_) / n, "images": n}

    def to_json(self) -> dict:
        out = {"suite": self.suite, "overall": self.overall, "categories": self.categories,
               "n_images": self.n_images, "frechet_distance": self.frechet, "settings": self.settings}
        relation = self.relation_accuracy()
        if relation is not None:
            out["relation_accuracy"] = relation
        out.update(self.details)
        out["images_digest"] = images_digest(self._key(j) for j in self.judged)
        out["failures"] = [self._failure(j) for j in self.judged if not j.passed]
        return out

    @staticmethod
    def _key(j: Judged) -> tuple:
        return j.category, j.prompt, j.seed, j.file

    @staticmethod
    def _failure(j: Judged) -> dict:
        where = {"seed": j.seed} if j.seed is not None else {"file": j.file} if j.file is not None else {}
        return {"category": j.category, "prompt": j.prompt, "reason": j.reason, **where}

    def table(self) -> str:
        """A plain-text table: pass rate per category, then the overall mean and the FD."""
        width = max(len(c) for c in [*self.categories, "overall"])
        counts: dict[str, int] = {}
        for j in self.judged:
            counts[j.category] = counts.get(j.category, 0) + 1
        lines = [f"{'category':<{width}}  score   images", "-" * (width + 17)]
        lines += [f"{c:<{width}}  {s:5.3f}  {counts.get(c, 0):7d}" for c, s in self.categories.items()]
        lines += ["-" * (width + 17), f"{'overall':<{width}}  {self.overall:5.3f}  {self.n_images:7d}"]
        if self.frechet is not None:
            lines.append(f"{'frechet distance':<{width}}  {self.frechet:.3f}")
        for name, d in self.details.get("directions", {}).items():
            sync, pitch = (f"{d[k]:.3f}" if d[k] is not None else "-" for k in ("sync_within_one_frame", "pitch_match"))
            lines.append(f"{name}: sync within one frame {sync}, pitch match {pitch} over {d['bounces']} bounces "
                         f"({d['missing']} missing, {d['extra']} extra beeps)")
        if "beep_facts" in self.details:
            f = self.details["beep_facts"]
            rates = ", ".join(f"{fact} {f[fact]:.3f}" if f[fact] is not None else f"{fact} -"
                              for fact in ("pitch", "duration", "glide"))
            lines.append(f"as many beeps as asked in {f['count_right']:.3f} of the clips (off by: {f['count_off']}); "
                         f"over their {f['beeps']} beeps: {rates}")
        if "kept_exact" in self.details:
            lines.append(f"pixels outside the mask exact in {self.details['kept_exact']:.3f} of the inpainted "
                         f"results (mode {self.details['inpaint_mode']}, prompts: "
                         f"{self.details.get('inpaint_prompt', 'scene')})")
        if self.details.get("reconstruction_psnr") is not None:
            lines.append(f"inversion and back under the same caption: PSNR {self.details['reconstruction_psnr']:.1f} "
                         f"dB; edits inject values down to t = {self.details['inject_until']}")
        relation = self.relation_accuracy()
        if relation is not None and relation["images"]:
            lines.append(f"relation accuracy {relation['rate']:.3f}, axis accuracy {relation['axis_rate']:.3f} "
                         f"over the {relation['images']} position images with the right pair (chance 0.25, 0.5)")
        return "\n".join(lines)

    def grid(self, per_row: int = 8) -> Image.Image:
        """A row per category (its first ``per_row`` images), each framed green (pass) or red (fail)."""
        rows: dict[str, list[Judged]] = {}
        for j in self.judged:
            if len(rows.setdefault(j.category, [])) < per_row:
                rows[j.category].append(j)
        h, w = self.judged[0].image.shape[1:]
        return labelled_grid([(category, [to_pil(j.image) for j in items]) for category, items in rows.items()],
                             scale=max(1, 64 // max(h, w)),
                             frames=[[(40, 170, 60) if j.passed else (215, 40, 40) for j in items]
                                     for items in rows.values()])

    def save(self, json_path: str | Path | None = None, grid_path: str | Path | None = None) -> None:
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        if grid_path and self.judged:
            Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
            self.grid().save(grid_path)


def _generate(pipe, prompts: list[str], seeds: list[int], batch_size: int, progress: bool, **sampling) -> Tensor:
    """Images for ``prompts`` with per-image seeds, so results do not depend on the batch size. Two progress
    bars: images done, and the sampler's steps within the current batch (a batch of 64 takes about a minute on
    a 2-core CPU, too long for a bar that moves only between batches)."""
    out = []
    with tqdm(total=len(prompts), desc="generating", unit="image", disable=not progress, leave=False) as bar:
        for start in range(0, len(prompts), batch_size):
            part = prompts[start:start + batch_size]
            out.append(pipe.generate(part, seed=seeds[start:start + batch_size], progress=progress, **sampling))
            bar.update(len(part))
    return torch.cat(out)


def _frechet(images: Tensor, dataset: str, seed: int) -> float:
    from omnidit.evaluate.frechet import fit_gaussian, frechet_distance, image_features, reference_statistics

    h, w = images.shape[-2:]
    ref = reference_statistics(dataset, max(500, len(images)), w, h, seed=seed)
    return frechet_distance(*fit_gaussian(image_features(images)), *ref)


def _aggregate(suite: str, judged: list[Judged], categories: tuple[str, ...]) -> tuple[float, dict[str, float]]:
    scores = {}
    for c in categories:
        results = [j.passed for j in judged if j.category == c]
        if results:
            scores[c] = sum(results) / len(results)
    if not scores:
        raise OmniditError(f"no images to score for the {suite} suite")
    return sum(scores.values()) / len(scores), scores


def _seeds(seed: int, n: int) -> list[int]:
    """The noise seed of each of the ``n`` images of a run with ``seed`` (see SEED_STRIDE)."""
    return [seed * SEED_STRIDE + i for i in range(n)]


def _judge_shapes(spec: PromptSpec, pixels: Tensor | np.ndarray, image: Tensor, **origin) -> Judged:
    """Detect the objects in ``pixels`` (anything detect_objects reads) and judge them against ``spec``;
    ``image`` (C, H, W) in [-1, 1] is kept for the grid; ``origin``: the image's seed or file."""
    from omnidit.evaluate.detector import detect_objects
    from omnidit.evaluate.shapes_suite import check, relation_verdict

    detections = detect_objects(pixels)
    passed, reason = check(spec, detections)
    return Judged(spec.category, spec.prompt, image, passed, reason, relation_verdict(spec, detections), **origin)


def evaluate_shapes_model(pipe, n_per_prompt: int = 4, seed: int = 0, limit: int | None = None,
                          batch_size: int = 64, progress: bool = True, frechet: bool = True,
                          **sampling) -> EvalReport:
    """Generate ``n_per_prompt`` images for every suite prompt and check each with the detector."""
    from omnidit.evaluate.shapes_suite import CATEGORIES, build_prompts

    specs = build_prompts(seed=0, per_category=limit, held_out=pipe.config.data.held_out)
    expanded = [s for s in specs for _ in range(n_per_prompt)]
    seeds = _seeds(seed, len(expanded))
    images = _generate(pipe, [s.prompt for s in expanded], seeds, batch_size, progress, **sampling)
    judged = [_judge_shapes(spec, image, image, seed=k) for spec, image, k in zip(expanded, images, seeds)]
    overall, scores = _aggregate("shapes", judged, CATEGORIES)
    fd = _frechet(images, "shapes", seed) if frechet else None
    return EvalReport("shapes", overall, scores, len(judged), fd, judged=judged)


def evaluate_digits_model(pipe, n_per_prompt: int = 10, seed: int = 0, limit: int | None = None,
                          batch_size: int = 64, progress: bool = True, frechet: bool = True,
                          **sampling) -> EvalReport:
    """Generate ``n_per_prompt`` images per digit class and let the digits judge read them."""
    from omnidit.data.digits import DIGIT_NAMES
    from omnidit.evaluate.digits_judge import DigitsJudge

    if not pipe.model.config.num_classes:
        raise OmniditError("the digits suite needs a class-conditional model (model.num_classes = 10)")
    labels = torch.arange(10).repeat_interleave(n_per_prompt)
    seeds = _seeds(seed, len(labels))
    images = _generate(pipe, [str(int(k)) for k in labels], seeds, batch_size, progress, **sampling)
    predicted = DigitsJudge().predict(images)
    judged = [Judged(DIGIT_NAMES[int(k)], f"the digit {DIGIT_NAMES[int(k)]}", img, bool(p == k),
                     f"read as {int(p)}", seed=s)
              for img, k, p, s in zip(images, labels, predicted, seeds)]
    overall, scores = _aggregate("digits", judged, tuple(DIGIT_NAMES))
    fd = _frechet(images, "digits", seed) if frechet else None
    return EvalReport("digits", overall, scores, len(judged), fd, judged=judged)


def evaluate_video(pipe, n_per_prompt: int = 1, seed: int = 0, limit: int | None = None, batch_size: int = 16,
                   progress: bool = True, frechet: bool = True, **sampling) -> EvalReport:
    """The video suite (``evaluate.video_suite``) on a video model, at its training length and frame rate;
    image-to-video prompts get their first frame as given context."""
    from omnidit.evaluate.video_suite import evaluate_video_model

    dc = pipe.config.data
    if dc.frames < 2:
        raise OmniditError("the video suite needs a video model (data.frames > 1)",
                           hint="pass a video model, e.g. shapes-video, or --suite shapes")

    def generate(prompts: list[str], seeds: list[int], firsts: Tensor | None) -> Tensor:
        if "audio" in pipe.model.config.extra_streams:  # a clip with its sound, as the model makes them
            given = {} if firsts is None else {"video": firsts[:, :, None].expand(-1, -1, dc.frames, -1, -1),
                                               "given_frames": range(pipe.model.config.temporal_patch)}
            return pipe.generate_av(prompts, seed=seeds, progress=progress, **given, **sampling).video
        return pipe.generate_video(prompts, seed=seeds, first_frame=firsts, progress=progress, **sampling)

    return evaluate_video_model(generate, seed=seed, limit=limit, n_per_prompt=n_per_prompt, width=dc.width,
                                height=dc.height, frames=dc.frames, fps=dc.fps, held_out=dc.held_out,
                                batch_size=batch_size, frechet=frechet)


def evaluate_model(pipe, suite: str, **kwargs) -> EvalReport:
    """Dispatch to the named suite; records the sampling settings in the report."""
    from omnidit.evaluate.av_suite import evaluate_audio, evaluate_av
    from omnidit.evaluate.edit_suite import evaluate_edit
    from omnidit.evaluate.layout_suite import evaluate_layout
    from omnidit.evaluate.new_shape_suite import evaluate_new_shape

    runners = {"shapes": evaluate_shapes_model, "digits": evaluate_digits_model, "video": evaluate_video,
               "audio": evaluate_audio, "av": evaluate_av, "edit": evaluate_edit,
               "layout": evaluate_layout, "new_shape": evaluate_new_shape}
    if suite not in runners:
        raise OmniditError(f"unknown suite '{suite}'", hint=f"choose one of {', '.join(SUITES)}")
    report = runners[suite](pipe, **kwargs)
    report.settings = {
        **(report.settings or {}),
        "n_per_prompt": kwargs.get("n_per_prompt"), "seed": kwargs.get("seed", 0), "limit": kwargs.get("limit"),
        "held_out": sorted(pipe.config.data.held_out),  # the colour-shape pairs held out decide some prompts
        **pipe.sampling_settings(**{k: kwargs.get(k) for k in SAMPLING_KEYS}),
    }
    return report


def write_suite_prompts(out_dir: str | Path, n_per_prompt: int = 4, limit: int | None = None,
                        held_out=None) -> tuple[Path, Path]:
    """Write the shapes suite's manifest (image file -> prompt) and plain prompt list for other systems."""
    from omnidit.data.shapes import DEFAULT_HELD_OUT
    from omnidit.evaluate.shapes_suite import build_prompts, write_manifest, write_prompt_list

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = build_prompts(seed=0, per_category=limit, held_out=held_out or DEFAULT_HELD_OUT)
    return (write_manifest(specs, n_per_prompt, out_dir / "manifest.json"),
            write_prompt_list(specs, out_dir / "prompts.txt"))


def _check_one_size(images_dir: Path, names: list[str]) -> None:
    """An error naming the first image whose size differs from the first one's (one Fréchet set, one grid)."""
    first = None
    for name in names:
        path = images_dir / name
        if not path.is_file():
            continue  # reported with the other missing files
        try:
            with Image.open(path) as im:
                size = im.size
        except OSError as e:
            raise OmniditError(f"cannot read image {path}: {e}") from None
        first = first or (path, size)
        if size != first[1]:
            raise OmniditError(f"{path} is {size[0]}x{size[1]}, the folder's first image {first[1][0]}x"
                               f"{first[1][1]}", hint="render every image of the manifest at one size")


def evaluate_folder(images_dir: str | Path, suite: str = "shapes", progress: bool = True,
                    frechet: bool = True) -> EvalReport:
    """Score images produced elsewhere: each file's prompt comes from ``images_dir/manifest.json``."""
    from omnidit.evaluate.shapes_suite import CATEGORIES, read_manifest

    if suite != "shapes":
        raise OmniditError(f"folders can be scored with the shapes suite only, not '{suite}'")
    images_dir = Path(images_dir)
    entries = read_manifest(images_dir / "manifest.json")
    _check_one_size(images_dir, [name for name, _ in entries])  # from the headers, before minutes of judging
    judged, missing = [], []
    for file_name, spec in tqdm(entries, desc="judging", disable=not progress, leave=False):
        path = images_dir / file_name
        if not path.is_file():
            missing.append(file_name)
            continue
        try:
            with Image.open(path) as im:
                rgb = np.array(im.convert("RGB"))  # (H, W, 3) uint8
        except OSError as e:
            raise OmniditError(f"cannot read image {path}: {e}") from None
        image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
        judged.append(_judge_shapes(spec, rgb, image, file=file_name))
    if missing:
        raise OmniditError(f"{len(missing)} of {len(entries)} images listed in the manifest are missing "
                           f"(first: {missing[0]})", hint="generate every file the manifest lists")
    overall, scores = _aggregate("shapes", judged, CATEGORIES)
    fd = None
    if frechet and judged:
        fd = _frechet(torch.stack([j.image for j in judged]), "shapes", 0)
    return EvalReport("shapes", overall, scores, len(judged), fd, settings={"images_dir": str(images_dir)},
                      judged=judged)
