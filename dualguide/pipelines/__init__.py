"""Guided SDXL pipelines, one module per diffusers task, all thin over ``GuidedSamplingMixin``."""

from .controlnet import (
    StableDiffusionXLControlNetTPGImg2ImgPipeline,
    StableDiffusionXLControlNetTPGInpaintPipeline,
    StableDiffusionXLControlNetTPGPipeline,
)
from .guided import GuidedSamplingMixin, apply_nag, apply_softpag
from .img2img import StableDiffusionXLTPGImg2ImgPipeline
from .inpaint import StableDiffusionXLTPGInpaintPipeline
from .text2img import StableDiffusionXLTPGPipeline

__all__ = [
    "GuidedSamplingMixin",
    "StableDiffusionXLControlNetTPGImg2ImgPipeline",
    "StableDiffusionXLControlNetTPGInpaintPipeline",
    "StableDiffusionXLControlNetTPGPipeline",
    "StableDiffusionXLTPGImg2ImgPipeline",
    "StableDiffusionXLTPGInpaintPipeline",
    "StableDiffusionXLTPGPipeline",
    "apply_nag",
    "apply_softpag",
]
