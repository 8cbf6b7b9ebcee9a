"""``StableDiffusionXLTPGPipeline``: diffusers' SDXL text-to-image with dual guidance in one UNet call per step.

It keeps ``StableDiffusionXLPipeline``'s loading, LoRA, textual inversion, IP-Adapter and offload
support and every argument of its ``__call__``, and adds TPG, PAG/SoftPAG and NAG next to CFG.
Without ``sampler`` it follows ``pipe.scheduler`` exactly as diffusers does; with ``sampler`` (a
k-diffusion name or callable) it runs that sampler on the guided x0 prediction.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ..families import SDXL
from ..validation import check_pipeline_call
from .guided import GuidedSamplingMixin, seeds_from
from .pag_layers import PAGLayersMixin
from .parameters import guided_call
from .sampling import Interrupted
from .schedules import kdiffusion_sigmas


class TextToImageMixin:
    """The text-to-image run (both sampling loops, decoding), shared by the plain and the ControlNet pipelines."""

    def text_to_image(self, args: Dict[str, Any]):
        """Generate from the checked arguments of a call (diffusers' output)."""
        terms = self.guidance_terms(args)
        self.set_call_state(args)
        device = self._execution_device
        batch = self.prompt_batch(args)
        images = batch * args["num_images_per_prompt"]
        height, width, generator, latents = args["height"], args["width"], args["generator"], args["latents"]
        inputs = self.guidance_inputs(args, terms[0], terms[3], batch, device)
        inputs.control = self.task_control(args, images, height, width, device)
        shape = self.latent_shape(images, height, width)
        try:
            if args["sampler"] is None:
                latents = self._scheduler_sample(args, terms, inputs, shape, device)
            else:
                sigmas_k, init_noise_scale = kdiffusion_sigmas(self.scheduler, args, self.timestep_options(args, shape))
                noise = self.start_noise(shape, latents, generator, device, self.backbone.dtype)
                x = noise.to(device=device, dtype=torch.float32) * init_noise_scale
                timestep_cond = self.guidance_timestep_cond(images, device, x.dtype)
                latents = self.kdiffusion_sample(args, terms, inputs, x, sigmas_k, seeds_from(generator), timestep_cond)
        except Interrupted as stop:
            latents = stop.latents
        return self.output(self.decode(latents, args["output_type"]), args)

    def latent_shape(self, images: int, height: int, width: int) -> Tuple[int, ...]:
        """The shape of the call's latents, ``[images, channels, height / f, width / f]``."""
        return (images, self.backbone.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def start_noise(self, shape: Tuple[int, ...], latents: Optional[torch.Tensor], generator, device, dtype) -> torch.Tensor:
        """The k-diffusion run's unit noise: the caller's ``latents``, else drawn as diffusers draws it."""
        return latents if latents is not None else randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _scheduler_sample(self, args: Dict[str, Any], terms, inputs, shape, device) -> torch.Tensor:
        """diffusers' denoising loop over ``pipe.scheduler``, each step one guided UNet call. Timestep options may
        carry the ``sigmas`` a family's pipeline hands the scheduler (Flux's)."""
        options = {"sigmas": args["sigmas"], **self.timestep_options(args, shape)}
        timesteps, _ = retrieve_timesteps(self.scheduler, args["num_inference_steps"], device, args["timesteps"], **options)
        latents = self.scheduler_latents(shape, args, inputs.cond.prompt_embeds.dtype, device)
        return self.scheduler_sample(args, terms, inputs, latents, timesteps, 0, device)

    def scheduler_latents(self, shape: Tuple[int, ...], args: Dict[str, Any], dtype, device) -> torch.Tensor:
        """The scheduler loop's initial latents, as the diffusers pipeline's ``prepare_latents`` makes them."""
        return self.prepare_latents(*shape[:2], args["height"], args["width"], dtype, device, args["generator"], args["latents"])


class StableDiffusionXLTPGPipeline(TextToImageMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionXLPipeline):
    """SDXL text-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    __call__ = guided_call(
        StableDiffusionXLPipeline, SDXL, check_pipeline_call, "text_to_image", "Generate images from the prompt.",
        defaults={"guidance_scale": 7.5},
    )  # fmt: skip
