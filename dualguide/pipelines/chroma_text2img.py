"""``ChromaTPGPipeline``: diffusers' Chroma text-to-image with CFG, NAG, TPG and PAG in one transformer call per step;
every argument of ``ChromaPipeline.__call__`` plus the guidance ones."""

from __future__ import annotations

from diffusers import ChromaPipeline

from ..families import CHROMA
from .chroma_base import ChromaFamilyMixin, check_chroma_call
from .guided import GuidedSamplingMixin
from .parameters import guided_call
from .text2img import TextToImageMixin


class ChromaTPGPipeline(ChromaFamilyMixin, TextToImageMixin, GuidedSamplingMixin, ChromaPipeline):
    """Chroma text-to-image with CFG + NAG (+ TPG, PAG, experimental) in one transformer call per step."""

    __call__ = guided_call(ChromaPipeline, CHROMA, check_chroma_call, "text_to_image", "Generate images from the prompt.")
