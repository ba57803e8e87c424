"""Pipelines that run foreign checkpoints end to end with omnidit's model, sampler and codecs."""

from omnidit.pipelines.flux import FluxPipelineOmnidit, flux_schedule_shift, load_flux_pipeline

__all__ = ["FluxPipelineOmnidit", "flux_schedule_shift", "load_flux_pipeline"]
