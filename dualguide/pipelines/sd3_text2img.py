"""``StableDiffusion3TPGPipeline``: diffusers' Stable Diffusion 3 / 3.5 text-to-image with dual guidance in one
transformer call per step; every argument of ``StableDiffusion3Pipeline.__call__`` plus the guidance ones."""

from __future__ import annotations

from diffusers import StableDiffusion3Pipeline

from ..families import SD3
from ..validation import check_pipeline_call
from .guided import GuidedSamplingMixin
from .parameters import guided_call
from .sd3_base import SD3FamilyMixin
from .text2img import TextToImageMixin


class StableDiffusion3TPGPipeline(SD3FamilyMixin, TextToImageMixin, GuidedSamplingMixin, StableDiffusion3Pipeline):
    """SD3 / SD3.5 text-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one transformer call per step."""

    __call__ = guided_call(StableDiffusion3Pipeline, SD3, check_pipeline_call, "text_to_image", "Generate images from the prompt.")
