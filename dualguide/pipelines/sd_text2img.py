"""``StableDiffusionTPGPipeline``: diffusers' Stable Diffusion 1.x / 2.x text-to-image with dual guidance in
one UNet call per step; every argument of ``StableDiffusionPipeline.__call__`` plus the guidance ones."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from ..families import SD
from ..validation import check_pipeline_call
from .guided import GuidedSamplingMixin
from .pag_layers import PAGLayersMixin
from .parameters import guided_call
from .sd_base import SDFamilyMixin
from .text2img import TextToImageMixin


class StableDiffusionTPGPipeline(SDFamilyMixin, TextToImageMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x / 2.x text-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    __call__ = guided_call(StableDiffusionPipeline, SD, check_pipeline_call, "text_to_image", "Generate images from the prompt.")
