"""Latent codecs: identity pixels, and a tiny random diffusers AutoencoderKL saved to a local folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from omnidit.codecs import IdentityCodec, VAECodec, codec_name, dtype_name, load_codec, resolve_dtype
from omnidit.errors import OmniditError

SCALE, SHIFT = 0.5, 0.1


def test_identity_round_trip_is_exact():
    codec = load_codec("identity", channels=3)
    assert isinstance(codec, IdentityCodec)
    assert (codec.name, codec.channels, codec.downsample) == ("identity", 3, 1)
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = codec.encode(x)
    assert z.shape == x.shape and z.dtype == torch.float32
    assert torch.equal(codec.decode(z), x)
    assert torch.equal(codec.decode(z * 3), (x * 3).clamp(-1, 1))  # decode clamps to [-1, 1]
    assert load_codec("identity", channels=3) is codec  # memoised
    assert load_codec("identity", channels=1).channels == 1
    with pytest.raises(ValueError, match="expected images"):
        codec.encode(torch.zeros(1, 1, 8, 8))


def test_dtypes_and_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    assert dtype_name("fp32") == "float32"
    with pytest.raises(OmniditError, match="unsupported dtype"):
        resolve_dtype("int8")
    assert codec_name("identity") == "identity"


def test_module_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None; import omnidit.codecs, omnidit.precompute; "
            "c = omnidit.codecs.load_codec('identity'); print(c.channels)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


# ---- VAE ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL (f = 2, 4 latent channels) with scale 0.5 and shift 0.1."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=SCALE, shift_factor=SHIFT,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(vae_dir):
    """The same VAE loaded straight with diffusers, as the oracle."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval()


def _images(b=2, h=16, w=24, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _edited_copy(vae_dir, tmp_path, **changes):
    """A copy of the VAE folder whose config.json has keys set (value None: removed)."""
    path = tmp_path / "edited"
    shutil.copytree(vae_dir, path)
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_vae_encode_decode_match_diffusers(vae_dir, reference):
    codec = load_codec(str(vae_dir))
    assert isinstance(codec, VAECodec)
    assert (codec.channels, codec.downsample, codec.scaling_factor, codec.shift_factor) == (4, 2, SCALE, SHIFT)
    assert codec.name == f"vae:{vae_dir.resolve()}:float32" == codec_name(str(vae_dir))
    assert load_codec(str(vae_dir)) is codec  # memoised per (folder, device, dtype)
    assert not any(p.requires_grad for p in codec.vae.parameters()) and not codec.vae.training
    x = _images()
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 12) and z.dtype == torch.float32 and not z.requires_grad
    with torch.no_grad():
        expected = (reference.encode(x).latent_dist.mean - SHIFT) * SCALE
        decoded = reference.decode(z / SCALE + SHIFT).sample.clamp(-1, 1)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(codec.encode(x), z)  # the mean: deterministic
    out = codec.decode(z)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, decoded, rtol=1e-5, atol=1e-6)


def test_vae_sampling_uses_the_generator(vae_dir, reference):
    codec = load_codec(str(vae_dir), sample=True)
    assert codec.name.endswith(":sample") and codec is not load_codec(str(vae_dir))
    x = _images(1)
    a = codec.encode(x, generator=torch.Generator().manual_seed(1))
    b = codec.encode(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, load_codec(str(vae_dir)).encode(x))
    with pytest.raises(ValueError, match="Generator"):
        codec.encode(x)


def test_vae_without_shift_factor_defaults_to_zero(vae_dir, reference, tmp_path):
    codec = load_codec(str(_edited_copy(vae_dir, tmp_path, shift_factor=None)))
    assert codec.shift_factor == 0.0 and codec.scaling_factor == SCALE
    x = _images(1)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.mean * SCALE
    torch.testing.assert_close(codec.encode(x), expected, rtol=1e-5, atol=1e-6)


def test_vae_per_channel_latent_statistics(vae_dir, reference, tmp_path):
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 4.0]
    codec = load_codec(str(_edited_copy(vae_dir, tmp_path, latents_mean=mean, latents_std=std)))
    x = _images(1)
    with torch.no_grad():
        z = reference.encode(x).latent_dist.mean
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(codec.encode(x), (z - m) * SCALE / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(codec.decode(codec.encode(x)), load_codec(str(vae_dir)).decode(
        load_codec(str(vae_dir)).encode(x)), rtol=1e-4, atol=1e-5)


def test_vae_bfloat16_is_close_to_float32(vae_dir):
    codec = load_codec(str(vae_dir), dtype="bf16")
    assert codec.name.endswith(":bfloat16") and next(codec.vae.parameters()).dtype == torch.bfloat16
    x = _images(1)
    z = codec.encode(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, load_codec(str(vae_dir)).encode(x), rtol=0.05, atol=0.05)
    assert codec.decode(z).dtype == torch.float32


def test_vae_input_errors(vae_dir):
    codec = load_codec(str(vae_dir))
    with pytest.raises(OmniditError, match="multiple of the codec's downsample factor 2"):
        codec.encode(_images(1, 15, 16))
    with pytest.raises(OmniditError, match="takes 3-channel images"):
        load_codec(str(vae_dir), channels=1)


def test_load_codec_errors(vae_dir, tmp_path):
    with pytest.raises(OmniditError, match="VAE folder not found") as e:
        load_codec(str(tmp_path / "nope"))
    assert "identity" in e.value.hint
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OmniditError, match="not a folder"):
        load_codec(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OmniditError, match="no config.json"):
        load_codec(str(tmp_path / "empty"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(OmniditError, match="'UNet2DConditionModel', not an AutoencoderKL"):
        load_codec(str(tmp_path / "unet"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(OmniditError, match="cannot read"):
        load_codec(str(tmp_path / "broken"))
    no_weights = _edited_copy(vae_dir, tmp_path)
    (no_weights / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OmniditError, match="cannot load the VAE"):
        load_codec(str(no_weights))


def test_missing_diffusers_is_a_clear_error(vae_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes the import fail
    with pytest.raises(OmniditError, match="optional 'diffusers'") as e:
        VAECodec(vae_dir)
    assert e.value.hint == "pip install -e '.[diffusers]'"
