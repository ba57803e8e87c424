"""Training in latent space (a VAE codec) and from a precomputed cache, end to end."""

from __future__ import annotations

import pytest
import torch

from omnidit.cli import main
from omnidit.config import load_config
from omnidit.errors import OmniditError
from omnidit.train import Trainer

DIGITS = ["model.hidden_size=64", "model.num_heads=2", "model.depth=1", "model.depth_single=1",
          "train.batch_size=16", "train.lr=1e-3", "train.device=cpu", "train.tensorboard=false",
          "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.7, shift_factor=0.1)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def test_training_from_the_cache_equals_training_from_the_data(tmp_path, capsys):
    common = [*DIGITS, "train.steps=4", "train.checkpoint_every=4"]
    cached = [*common, f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'b'}"]
    assert main(["precompute", "configs/digits.json", *cached, "--no-progress"]) == 0
    assert "cached in" in capsys.readouterr().out
    direct = Trainer(load_config("configs/digits.json", [*common, f"train.out_dir={tmp_path / 'a'}"]), False)
    from_cache = Trainer(load_config("configs/digits.json", cached), False)
    assert from_cache.cache is not None and from_cache.cache.num_samples == direct.dataset.num_samples
    a = [direct.train_step()[0] for _ in range(4)]
    b = [from_cache.train_step()[0] for _ in range(4)]
    assert a == pytest.approx(b, rel=1e-6)
    for p, q in zip(direct.model.parameters(), from_cache.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_a_changed_setting_never_reuses_a_stale_cache(tmp_path):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert main(["precompute", "configs/digits.json", *DIGITS, cache, "--no-progress"]) == 0
    with pytest.raises(OmniditError, match="width"):
        Trainer(load_config("configs/digits.json", [*DIGITS, cache, "data.width=8", "data.height=8",
                                                    f"train.out_dir={tmp_path}"]), False)


def test_text_to_image_training_in_vae_latent_space(tiny_vae, tmp_path, capsys):
    overrides = ["model.preset=tiny", "model.hidden_size=64", "model.num_heads=2", "model.in_channels=4",
                 "model.patch_size=2", "model.depth=1", "model.depth_single=1", f"data.codec={tiny_vae}",
                 "train.batch_size=4", "train.steps=3", "train.checkpoint_every=3", "train.device=cpu",
                 "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}", "sample.steps=2"]
    trainer = Trainer(load_config("configs/shapes_quick.json", overrides), False)
    assert trainer.codec.downsample == 2 and trainer.grid == (8, 8)  # 32 px -> 16 latent -> 8x8 tokens
    trainer.run()
    out = tmp_path / "vae.png"
    assert main(["generate", "a red circle", "--model", str(tmp_path / "run"), "-o", str(out), "--no-progress"]) == 0
    from PIL import Image

    assert Image.open(out).size == (32, 32)  # decoded back to pixels
    # the latent channels must match the model
    with pytest.raises(OmniditError, match="in_channels"):
        Trainer(load_config("configs/shapes_quick.json", [*overrides, "model.in_channels=3"]), False)
    # and a cache of VAE latents works the same way
    assert main(["precompute", "configs/shapes_quick.json", *overrides, f"data.cache_dir={tmp_path / 'c'}",
                 "data.cache_samples=8", "--no-progress"]) == 0
    cached = Trainer(load_config("configs/shapes_quick.json", [*overrides, f"data.cache_dir={tmp_path / 'c'}",
                                                         "data.cache_samples=8", f"train.out_dir={tmp_path / 'r2'}"]),
                     False)
    assert cached.text_encoder is None  # text features come from the cache
    assert torch.isfinite(torch.tensor(cached.train_step()[0]))
