"""Stable Diffusion 1.x / 2.x ControlNet pipelines with dual guidance: text-to-image, image-to-image, inpainting.

Each takes every argument of diffusers' SD ControlNet pipeline of its task plus the guidance ones, and runs
the task's shared guided run with ``ControlNetMixin``: the ControlNet runs on the uncond and cond rows only,
the perturbed rows reuse the cond rows' residuals.
"""

from __future__ import annotations

from functools import partial

from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPipeline

from ..families import SD
from ..validation import check_pipeline_call
from .controlnet import ControlNetMixin, check_controlnet_call, check_image_task
from .guided import GuidedSamplingMixin
from .img2img import ImageToImageMixin
from .inpaint import InpaintMixin, check_inpaint_call
from .pag_layers import PAGLayersMixin
from .parameters import guided_call
from .sd_base import SDFamilyMixin
from .text2img import TextToImageMixin


class StableDiffusionControlNetTPGPipeline(SDFamilyMixin, ControlNetMixin, TextToImageMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionControlNetPipeline):
    """SD 1.x / 2.x ControlNet text-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    control_image_name = "image"
    __call__ = guided_call(
        StableDiffusionControlNetPipeline, SD,
        partial(check_controlnet_call, image_name="image", size_name="image", task_check=check_pipeline_call),
        "text_to_image", "Generate images that follow the control ``image`` (one per ControlNet).",
    )  # fmt: skip


class StableDiffusionControlNetTPGImg2ImgPipeline(
    SDFamilyMixin, ControlNetMixin, ImageToImageMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionControlNetImg2ImgPipeline
):
    """SD 1.x / 2.x ControlNet image-to-image with dual guidance in one UNet call per step."""

    __call__ = guided_call(
        StableDiffusionControlNetImg2ImgPipeline, SD,
        partial(check_controlnet_call, image_name="control_image", size_name="control_image", task_check=check_image_task),
        "image_to_image", "Transform ``image`` guided by the prompt and by ``control_image`` (one per ControlNet).",
    )  # fmt: skip


class StableDiffusionControlNetTPGInpaintPipeline(
    SDFamilyMixin, ControlNetMixin, InpaintMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionControlNetInpaintPipeline
):
    """SD 1.x / 2.x ControlNet inpainting (4- or 9-channel UNets) with dual guidance in one UNet call per step."""

    __call__ = guided_call(
        StableDiffusionControlNetInpaintPipeline, SD,
        partial(check_controlnet_call, image_name="control_image", size_name="image", task_check=check_inpaint_call),
        "inpaint", "Repaint the white region of ``mask_image`` in ``image``, guided by the prompt and ``control_image``.",
    )  # fmt: skip
