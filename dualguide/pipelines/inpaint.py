"""``StableDiffusionXLTPGInpaintPipeline``: diffusers' SDXL inpainting with dual guidance in one UNet call per step.

Every argument of ``StableDiffusionXLInpaintPipeline.__call__`` plus the guidance and sampler arguments
of ``StableDiffusionXLTPGPipeline``. 9-channel inpainting UNets get the mask and masked-image latents
appended to their input; 4-channel UNets get diffusers' per-step blend with the noised original.
Without ``sampler`` the loop is diffusers' own; with ``sampler`` any k-diffusion sampler runs, 4-channel
UNets through ``dualguide.workflows.InpaintModel``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import PIL.Image
import torch
from diffusers import StableDiffusionXLInpaintPipeline

from ..families import SDXL
from ..validation import check_number, check_pipeline_call, check_tensor
from ..workflows import InpaintModel, keep_known
from .guided import GuidedSamplingMixin, seeds_from
from .img2img import ImageTaskMixin, check_image, check_task_numbers, check_task_steps, is_latents, pixel_size
from .pag_layers import PAGLayersMixin
from .parameters import guided_call
from .sampling import Interrupted
from .schedules import timesteps_until


def check_inpaint_call(pipe, args: Dict[str, Any]) -> Dict[str, Any]:
    """``check_pipeline_call`` plus ``image``, ``mask_image`` (the image's size), ``masked_image_latents``,
    ``padding_mask_crop``, ``strength``, ``denoising_start`` / ``denoising_end``, aesthetic scores."""
    check_image(args["image"], "image")
    check_image(args["mask_image"], "mask_image")
    check_task_numbers(pipe, args)
    image_size = pixel_size(pipe, args["image"])
    mask_size = pixel_size(pipe, args["mask_image"], "mask_image")
    if mask_size != image_size:
        raise ValueError(f"mask_image must have the size of image {image_size} (height, width), got {mask_size}")
    latent_channels = pipe.vae.config.latent_channels
    masked = check_tensor(args["masked_image_latents"], "masked_image_latents", (None, latent_channels, None, None), "(batch, latent channels, h, w)")
    first = args["image"][0] if isinstance(args["image"], list) else args["image"]
    if pipe.unet.config.in_channels == 9 and masked is None and is_latents(pipe, first):
        raise ValueError("masked_image_latents must be given with image latents for a 9-channel inpainting UNet")
    crop = args["padding_mask_crop"]
    if crop is not None:
        args["padding_mask_crop"] = check_number(crop, "padding_mask_crop", 0, integer=True)
        for name in ("image", "mask_image"):
            if not isinstance(args[name], PIL.Image.Image):
                raise ValueError(f"padding_mask_crop needs {name} as one PIL image, got {type(args[name]).__name__}")
        if args["output_type"] != "pil":
            raise ValueError(f"padding_mask_crop needs output_type='pil', got {args['output_type']!r}")
    latents = args["latents"]
    checked = check_pipeline_call(pipe, {**args, "latents": None})
    factor = pipe.vae_scale_factor
    images = (1 if isinstance(checked["prompt"], str) else len(checked["prompt"])) if checked["prompt"] is not None else checked["prompt_embeds"].shape[0]
    shape = (images * checked["num_images_per_prompt"], latent_channels, checked["height"] // factor, checked["width"] // factor)
    checked["latents"] = check_tensor(latents, "latents", shape, "(batch * num_images_per_prompt, latent channels, height // vae_scale_factor, width // vae_scale_factor)")
    check_task_steps(pipe, checked)
    return checked


class InpaintMixin(ImageTaskMixin):
    """The inpainting run (4- and 9-channel UNets, both sampling loops, decoding), shared by the plain and
    the ControlNet pipelines."""

    def inpaint(self, args: Dict[str, Any]):
        """Repaint ``args["mask_image"]``'s white region of ``args["image"]`` from the checked arguments of a call."""
        terms = self.guidance_terms(args)
        self.set_call_state(args)
        device = self._execution_device
        batch = self.prompt_batch(args)
        images = batch * args["num_images_per_prompt"]
        image, mask_image, padding_mask_crop = args["image"], args["mask_image"], args["padding_mask_crop"]
        height, width, strength, generator = args["height"], args["width"], args["strength"], args["generator"]
        inputs = self.task_inputs(args, terms, batch, height, width, device)
        dtype = inputs.cond.prompt_embeds.dtype

        if padding_mask_crop is not None:
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        else:
            crops_coords, resize_mode = None, "default"
        original_image = image
        init_image = self.image_processor.preprocess(image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize_mode)
        init_image = init_image.to(dtype=torch.float32)
        mask = self.mask_processor.preprocess(mask_image, height=height, width=width, resize_mode=resize_mode, crops_coords=crops_coords)
        masked_image_latents = args["masked_image_latents"]
        if masked_image_latents is not None:
            masked_image = masked_image_latents
        elif init_image.shape[1] == 4:
            masked_image = None
        else:
            masked_image = init_image * (mask < 0.5)
        channels = self.vae.config.latent_channels
        nine_channels = self.unet.config.in_channels == 9
        if not nine_channels and self.unet.config.in_channels != 4:
            raise ValueError(f"the UNet must have 4 or 9 input channels, not {self.unet.config.in_channels}")
        inputs.control = self.task_control(args, images, height, width, device, crops_coords=crops_coords, resize_mode=resize_mode)
        add_noise = args["denoising_start"] is None
        try:
            if args["sampler"] is None:
                timesteps, _, begin_index = self.task_timesteps(args, device)
                latent_timestep = timesteps[:1].repeat(images)
                outputs = self.prepare_latents(
                    images, channels, height, width, dtype, device, generator, args["latents"], image=init_image,
                    timestep=latent_timestep, is_strength_max=strength == 1.0, return_noise=True,
                    return_image_latents=not nine_channels, **self.noise_options(add_noise),
                )  # fmt: skip
                latents, noise = outputs[:2]
                image_latents = outputs[2] if not nine_channels else None
                mask, masked_latents = self.prepare_mask_latents(mask, masked_image, images, height, width, dtype, device, generator, False)
                options = {}
                if nine_channels:
                    self._check_nine_channels(channels, mask, masked_latents)
                    extra = torch.cat([mask, masked_latents], dim=1)
                    options["model_input_channels"] = lambda model_input: extra
                else:
                    cut = self._timesteps_after_end(timesteps)

                    def blend(i: int, step_latents: torch.Tensor) -> torch.Tensor:  # diffusers' 4-channel blend
                        known = image_latents
                        if i < len(cut) - 1:
                            known = self.scheduler.add_noise(image_latents, noise, torch.tensor([cut[i + 1]]))
                        return keep_known(step_latents, known, mask)

                    options["after_step"] = blend
                latents = self.scheduler_sample(args, terms, inputs, latents, timesteps, begin_index, device, **options)
            else:
                latents = self._kdiffusion_inpaint(
                    args, terms, inputs, init_image, mask, masked_image, images, dtype, device, nine_channels
                )
        except Interrupted as stop:
            latents = stop.latents
        image = self.decode(latents, args["output_type"])
        if padding_mask_crop is not None:
            image = [self.image_processor.apply_overlay(mask_image, original_image, i, crops_coords) for i in image]
        return self.output(image, args)

    def _timesteps_after_end(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps_until(self.scheduler, timesteps, self._denoising_end)

    def _check_nine_channels(self, channels: int, mask: torch.Tensor, masked_latents: Optional[torch.Tensor]) -> None:
        total = channels + mask.shape[1] + (0 if masked_latents is None else masked_latents.shape[1])
        if masked_latents is None or total != self.unet.config.in_channels:
            raise ValueError(
                f"the UNet expects {self.unet.config.in_channels} input channels but latents, mask and masked image "
                f"latents give {total}; check mask_image, image and masked_image_latents"
            )

    def _kdiffusion_inpaint(self, args, terms, inputs, init_image, mask, masked_image, images, dtype, device, nine_channels):
        """The k-diffusion path: start at ``image_latents + noise * sigmas[0]`` (pure noise at strength 1),
        9-channel UNets get the mask channels, 4-channel ones the blend of ``InpaintModel``."""
        generator, height, width = args["generator"], args["height"], args["width"]
        sigmas_k = self.task_sigmas(args, (height // self.vae_scale_factor, width // self.vae_scale_factor))
        channels = self.vae.config.latent_channels
        _, noise, image_latents = self.prepare_latents(
            images, channels, height, width, dtype, device, generator, None, image=init_image, timestep=None,
            is_strength_max=True, return_noise=True, return_image_latents=True, **self.noise_options(False),
        )  # fmt: skip
        if args["latents"] is not None:
            noise = args["latents"].to(device=device, dtype=dtype)
        mask, masked_latents = self.prepare_mask_latents(mask, masked_image, images, height, width, dtype, device, generator, False)
        noise, image_latents = noise.float(), image_latents.float()
        if args["denoising_start"] is not None:
            x = image_latents
        elif args["strength"] == 1.0:
            x = noise * sigmas_k[0].to(device)
        else:
            x = image_latents + noise * sigmas_k[0].to(device)
        wrap = None
        if nine_channels:
            self._check_nine_channels(channels, mask, masked_latents)
            inputs.concat = torch.cat([mask, masked_latents], dim=1)
        else:
            wrap = lambda model: InpaintModel(model, image_latents, mask, noise)  # noqa: E731
        timestep_cond = self.guidance_timestep_cond(x.shape[0], device, x.dtype)
        return self.kdiffusion_sample(args, terms, inputs, x, sigmas_k, seeds_from(generator), timestep_cond, wrap_model=wrap)


class StableDiffusionXLTPGInpaintPipeline(InpaintMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionXLInpaintPipeline):
    """SDXL inpainting (4- or 9-channel UNets) with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    __call__ = guided_call(
        StableDiffusionXLInpaintPipeline, SDXL, check_inpaint_call, "inpaint",
        "Repaint the white region of ``mask_image`` in ``image``, guided by the prompt.",
    )  # fmt: skip
