"""``FluxKontextTPGPipeline``: diffusers' Flux.1 Kontext image editing with true CFG, NAG, TPG and PAG in one transformer
call per step; every argument of ``FluxKontextPipeline.__call__`` plus the guidance ones.

As there, the output size comes from ``height`` / ``width`` scaled to ``max_area`` (their aspect ratio kept, sides
rounded down to the packed latent multiple) and the reference ``image`` is resized to its own size (with
``_auto_resize``: to the Kontext training resolution nearest its aspect ratio). Its VAE latents (the distribution's
mode) ride in every row's Conditioning; the family adapter appends their tokens after the generated ones, and no
guidance term perturbs or guides them. Unlike diffusers, a call without ``image`` is refused: that is text-to-image
(``FluxTPGPipeline``). NAG stops at ``nag_end`` 0.25 unless told otherwise, the official NAG Kontext pipeline's
default."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional, Tuple

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from torch import Tensor

from ..conditioning import Conditioning
from ..config import CFG
from ..families import FLUX
from ..validation import check_bool, check_number
from .flux_base import FluxFamilyMixin, check_flux_call
from .guided import GuidedSamplingMixin
from .img2img import check_image
from .parameters import guided_call
from .text2img import TextToImageMixin


def is_reference_latents(pipe, image) -> bool:
    """Whether ``image`` is given as VAE latents (a tensor with the latent channels), which Kontext takes as they are."""
    return isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == pipe.latent_channels


def output_size(pipe, height: Optional[int], width: Optional[int], max_area: int) -> Tuple[int, int]:
    """diffusers' Kontext output size: ``height`` x ``width`` (the default when None) scaled to ``max_area`` pixels, sides
    rounded down to twice the VAE factor."""
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    aspect_ratio, multiple = width / height, pipe.vae_scale_factor * 2
    return round((max_area / aspect_ratio) ** 0.5) // multiple * multiple, round((max_area * aspect_ratio) ** 0.5) // multiple * multiple


def reference_size(pipe, image, auto_resize: bool) -> Tuple[int, int]:
    """The size diffusers' Kontext resizes the reference ``image`` (its first image) to: its own, or with ``auto_resize``
    the preferred Kontext resolution nearest its aspect ratio; sides rounded down to twice the VAE factor."""
    height, width = pipe.image_processor.get_default_height_width(image[0] if isinstance(image, list) else image)
    if auto_resize:
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    multiple = pipe.vae_scale_factor * 2
    return height // multiple * multiple, width // multiple * multiple


def check_kontext_call(pipe, args: Dict[str, Any]) -> Dict[str, Any]:
    """``check_flux_call`` at the output size ``max_area`` gives, plus the reference ``image`` (required)."""
    if args["image"] is None:
        raise ValueError("image is required: FluxKontextTPGPipeline edits a reference image (for text-to-image use FluxTPGPipeline)")
    check_image(args["image"], "image")
    args = dict(args)
    args["max_area"] = check_number(args["max_area"], "max_area", 1, integer=True)
    args["_auto_resize"] = check_bool(args["_auto_resize"], "_auto_resize")
    for name in ("height", "width"):
        args[name] = check_number(args[name], name, 1, integer=True, optional=True)
    height, width = output_size(pipe, args["height"], args["width"], args["max_area"])
    if min(height, width) < 1:
        raise ValueError(f"max_area ({args['max_area']}) gives a {height}x{width} image at this aspect ratio; raise max_area")
    if not is_reference_latents(pipe, args["image"]) and min(reference_size(pipe, args["image"], args["_auto_resize"])) < 1:
        raise ValueError(f"image must be at least {pipe.vae_scale_factor * 2} pixels on each side")
    checked = check_flux_call(pipe, {**args, "height": height, "width": width})
    references = len(args["image"]) if isinstance(args["image"], list) else 1
    references = args["image"].shape[0] if isinstance(args["image"], torch.Tensor) and args["image"].ndim == 4 else references
    images = pipe.prompt_batch(checked) * checked["num_images_per_prompt"]
    if images % references:
        raise ValueError(f"image: {references} reference images cannot be repeated to the call's {images} images")
    return checked


class FluxKontextTPGPipeline(FluxFamilyMixin, TextToImageMixin, GuidedSamplingMixin, FluxKontextPipeline):
    """Flux.1 Kontext image editing with true CFG + NAG (+ TPG, PAG, experimental) in one transformer call per step; the
    reference image's tokens are never guided."""

    __call__ = guided_call(
        FluxKontextPipeline, FLUX, check_kontext_call, "text_to_image", "Edit the reference ``image`` as the prompt asks.",
    )  # fmt: skip
    family_nag_defaults = {**FluxFamilyMixin.family_nag_defaults, "nag_end": 0.25}  # the official NAG Kontext pipeline's

    def encode_prompts(self, args: Dict[str, Any], cfg: CFG, device, lora_scale: Optional[float]) -> Tuple[Conditioning, Optional[Conditioning]]:
        """The Flux conditioning, every row with the reference image's latents."""
        positive, negative = super().encode_prompts(args, cfg, device, lora_scale)
        reference = self.reference_latents(args, positive.batch_size, positive.prompt_embeds.dtype, device)
        return replace(positive, reference_latents=reference), None if negative is None else replace(negative, reference_latents=reference)

    def reference_latents(self, args: Dict[str, Any], rows: int, dtype, device) -> Tensor:
        """``[rows, 16, h, w]``: the reference image resized and preprocessed as diffusers' Kontext does, encoded to the
        mode of the VAE's distribution (latents given pass as they are), repeated for the rows."""
        image = args["image"]
        if not is_reference_latents(self, image):
            height, width = reference_size(self, image, args["_auto_resize"])
            image = self.image_processor.preprocess(self.image_processor.resize(image, height, width), height, width)
        image = image.to(device=device, dtype=dtype)
        latents = image if image.shape[1] == self.latent_channels else self._encode_vae_image(image, args["generator"])
        return latents.repeat(rows // latents.shape[0], 1, 1, 1)
