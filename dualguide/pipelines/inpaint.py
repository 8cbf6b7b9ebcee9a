"""``StableDiffusionXLTPGInpaintPipeline``: diffusers' SDXL inpainting with dual guidance in one UNet call per step.

Every argument of ``StableDiffusionXLInpaintPipeline.__call__`` plus the guidance and sampler arguments
of ``StableDiffusionXLTPGPipeline``. 9-channel inpainting UNets get the mask and masked-image latents
appended to their input; 4-channel UNets get diffusers' per-step blend with the noised original.
Without ``sampler`` the loop is diffusers' own; with ``sampler`` any k-diffusion sampler runs, 4-channel
UNets through ``dualguide.workflows.InpaintModel``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import PIL.Image
import torch
from diffusers import StableDiffusionXLInpaintPipeline

from ..config import DEFAULT_PAG_LAYERS, DEFAULT_TPG_LAYERS
from ..layers import LayerSpec
from ..validation import check_number, check_pipeline_call, check_tensor, checked_call
from ..workflows import InpaintModel, keep_known
from .guided import GuidedSamplingMixin, seeds_from
from .img2img import ImageTaskMixin, IntervalLike, _is_latents, check_image, check_task_numbers, check_task_steps, pixel_size
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
    if pipe.unet.config.in_channels == 9 and masked is None and _is_latents(pipe, first):
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
        sigmas_k = self.task_sigmas(args)
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


class StableDiffusionXLTPGInpaintPipeline(InpaintMixin, GuidedSamplingMixin, StableDiffusionXLInpaintPipeline):
    """SDXL inpainting (4- or 9-channel UNets) with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    @checked_call(check_inpaint_call)
    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        prompt_2: Optional[Union[str, List[str]]] = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: Optional[torch.Tensor] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        padding_mask_crop: Optional[int] = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        denoising_start: Optional[float] = None,
        denoising_end: Optional[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        negative_prompt_2: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        ip_adapter_image: Optional[Any] = None,
        ip_adapter_image_embeds: Optional[List[torch.Tensor]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        original_size: Optional[Tuple[int, int]] = None,
        crops_coords_top_left: Tuple[int, int] = (0, 0),
        target_size: Optional[Tuple[int, int]] = None,
        negative_original_size: Optional[Tuple[int, int]] = None,
        negative_crops_coords_top_left: Tuple[int, int] = (0, 0),
        negative_target_size: Optional[Tuple[int, int]] = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[..., Dict[str, torch.Tensor]]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        # perturbation guidance
        tpg_scale: float = 3.0,
        tpg_applied_layers_index: LayerSpec = DEFAULT_TPG_LAYERS,
        pag_scale: Optional[float] = None,
        pag_applied_layers_index: LayerSpec = DEFAULT_PAG_LAYERS,
        # normalized attention guidance
        do_nag: Optional[bool] = None,
        nag_scale: Optional[float] = None,
        nag_tau: Optional[float] = None,
        nag_alpha: Optional[float] = None,
        nag_use_l1: Optional[bool] = None,
        nag_negative_prompt: Optional[Union[str, List[str]]] = None,
        nag_negative_prompt_embeds: Optional[torch.Tensor] = None,
        nag_end: Optional[float] = None,
        # guidance intervals (fractions of the schedule, or dualguide.Interval)
        cfg_interval: IntervalLike = None,
        tpg_interval: IntervalLike = None,
        pag_interval: IntervalLike = None,
        nag_interval: IntervalLike = None,
        # sampling
        sampler: Optional[Union[str, Callable]] = None,
        sigma_schedule: Optional[str] = None,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        max_batch_rows: Optional[int] = None,
        truncate_long_prompts: bool = False,
    ):
        r"""Repaint the white region of ``mask_image`` in ``image``, guided by the prompt.

        The SDXL arguments mean what they mean in ``StableDiffusionXLInpaintPipeline`` (``strength``
        0.9999, ``padding_mask_crop``, ``masked_image_latents``, ``denoising_start`` / ``denoising_end``);
        the guidance and sampler arguments are those of ``StableDiffusionXLTPGPipeline``.
        """
        args = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        return self.inpaint(args)
