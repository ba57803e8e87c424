"""Key maps between omnidit's MMDiT and other checkpoint layouts: Flux, SD3 / SD3.5 and DiT, in diffusers
form and (Flux, SD3) in their original single-file form. Shared machinery lives in ``convert.common``."""

from omnidit.convert.dit import (
    DIT_TIME_SCALE,
    dit_config_to_omnidit,
    dit_to_omnidit,
    load_dit_transformer,
    omnidit_config_to_dit,
    omnidit_to_dit,
)
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
from omnidit.convert.sd3 import (
    load_sd3_transformer,
    omnidit_config_to_sd3,
    omnidit_to_sd3,
    omnidit_to_sd3_original,
    sd3_config_to_omnidit,
    sd3_original_config,
    sd3_original_to_omnidit,
    sd3_to_omnidit,
)

__all__ = [
    "DIT_TIME_SCALE",
    "dit_config_to_omnidit",
    "dit_to_omnidit",
    "flux_config_to_omnidit",
    "flux_original_config",
    "flux_original_to_omnidit",
    "flux_to_omnidit",
    "load_dit_transformer",
    "load_flux_transformer",
    "load_sd3_transformer",
    "omnidit_config_to_dit",
    "omnidit_config_to_flux",
    "omnidit_config_to_sd3",
    "omnidit_to_dit",
    "omnidit_to_flux",
    "omnidit_to_flux_original",
    "omnidit_to_sd3",
    "omnidit_to_sd3_original",
    "sd3_config_to_omnidit",
    "sd3_original_config",
    "sd3_original_to_omnidit",
    "sd3_to_omnidit",
]
