"""What the Stable Diffusion 1.x / 2.x pipelines change in the shared guided runs: one text encoder and no
added conditioning, diffusers' SD latents and decoding (safety checker, ``nsfw_content_detected``)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

from ..conditioning import Conditioning, encode_sd
from ..config import CFG
from ..families import SD


def vae_latents(pipe, image: torch.Tensor, batch: int, per_prompt: int, dtype, device, generator) -> torch.Tensor:
    """The VAE latents of ``image`` (``(latents - shift_factor) * scaling_factor``; latents given pass as they are),
    one per image of the call, encoded with each image's generator and repeated as SD's and SD3's
    ``prepare_latents`` do, without noise."""
    image = image.to(device=device, dtype=dtype)
    images = batch * per_prompt
    if image.shape[1] == pipe.vae.config.latent_channels:
        latents = image
    else:
        if isinstance(generator, list):
            image = torch.cat([image] * (images // image.shape[0])) if image.shape[0] < images else image
            latents = torch.cat([retrieve_latents(pipe.vae.encode(image[i : i + 1]), generator=generator[i]) for i in range(images)])
        else:
            latents = retrieve_latents(pipe.vae.encode(image), generator=generator)
        shift = pipe.vae.config.get("shift_factor")
        latents = (latents if shift is None else latents - shift) * pipe.vae.config.scaling_factor
    if latents.shape[0] < images:
        latents = torch.cat([latents] * (images // latents.shape[0]))
    return latents


class SDFamilyMixin:
    """Stable Diffusion 1.x / 2.x parts of a guided pipeline; first in the pipeline's bases."""

    family = SD
    _nsfw_content_detected = None
    # diffusers' SD names (no pooled embeds or time ids), plus the x0 prediction of the step: guided and per branch.
    _callback_tensor_inputs = [
        "latents", "prompt_embeds", "negative_prompt_embeds", "denoised", "denoised_uncond", "denoised_cond",
        "denoised_tpg", "denoised_pag",
    ]  # fmt: skip

    @property
    def default_sample_size(self) -> int:
        """The UNet's sample size: ``height`` / ``width`` default to it times the VAE factor, as in diffusers."""
        return self.unet.config.sample_size

    def encode_prompts(self, args: Dict[str, Any], cfg: CFG, device, lora_scale: Optional[float]) -> Tuple[Conditioning, Optional[Conditioning]]:
        return encode_sd(
            self, args["prompt"], args["negative_prompt"], num_images_per_prompt=args["num_images_per_prompt"],
            with_negative=cfg.enabled, device=device, lora_scale=lora_scale, clip_skip=args["clip_skip"],
            prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
            truncate_long_prompts=args["truncate_long_prompts"],
        )  # fmt: skip

    def task_inputs(self, args: Dict[str, Any], terms, batch: int, height: int, width: int, device):
        """The guidance inputs of an image task: SD rows carry no size conditioning."""
        return self.guidance_inputs(args, terms[0], terms[3], batch, device)

    def noise_options(self, add_noise: bool) -> Dict[str, bool]:
        """SD's ``prepare_latents`` always adds noise (its pipelines have no ``denoising_start``)."""
        return {}

    def image_latents(self, image: torch.Tensor, batch: int, per_prompt: int, dtype, device, generator) -> torch.Tensor:
        """The VAE latents of ``image`` without noise, encoded and repeated as SD's ``prepare_latents`` does."""
        return vae_latents(self, image, batch, per_prompt, dtype, device, generator)

    def decode(self, latents: torch.Tensor, output_type: str):
        """VAE decode, the safety checker (its flags kept for ``output``), post-processing, as diffusers' SD."""
        self._nsfw_content_detected = None
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        image, nsfw = self.run_safety_checker(image, self._execution_device, dtype)
        self._nsfw_content_detected = nsfw
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)

    def output(self, images, args: Dict[str, Any]):
        """diffusers' SD return value: the images and the safety checker's flags."""
        self.maybe_free_model_hooks()
        nsfw = self._nsfw_content_detected
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw) if args["return_dict"] else (images, nsfw)
