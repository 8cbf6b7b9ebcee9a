"""Guided SDXL pipelines, one module per diffusers task, all thin over ``GuidedSamplingMixin``."""

from .guided import GuidedSamplingMixin, apply_nag, apply_softpag
from .text2img import StableDiffusionXLTPGPipeline

__all__ = ["GuidedSamplingMixin", "StableDiffusionXLTPGPipeline", "apply_nag", "apply_softpag"]
