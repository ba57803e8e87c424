"""Small builders shared by the tests."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from omnidit.condition import Condition
from omnidit.model.mmdit import MMDiT, MMDiTConfig
from omnidit.tokens import image_position_ids


def tiny_config(**overrides) -> MMDiTConfig:
    base = dict(hidden_size=64, num_heads=2, axes_dim=(8, 12, 12), depth=2, depth_single=1,
                context_dim=24, pooled_dim=16)
    base.update(overrides)
    return MMDiTConfig(**base)


def randomize(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Replace the zero init (adaLN-Zero, final layer) by random weights so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 and p.numel() < 100 and
                                                                 torch.all(p == 1) else 0.0))
    return model


def random_condition(cfg: MMDiTConfig, batch: int, length: int = 5, seed: int = 0) -> Condition:
    g = torch.Generator().manual_seed(seed)
    cond = Condition()
    if cfg.context_dim:
        cond.txt = torch.randn(batch, length, cfg.context_dim, generator=g)
        cond.txt_mask = torch.ones(batch, length, dtype=torch.bool)
    if cfg.pooled_dim:
        cond.pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    if cfg.num_classes:
        cond.labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    if cfg.guidance_embed:
        cond.guidance = torch.rand(batch, generator=g) * 5
    return cond


def build(cfg: MMDiTConfig, seed: int = 0, random_weights: bool = True) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(cfg).eval()
    return randomize(model, seed) if random_weights else model


def assert_close(ours: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-5) -> float:
    """max |ours - reference| <= rtol * max |reference| (parity with a reference); returns the relative gap."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    rel = ((ours - reference).abs().max() / reference.abs().max()).item()
    assert rel <= rtol, rel
    return rel


def assert_same_state(a: dict, b: dict) -> None:
    """Bit-exact equality of two state dicts (keys, dtypes, values)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_resume_matches(make_config, straight: Path, run: Path, steps: int = 4) -> None:
    """A run trained to steps / 2 and then resumed to ``steps`` (``make_config(out_dir, steps)``) holds bit for bit
    the raw and EMA weights of ``straight``, the same run trained in one go."""
    from safetensors.torch import load_file

    from omnidit.train import train

    train(make_config(run, steps // 2), progress=False)
    train(make_config(run, steps), progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_state(load_file(str(run / f"checkpoint-{steps:07d}" / name)),
                          load_file(str(straight / f"checkpoint-{steps:07d}" / name)))


def rewrite_weights(file, edit):
    """Load a safetensors file, let ``edit(state)`` change it in place, save it back; returns the file."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(file))
    edit(state)
    save_file(state, str(file))
    return file


