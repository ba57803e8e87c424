"""Pipelines that run foreign checkpoints end to end with omnidit's model, sampler and codecs."""

from omnidit.pipelines.flux import FluxPipelineOmnidit, flux_schedule_shift, load_flux_pipeline
from omnidit.pipelines.sd3 import SD3PipelineOmnidit, load_sd3_pipeline, sd3_timesteps

__all__ = ["FluxPipelineOmnidit", "SD3PipelineOmnidit", "flux_schedule_shift", "load_flux_pipeline",
           "load_sd3_pipeline", "sd3_timesteps"]
