"""Latent / text-embedding caches: exact values, keys that change with every setting, atomic writes."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from omnidit import __version__
from omnidit.codecs import load_codec
from omnidit.data import DigitsDataset, ShapesDataset
from omnidit.errors import OmniditError
from omnidit.precompute import CachedDataset, cache_fields, cache_key, open_cache, precompute
from omnidit.text import load_text_encoder

N = 40
PREP = {"seed": 0, "held_out": ["red triangle", "blue circle"]}


def settings(**changes) -> dict:
    """The cache settings of the shared cache below, with ``changes``."""
    base = dict(codec_name="identity", text_encoder_name="minilm:max_length=32", dtype="float32",
                data_name="shapes", width=16, height=16, indices=range(N), preprocessing=PREP)
    return {**base, **changes}


def shapes_fields(**changes) -> dict:
    return cache_fields(**settings(**changes))


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def data():
    return ShapesDataset(16, 16, seed=0, held_out=PREP["held_out"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data, encoder):
    """The first 40 shapes at 16x16, in 3 shards (16 + 16 + 8) written in batches of 7."""
    out = tmp_path_factory.mktemp("cache")
    assert encoder.name == "minilm:max_length=32"
    precompute(data, load_codec("identity"), encoder, out, shapes_fields(), batch_size=7, progress=False,
               shard_size=16)
    return open_cache(out, shapes_fields())


class CountingCodec:
    """The identity codec, counting its calls and optionally failing at call ``fail_at``."""

    name, channels, downsample = "identity", 3, 1

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at

    def encode(self, images, generator=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return images.float()

    def decode(self, latents):
        return latents.clamp(-1, 1)


def test_cached_values_equal_the_encoders(cache, data, encoder):
    assert (cache.num_samples, cache.channels, cache.height, cache.width, cache.num_classes) == (N, 3, 16, 16, 0)
    assert len(cache.meta["shards"]) == 3 and cache.meta["omnidit_version"] == __version__
    assert cache.meta["txt_dim"] == cache.meta["pooled_dim"] == encoder.dim
    encoder.cache.clear()  # compare against fresh single-prompt forward passes, not the encoder's own cache
    for i in range(N):
        item, want = cache[i], data[i]
        assert torch.equal(item["latent"], want["image"]) and item["latent"].dtype == torch.float32
        assert item["caption"] == want["caption"] and item["label"] == -1
        if i % 4:
            continue  # text on every fourth sample keeps the test fast
        cond = encoder.encode([want["caption"]])
        torch.testing.assert_close(item["txt"], cond.txt[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["pooled"], cond.pooled[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        cache[N]


def test_batch_pads_text_like_the_encoder(cache, encoder):
    idx = [3, 17, 39, 0]  # across all three shards
    latents, captions, labels, cond = cache.batch(idx)
    assert latents.shape == (4, 3, 16, 16) and labels.tolist() == [-1] * 4
    want = encoder.encode(captions)
    assert torch.equal(cond.txt_mask, want.txt_mask)
    torch.testing.assert_close(cond.txt, want.txt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled, want.pooled, rtol=1e-5, atol=1e-5)
    assert pickle.loads(pickle.dumps(cache))[17]["caption"] == captions[1]  # DataLoader workers can reopen it
    null, want = cache.null_condition(), encoder.encode([""])
    assert torch.equal(null.txt_mask, want.txt_mask)
    torch.testing.assert_close(null.txt, want.txt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(null.pooled, want.pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, field", [
    ({"width": 32}, "width"), ({"height": 32}, "height"), ({"codec_name": "vae:/some/vae:float32"}, "codec"),
    ({"text_encoder_name": None}, "text_encoder"), ({"dtype": torch.float16}, "dtype"),
    ({"data_name": "digits"}, "data"), ({"indices": range(N + 1)}, "indices"),
    ({"preprocessing": {**PREP, "seed": 1}}, "preprocessing"),
])
def test_any_changed_setting_misses_the_cache(cache, change, field):
    fields = shapes_fields(**change)
    assert cache_key(**settings(**change)) != cache.meta["key"]
    with pytest.raises(OmniditError, match=f"differs in {field} \\(cache: ") as e:
        open_cache(cache.directory.parent, fields)
    assert "omnidit precompute" in e.value.hint


def test_keys_are_canonical():
    same = settings(dtype=torch.float32, preprocessing={"held_out": ("red triangle", "blue circle"), "seed": 0})
    assert cache_key(**same) == cache_key(**settings())
    assert shapes_fields(indices=[0, 2, 1])["indices"]["count"] == 3  # arbitrary lists are hashed


def test_float16_storage_and_no_text(tmp_path):
    digits = DigitsDataset(8, 8)
    fields = cache_fields("identity", None, "fp16", "digits", 8, 8, range(10), {"split": "train"})
    path = precompute(digits, load_codec("identity", channels=1), None, tmp_path, fields, progress=False)
    ds = CachedDataset(path)
    assert (ds.channels, ds.num_classes, ds.meta["txt_dim"]) == (1, 10, None)
    for i in range(10):
        item = ds[i]
        assert item.keys() == {"latent", "caption", "label"} and item["latent"].dtype == torch.float32
        torch.testing.assert_close(item["latent"], digits[i]["image"], rtol=0, atol=1e-3)
        assert item["label"] == digits[i]["label"]
    latents, _, labels, cond = ds.batch([1, 2])
    assert cond.txt is None and ds.null_condition().txt is None
    assert labels.tolist() == [digits[1]["label"], digits[2]["label"]]
    with pytest.raises(OmniditError, match="dataset has"):
        precompute(digits, load_codec("identity", channels=1), None, tmp_path,
                   cache_fields("identity", None, "fp16", "digits", 8, 8, range(10_000)), progress=False)


def test_write_is_atomic_and_reused(tmp_path, data):
    fields = cache_fields("identity", None, "float32", "shapes", 16, 16, range(12))
    key = cache_key("identity", None, "float32", "shapes", 16, 16, range(12))
    (tmp_path / f"{key}.tmp").mkdir()  # a leftover from a crashed run, with a plausible meta.json
    (tmp_path / f"{key}.tmp" / "meta.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(OmniditError, match="no precomputed cache"):
        open_cache(tmp_path, fields)
    with pytest.raises(RuntimeError, match="simulated crash"):
        precompute(data, CountingCodec(fail_at=2), None, tmp_path, fields, batch_size=4, progress=False)
    assert not (tmp_path / key).exists()  # the crash left only the .tmp folder
    with pytest.raises(OmniditError, match="no precomputed cache"):
        open_cache(tmp_path, fields)
    codec = CountingCodec()
    path = precompute(data, codec, None, tmp_path, fields, batch_size=4, progress=False)
    assert path == tmp_path / key and codec.calls == 3 and not (tmp_path / f"{key}.tmp").exists()
    assert open_cache(tmp_path, fields).num_samples == 12
    assert precompute(data, codec, None, tmp_path, fields, progress=False) == path and codec.calls == 3  # reused
    precompute(data, codec, None, tmp_path, fields, batch_size=4, progress=False, overwrite=True)
    assert codec.calls == 6 and sorted(p.name for p in tmp_path.iterdir()) == [key]


def test_precompute_checks_its_inputs(tmp_path, data, encoder):
    fields = shapes_fields()
    with pytest.raises(ValueError, match="text_encoder"):
        precompute(data, load_codec("identity"), None, tmp_path, fields, progress=False)
    with pytest.raises(ValueError, match="width"):
        precompute(ShapesDataset(32, 16), load_codec("identity"), encoder, tmp_path, fields, progress=False)
    with pytest.raises(ValueError, match="non-contiguous"):
        precompute(data, load_codec("identity"), encoder, tmp_path, shapes_fields(indices=[3, 1]), progress=False)
    sampling = CountingCodec()
    sampling.sample = True
    with pytest.raises(OmniditError, match="samples from the VAE posterior"):
        precompute(data, sampling, encoder, tmp_path, fields, progress=False)
    path = precompute(data, load_codec("identity"), encoder, tmp_path, shapes_fields(indices=[5, 2]),
                      indices=[5, 2], progress=False)
    assert [CachedDataset(path)[i]["caption"] for i in (0, 1)] == [data[5]["caption"], data[2]["caption"]]
    with pytest.raises(OmniditError, match="no precomputed cache in .*nowhere"):
        open_cache(tmp_path / "nowhere", fields)


def test_a_different_scene_mix_needs_a_different_cache(make_tiny_config, tmp_path):
    from omnidit.precompute import fields_for_config

    def fields(**data):
        config = make_tiny_config(tmp_path, data={"cache_samples": 8, **data}, text={"encoder": "none"})
        return fields_for_config(config, ShapesDataset(16, 16))

    default = fields()
    assert "scene_kinds" not in default["preprocessing"]  # caches written before the key existed stay valid
    assert fields(scene_kinds={"relation": 1}) != default
    # Weights are a mapping, not a sequence: the order they are written in changes neither key nor data.
    assert fields(scene_kinds={"relation": 1, "pair": 2}) == fields(scene_kinds={"pair": 2, "relation": 1})
    a = ShapesDataset(16, 16, kinds={"relation": 1, "pair": 2})
    b = ShapesDataset(16, 16, kinds={"pair": 2, "relation": 1})
    assert [a.scene(i) for i in range(30)] == [b.scene(i) for i in range(30)]
    assert {a.scene(i).kind for i in range(30)} == {"relation", "pair"}