def assert_pipeline_parity(reference_cls, folder, load, guidance: float) -> None:
    """omnidit's pipeline ``load(folder)`` reproduces diffusers' ``reference_cls`` images from the same folder.

    fp32 on CPU, same operations up to summation order (attention over [img, txt] vs [txt, img], a float64
    time grid): a few float32 ulps amplified by 4 steps and the VAE, far below 1e-4; a wrong text layout,
    packing, CFG order, schedule, scaling or noise draw gives differences > 1e-2.
    """
    prompts = ["a red circle on the left", "two blue squares"]
    height, width, steps, seed, length = 32, 48, 4, 0, 16
    reference = reference_cls.from_pretrained(folder, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = reference(prompts, height=height, width=width, num_inference_steps=steps,
                             guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                             max_sequence_length=length, output_type="pt").images  # (B, 3, H, W) in [0, 1]
    pipe = load(folder)

    def generate(**overrides):
        kwargs = dict(width=width, height=height, steps=steps, guidance=guidance, seed=seed,
                      max_sequence_length=length)
        return pipe.generate(prompts, **{**kwargs, **overrides})

    images = generate()
    assert images.shape == (2, 3, height, width) and images.dtype == torch.float32
    diff = (images / 2 + 0.5 - expected).abs().max().item()  # [-1, 1] -> diffusers' [0, 1]
    assert diff <= 1e-4, diff
    assert expected.std() > 1e-3  # the images are not flat, so parity is not vacuous
    assert (generate(seed=seed + 1) - images).abs().max() > 1e-3  # the seed matters
    assert (generate(guidance=1.0) - images).abs().max() > 1e-4  # guidance reaches the result


def Live(app):  # noqa: N802 - the tests' name for a real server in a thread
    """A real uvicorn server on a free loopback port, in a thread (``omnidit.serve.command.BackgroundServer``)."""
    from omnidit.serve.command import BackgroundServer

    return BackgroundServer(app, timeout=30)


class ProgressListener:
    """Reads a server's /v1/progress/ID event stream in a thread until a "done" or "error" event:
    ``with ProgressListener(url) as listener: ...post...`` then ``listener.events`` (the decoded events)."""

    def __init__(self, url: str, wait: float = 10) -> None:
        self.url, self.wait, self.events = url, wait, []
        self.listening = threading.Event()
        self.thread = threading.Thread(target=self._listen)

    def _listen(self) -> None:
        import json

        import httpx

        with httpx.stream("GET", self.url, timeout=60) as stream:
            for line in stream.iter_lines():
                self.listening.set()
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
                    if self.events[-1]["state"] in ("done", "error"):
                        return

    def __enter__(self) -> ProgressListener:
        self.thread.start()
        assert self.listening.wait(self.wait), "the progress stream did not open"
        return self

    def __exit__(self, kind, *exc) -> None:
        self.thread.join(self.wait)
        if kind is None:  # else the body's own error says more
            assert not self.thread.is_alive(), "the progress stream did not end"

    @property
    def states(self) -> list[str]:
        return [e["state"] for e in self.events]


def assert_shipped_folder(name: str, folder_name: str, max_bytes: int) -> Path:
    """A model shipped in the package: found by ``name`` in its folder, small, float16, with its provenance."""
    from omnidit.checkpoint import SHIPPED_MODELS, read_safetensors, shipped_model_dir

    folder = shipped_model_dir(name)
    assert folder.name == folder_name and name in SHIPPED_MODELS
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= max_bytes
    assert {t.dtype for t in read_safetensors(weights).values()} == {torch.float16}
    assert (folder / "provenance.json").is_file()
    return folder


def assert_shipped_student(pipe, name: str, folder_name: str, max_bytes: int) -> None:
    """A few-step student shipped in the package: ``assert_shipped_folder``, and its config samples in at most 4
    steps of one pass (the guidance scale an input, no skip-layer pass, one candidate)."""
    from omnidit.pipeline import guided

    assert_shipped_folder(name, folder_name, max_bytes)
    settings = pipe.sampling_settings()
    assert settings["steps"] <= 4 and settings["candidates"] == 1 and not settings["skip_scale"]
    assert pipe.model.config.guidance_embed and not guided(settings, guidance_input=True)
    assert pipe.config.distill.method in ("progressive", "dmd")


SINGLE_OBJECTS = ("a red circle", "a blue square", "a green triangle", "a yellow diamond")


def draw_single_objects(pipe, **sampling) -> tuple[list[int], int]:
    """Draw SINGLE_OBJECTS (seeds 0-3) with a shapes pipeline: (the batch size of every model call, how many images
    show exactly the object asked for)."""
    from omnidit.evaluate.detector import detect_objects

    calls = []
    original = pipe.model.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    pipe.model.forward = counting
    try:
        images = pipe.generate(list(SINGLE_OBJECTS), seed=[0, 1, 2, 3], **sampling)
    finally:
        del pipe.model.forward
    right = 0
    for prompt, image in zip(SINGLE_OBJECTS, images):
        found = detect_objects(image)
        colour, shape = prompt.split()[1:]
        right += len(found) == 1 and found[0].colour == colour and found[0].shape == shape
    return calls, right


def video_clip_file(path: Path, prompt: str = "a red circle moving right", steps: int = 2, fps: float = 8.0) -> Path:
    """A clip of the shipped video model (seed 1) saved at ``path`` at ``fps``: the input of the clip CLI tests,
    drawn without skip-layer guidance (the model's settings when these tests were written), so that it stays the
    same clip whatever the model's sampling defaults become."""
    from omnidit.pipeline import load_pipeline
    from omnidit.video_io import save_video

    video = load_pipeline("shapes-video", device="cpu")
    return save_video(video.generate_video([prompt], seed=1, steps=steps, skip_scale=0.0)[0], path, fps)


def fixed_inputs(config, batch: int = 2, seed: int = 0):
    """A fixed (x, ids, t, cond) for the tiny 16x16 text model."""
    g = torch.Generator().manual_seed(seed)
    mc = config.model
    grid = config.data.height // mc.patch_size, config.data.width // mc.patch_size
    x = torch.randn(batch, grid[0] * grid[1], mc.token_dim, generator=g)
    ids = image_position_ids(*grid, len(mc.axes_dim))
    t = torch.rand(batch, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    cond = Condition(txt=torch.randn(batch, 5, mc.context_dim, generator=g), txt_mask=mask,
                     pooled=torch.randn(batch, mc.pooled_dim, generator=g))
    return x, ids, t, cond


def record_results(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that every call's result is appended to the returned list."""
    real, results = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a: results.append(real(*a)) or results[-1])
    return results
