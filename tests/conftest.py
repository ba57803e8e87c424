"""Shared fixtures: tiny configs and two tiny trained runs (text-conditional shapes, class-conditional
digits), each trained ONCE per test session through the Python API and reused by the checkpoint and
CLI tests. The MiniLM text encoder is cached per process by ``load_text_encoder``, so it loads once.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# A ~0.3M-parameter text-conditional model on 16x16 shapes: trains 20 steps in a few seconds on CPU.
TINY_CONFIG: dict = {
    "model": {"preset": "tiny", "hidden_size": 64, "num_heads": 2, "axes_dim": [8, 12, 12], "depth": 1,
              "depth_single": 1},
    "data": {"name": "shapes", "width": 16, "height": 16, "seed": 0},
    "text": {"encoder": "minilm", "max_length": 32},
    "train": {"out_dir": "UNSET", "steps": 20, "batch_size": 8, "lr": 1e-3, "warmup_steps": 5,
              "checkpoint_every": 10, "log_every": 5, "keep_last": 2, "ema_decay": 0.9, "seed": 0,
              "device": "cpu"},
    "sample": {"steps": 4, "cfg": 3.0, "sampler": "euler"},
}

# Overrides that shrink configs/digits.json to a seconds-long class-conditional run.
DIGITS_OVERRIDES = ["model.hidden_size=64", "model.num_heads=2", "model.depth=1", "model.depth_single=1",
                    "train.steps=10", "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2",
                    "train.checkpoint_every=10", "train.log_every=5", "train.device=cpu", "sample.steps=4"]


def tiny_config_dict(out_dir: str | Path, **sections: dict) -> dict:
    """A deep copy of TINY_CONFIG writing to ``out_dir``; ``sections`` update individual sections."""
    d = copy.deepcopy(TINY_CONFIG)
    d["train"]["out_dir"] = str(out_dir)
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


@pytest.fixture(scope="session")
def make_tiny_config():
    """Factory: make_tiny_config(out_dir, train={...}, ...) -> omnidit Config."""
    from omnidit.config import config_from_dict

    def make(out_dir: str | Path, **sections: dict):
        return config_from_dict(tiny_config_dict(out_dir, **sections))

    return make


@pytest.fixture
def tiny_config_file(tmp_path) -> Path:
    """The tiny config as a JSON file (out_dir inside tmp_path) for CLI tests."""
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config_dict(tmp_path / "run")))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder with checkpoint-0000010 and checkpoint-0000020 of the tiny text-conditional model."""
    from omnidit.config import config_from_dict
    from omnidit.train import train

    run = tmp_path_factory.mktemp("tiny") / "run"
    final = train(config_from_dict(tiny_config_dict(run)), progress=False)
    assert final == run / "checkpoint-0000020"
    return run


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A class-conditional digits run built from the shipped configs/digits.json plus overrides."""
    from omnidit.config import load_config
    from omnidit.train import train

    run = tmp_path_factory.mktemp("digits") / "run"
    config = load_config(CONFIGS / "digits.json", DIGITS_OVERRIDES + [f"train.out_dir={run}"])
    train(config, progress=False)
    return run


# 16x16 clips of 4 frames at 8 fps (0.5 s, 4000 samples at 8 kHz: 20 audio tokens of 200), tones mixed in.
AV = {
    "model": {"preset": "tiny", "patch_size": 8, "hidden_size": 32, "num_heads": 2, "axes_dim": [4, 6, 6],
              "depth": 1, "depth_single": 1, "rope_time_scale": 8.0, "extra_streams": {"audio": 200}},
    "data": {"name": "bounce", "width": 16, "height": 16, "frames": 4, "fps": 8.0, "sample_rate": 8000,
             "audio_scale": 3.0, "mix_name": "tones", "mix_every": 2, "seconds": 2.0},
    "train": {"steps": 4, "batch_size": 4, "given_p": 0.5, "stream_given_p": 0.4, "stream_independent_p": 0.3,
              "checkpoint_every": 2, "keep_last": 3},
}


def av_config(make_tiny_config, out_dir, **train):
    sections = {k: dict(v) for k, v in AV.items()}
    sections["train"].update(train)
    return make_tiny_config(out_dir, **sections)


@pytest.fixture(scope="session")
def av_run(tmp_path_factory, make_tiny_config):
    from omnidit.train import train

    run = tmp_path_factory.mktemp("av") / "run"
    train(av_config(make_tiny_config, run), progress=False)
    return run
