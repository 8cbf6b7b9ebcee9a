"""``StableDiffusionTPGInpaintPipeline``: diffusers' Stable Diffusion 1.x / 2.x inpainting (4- or 9-channel UNets)
with dual guidance; every argument of ``StableDiffusionInpaintPipeline.__call__`` plus the guidance ones."""

from __future__ import annotations

from diffusers import StableDiffusionInpaintPipeline

from ..families import SD
from .guided import GuidedSamplingMixin
from .inpaint import InpaintMixin, check_inpaint_call
from .pag_layers import PAGLayersMixin
from .parameters import guided_call
from .sd_base import SDFamilyMixin


class StableDiffusionTPGInpaintPipeline(SDFamilyMixin, InpaintMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionInpaintPipeline):
    """Stable Diffusion 1.x / 2.x inpainting with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    __call__ = guided_call(
        StableDiffusionInpaintPipeline, SD, check_inpaint_call, "inpaint",
        "Repaint the white region of ``mask_image`` in ``image``, guided by the prompt.",
    )  # fmt: skip
