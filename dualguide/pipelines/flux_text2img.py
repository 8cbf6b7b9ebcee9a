"""``FluxTPGPipeline``: diffusers' Flux.1 text-to-image with true CFG, NAG, TPG and PAG in one transformer call per step;
every argument of ``FluxPipeline.__call__`` plus the guidance ones."""

from __future__ import annotations

from diffusers import FluxPipeline

from ..families import FLUX
from .flux_base import FluxFamilyMixin, check_flux_call
from .guided import GuidedSamplingMixin
from .parameters import guided_call
from .text2img import TextToImageMixin


class FluxTPGPipeline(FluxFamilyMixin, TextToImageMixin, GuidedSamplingMixin, FluxPipeline):
    """Flux.1 dev / schnell text-to-image with true CFG + NAG (+ TPG, PAG, experimental) in one transformer call per step."""

    __call__ = guided_call(FluxPipeline, FLUX, check_flux_call, "text_to_image", "Generate images from the prompt.")
