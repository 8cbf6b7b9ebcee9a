"""``StableDiffusionTPGImg2ImgPipeline``: diffusers' Stable Diffusion 1.x / 2.x image-to-image with dual guidance;
every argument of ``StableDiffusionImg2ImgPipeline.__call__`` plus the guidance ones."""

from __future__ import annotations

from diffusers import StableDiffusionImg2ImgPipeline

from ..families import SD
from .guided import GuidedSamplingMixin
from .img2img import ImageToImageMixin, check_img2img_call
from .pag_layers import PAGLayersMixin
from .parameters import guided_call
from .sd_base import SDFamilyMixin


class StableDiffusionTPGImg2ImgPipeline(SDFamilyMixin, ImageToImageMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionImg2ImgPipeline):
    """Stable Diffusion 1.x / 2.x image-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    __call__ = guided_call(
        StableDiffusionImg2ImgPipeline, SD, check_img2img_call, "image_to_image", "Transform ``image`` guided by the prompt.",
    )  # fmt: skip
