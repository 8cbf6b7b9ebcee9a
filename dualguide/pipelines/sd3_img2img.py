"""``StableDiffusion3TPGImg2ImgPipeline``: diffusers' Stable Diffusion 3 / 3.5 image-to-image with dual guidance in
one transformer call per step; every argument of ``StableDiffusion3Img2ImgPipeline.__call__`` plus the guidance ones."""

from __future__ import annotations

from diffusers import StableDiffusion3Img2ImgPipeline

from ..families import SD3
from .guided import GuidedSamplingMixin
from .img2img import ImageToImageMixin, check_img2img_call
from .parameters import guided_call
from .sd3_base import SD3FamilyMixin


class StableDiffusion3TPGImg2ImgPipeline(SD3FamilyMixin, ImageToImageMixin, GuidedSamplingMixin, StableDiffusion3Img2ImgPipeline):
    """SD3 / SD3.5 image-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one transformer call per step."""

    __call__ = guided_call(
        StableDiffusion3Img2ImgPipeline, SD3, check_img2img_call, "image_to_image", "Transform ``image`` guided by the prompt.",
    )  # fmt: skip
