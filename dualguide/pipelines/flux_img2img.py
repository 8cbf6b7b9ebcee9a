"""``FluxTPGImg2ImgPipeline``: diffusers' Flux.1 image-to-image with true CFG, NAG, TPG and PAG in one transformer call
per step; every argument of ``FluxImg2ImgPipeline.__call__`` plus the guidance ones. As there, ``image`` is resized to
``height`` x ``width`` (the pipeline's default size when None) and ``latents``, when given, are the packed start."""

from __future__ import annotations

from typing import Any, Dict

from diffusers import FluxImg2ImgPipeline
from torch import Tensor

from ..families import FLUX
from ..families.flux import unpack_latents
from .flux_base import FluxFamilyMixin, check_flux_call
from .guided import GuidedSamplingMixin
from .img2img import ImageToImageMixin, check_image, check_task_numbers, check_task_steps, is_latents
from .parameters import guided_call


def check_flux_img2img_call(pipe, args: Dict[str, Any]) -> Dict[str, Any]:
    """``check_flux_call`` plus ``image`` and ``strength``; packed ``latents`` come back unpacked for the shared run."""
    check_image(args["image"], "image")
    check_task_numbers(pipe, args)
    checked = check_flux_call(pipe, args)
    check_task_steps(pipe, checked)
    if checked["latents"] is not None:
        checked["latents"] = unpack_latents(checked["latents"], *pipe.latent_shape(1, checked["height"], checked["width"])[-2:])
    return checked


class FluxTPGImg2ImgPipeline(FluxFamilyMixin, ImageToImageMixin, GuidedSamplingMixin, FluxImg2ImgPipeline):
    """Flux.1 dev / schnell image-to-image with true CFG + NAG (+ TPG, PAG, experimental) in one transformer call per step."""

    __call__ = guided_call(
        FluxImg2ImgPipeline, FLUX, check_flux_img2img_call, "image_to_image", "Transform ``image`` guided by the prompt.",
    )  # fmt: skip

    def start_latents(self, image: Tensor, timestep: Tensor, batch: int, per_prompt: int, dtype, device, generator,
                      add_noise: bool) -> Tensor:  # fmt: skip
        """diffusers' Flux ``prepare_latents`` (``image`` encoded, noised to ``timestep``, packed), unpacked."""
        height, width = image.shape[-2:]
        if is_latents(self, image):
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        channels = self.transformer.config.in_channels // 4
        packed, _ = self.prepare_latents(image, timestep, batch * per_prompt, channels, height, width, dtype, device, generator)
        return unpack_latents(packed, *self.latent_shape(1, height, width)[-2:])
