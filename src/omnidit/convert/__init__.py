"""Key maps between omnidit's MMDiT and other checkpoint layouts (Flux, in diffusers and original form)."""

from omnidit.convert.flux import (
    flux_config_to_omnidit,
    flux_original_config,
    flux_original_to_omnidit,
    flux_to_omnidit,
    load_flux_transformer,
    omnidit_config_to_flux,
    omnidit_to_flux,
    omnidit_to_flux_original,
)

__all__ = [
    "flux_config_to_omnidit",
    "flux_original_config",
    "flux_original_to_omnidit",
    "flux_to_omnidit",
    "load_flux_transformer",
    "omnidit_config_to_flux",
    "omnidit_to_flux",
    "omnidit_to_flux_original",
]
