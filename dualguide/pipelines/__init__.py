"""Guided SDXL pipelines, one module per diffusers task, all thin over ``GuidedSamplingMixin``."""

from .guided import GuidedSamplingMixin, apply_nag, apply_softpag
from .img2img import StableDiffusionXLTPGImg2ImgPipeline
from .inpaint import StableDiffusionXLTPGInpaintPipeline
from .text2img import StableDiffusionXLTPGPipeline

__all__ = [
    "GuidedSamplingMixin",
    "StableDiffusionXLTPGImg2ImgPipeline",
    "StableDiffusionXLTPGInpaintPipeline",
    "StableDiffusionXLTPGPipeline",
    "apply_nag",
    "apply_softpag",
]
