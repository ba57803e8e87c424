"""LoRA files written for diffusers' Flux transformer (PEFT names and kohya names, q / k / v as three linears) and
for the original Flux layout load onto omnidit's fused modules with numerical parity to diffusers running the same
adapter."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_close
from safetensors.torch import save_file
from test_convert_flux import flux_inputs, loaded_omnidit, run_flux, run_omnidit, tiny_flux

from omnidit.errors import OmniditError
from omnidit.lora import load_lora, lora_state_dict

peft = pytest.importorskip("peft")

BLOCK_TARGETS = (r".*blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                 r"|proj_mlp|proj_out|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2)")


def flux_with_adapter(targets: str = BLOCK_TARGETS, rank: int = 2, alpha: float = 4.0):
    """(a tiny diffusers Flux, its base state, the same model with a random LoRA adapter and the adapter's
    tensors as diffusers names them)."""
    flux = tiny_flux(guidance=False)
    base = {k: v.clone() for k, v in flux.state_dict().items()}
    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), flux)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in flux.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    adapter = {k.replace(".default", ""): v.clone() for k, v in flux.state_dict().items() if "lora_" in k}
    return flux, base, adapter


def omnidit_from(base_state):
    flux = tiny_flux(guidance=False)
    flux.load_state_dict(base_state)
    return loaded_omnidit(flux)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_a_diffusers_flux_lora_loads_onto_the_fused_modules_with_parity(tmp_path, layout):
    flux, base, adapter = flux_with_adapter()
    inputs = flux_inputs(False, 4, 6)
    reference = run_flux(flux, inputs)
    if layout == "peft":
        tensors, meta = {f"transformer.{k}": v for k, v in adapter.items()}, {"lora_alpha": "4.0"}
    else:
        tensors, meta = {}, {}
        for k, v in adapter.items():
            module, part = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", k).groups()
            key = "lora_unet_" + module.replace(".", "_")
            tensors[f"{key}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = v
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(tmp_path / "flux_lora.safetensors"), metadata=meta)
    model = omnidit_from(base)
    without = run_omnidit(model, inputs)
    load_lora(model, tmp_path / "flux_lora.safetensors")
    assert_close(run_omnidit(model, inputs), reference, rtol=1e-5)
    assert (reference - without).abs().max() > 1e-2  # the adapter changes the output: the parity is not vacuous


def test_an_adapter_on_q_alone_leaves_k_and_v_as_they_were(tmp_path):
    flux, base, adapter = flux_with_adapter(targets=r".*transformer_blocks\.\d+\.attn\.to_q")
    inputs = flux_inputs(False, 4, 6)
    save_file({f"transformer.{k}": v for k, v in adapter.items()}, str(tmp_path / "q.safetensors"),
              metadata={"lora_alpha": "4.0"})
    model = omnidit_from(base)
    load_lora(model, tmp_path / "q.safetensors")
    assert_close(run_omnidit(model, inputs), run_flux(flux, inputs), rtol=1e-5)


def test_the_original_flux_layout_loads_too(tmp_path):
    """ComfyUI / black-forest-labs names (double_blocks.0.img_attn.qkv): the adapter that the diffusers file became,
    renamed to the original modules, gives the same outputs."""
    from omnidit.convert.flux import _original_rules

    flux, base, adapter = flux_with_adapter()
    save_file({f"transformer.{k}": v for k, v in adapter.items()}, str(tmp_path / "d.safetensors"),
              metadata={"lora_alpha": "4.0"})
    model = omnidit_from(base)
    load_lora(model, tmp_path / "d.safetensors", name="d")
    ours = lora_state_dict(model, "d")
    rename = {r.omnidit.removesuffix(".weight"): r.parts[0].removesuffix(".weight")
              for r in _original_rules(model.config) if r.omnidit.endswith(".weight")}
    original = {}
    for k, v in ours.items():
        module, part = k.rsplit(".lora_", 1)
        original[f"diffusion_model.{rename[module]}.lora_{part}"] = v
    save_file(original, str(tmp_path / "o.safetensors"))
    fresh = omnidit_from(base)
    load_lora(fresh, tmp_path / "o.safetensors")
    inputs = flux_inputs(False, 4, 6)
    assert_close(run_omnidit(fresh, inputs), run_flux(flux, inputs), rtol=1e-5)


def test_a_foreign_file_for_another_model_is_still_an_error(tmp_path):
    _, base, adapter = flux_with_adapter()
    tensors = {f"transformer.{k}": v for k, v in adapter.items()}
    tensors["transformer.not_a_block.to_q.lora_A.weight"] = torch.zeros(2, 4)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(OmniditError, match="keys of the LoRA file match this model"):
        load_lora(omnidit_from(base), tmp_path / "bad.safetensors")


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_a_diffusers_sd3_lora_loads_with_parity(tmp_path, variant):
    """SD3 and SD3.5 (dual attention: attn2 as well), the joint blocks' attention and MLP projections."""
    import test_convert_sd3 as sd3_tests

    sd3 = sd3_tests.tiny_sd3(variant)
    base = {k: v.clone() for k, v in sd3.state_dict().items()}
    targets = (r".*transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj)"
               r"|ff\.net\.0\.proj|ff\.net\.2)")
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets), sd3)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in sd3.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    tensors = {f"transformer.{k.replace('.default', '')}": v for k, v in sd3.state_dict().items() if "lora_" in k}
    save_file(tensors, str(tmp_path / "sd3.safetensors"))
    inputs = sd3_tests.sd3_inputs(16, 16)
    fresh = sd3_tests.tiny_sd3(variant)
    fresh.load_state_dict(base)
    model = sd3_tests.loaded_omnidit(fresh)
    load_lora(model, tmp_path / "sd3.safetensors")
    assert_close(sd3_tests.run_omnidit(model, inputs), sd3_tests.run_sd3(sd3, inputs), rtol=1e-5)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_omnidit_saves_flux_adapters_that_diffusers_loads_and_that_come_back_exactly(tmp_path, layout):
    """An adapter trained on the omnidit model of a Flux transformer, saved in diffusers' (or the original) names:
    diffusers' own load_lora_adapter runs it with the same outputs, and loading the file back into omnidit gives
    the very same tensors."""
    from omnidit.lora import add_lora, save_lora

    flux = tiny_flux(guidance=False)
    base = {k: v.clone() for k, v in flux.state_dict().items()}
    model = loaded_omnidit(flux)
    add_lora(model, rank=2, alpha=2.0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    path = save_lora(model, tmp_path / "out.safetensors", layout=layout)
    inputs = flux_inputs(False, 4, 6)
    ours = run_omnidit(model, inputs)
    if layout == "diffusers":
        from safetensors.torch import load_file

        theirs = tiny_flux(guidance=False)
        theirs.load_state_dict(base)
        theirs.load_lora_adapter(load_file(str(path)), prefix="transformer")
        assert_close(run_flux(theirs, inputs), ours, rtol=1e-5)
    fresh = omnidit_from(base)
    load_lora(fresh, path, name="back")
    saved, back = lora_state_dict(model), lora_state_dict(fresh, "back")
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
