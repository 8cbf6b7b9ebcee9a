"""``StableDiffusionXLTPGImg2ImgPipeline``: diffusers' SDXL image-to-image (and refiner) with dual guidance.

Every argument of ``StableDiffusionXLImg2ImgPipeline.__call__`` (``strength``, ``denoising_start``
for a refiner hand-off, aesthetic scores), plus the guidance and sampler arguments of
``StableDiffusionXLTPGPipeline``. Without ``sampler`` it follows diffusers' loop over ``pipe.scheduler``
exactly, each step one guided UNet call; with ``sampler`` a k-diffusion sampler runs over the
schedule cut at ``strength`` (``dualguide.workflows``).
"""

from __future__ import annotations

import numbers
from dataclasses import replace
from typing import Any, Dict, Tuple

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ..families import SDXL
from ..validation import check_number, check_pipeline_call, check_tensor
from ..workflows import sigmas_from, sigmas_until, strength_sigmas
from .guided import GuidedSamplingMixin, seeds_from
from .pag_layers import PAGLayersMixin
from .parameters import guided_call
from .sampling import Interrupted
from .schedules import kdiffusion_sigmas

IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor)


# --------------------------------------------------------------------------------------------
# Checks shared by the image-conditioned pipelines
# --------------------------------------------------------------------------------------------


def check_image(value: Any, name: str, optional: bool = False):
    """A PIL image, numpy array or tensor, or a non-empty list of them (all of one kind); returns it."""
    if value is None and optional:
        return None
    valid = f"a PIL image, a numpy array, a torch.Tensor or a non-empty list of them{' or None' if optional else ''}"
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"{name} must be {valid}, got an empty list")
    for item in items:
        if not isinstance(item, IMAGE_TYPES):
            raise TypeError(f"{name} must be {valid}, got {type(item).__name__}")
    if len({type(item) for item in items}) > 1:
        raise TypeError(f"{name}: a list must hold images of one kind, got {sorted({type(i).__name__ for i in items})}")
    for item in items:
        if isinstance(item, torch.Tensor):
            check_tensor(item, name, optional=False)
        elif isinstance(item, np.ndarray):
            if item.dtype.kind == "f" and not np.isfinite(item).all():
                raise ValueError(f"{name} holds NaN or infinite values")
        if min(_raw_size(item, name, False)) < 1:
            raise ValueError(f"{name} is empty (size {_raw_size(item, name, False)})")
    return value


def _raw_size(item, name: str, mask: bool) -> Tuple[int, int]:
    """``(height, width)`` of one image as given (latents: their own size)."""
    if isinstance(item, PIL.Image.Image):
        return item.height, item.width
    shape = tuple(item.shape)
    if isinstance(item, np.ndarray):  # HW, HWC, BHW(mask), BHWC
        if len(shape) == 2:
            return shape
        if len(shape) == 3:
            return shape[1:] if (mask and shape[-1] not in (1, 3, 4)) else shape[:2]
        if len(shape) == 4:
            return shape[1:3]
    elif len(shape) in (2, 3, 4):  # tensors: ..., H, W
        return shape[-2:]
    raise ValueError(f"{name} must be a 2-D, 3-D or 4-D image array, got shape {shape}")


def is_latents(pipe, item) -> bool:
    return isinstance(item, torch.Tensor) and item.ndim == 4 and item.shape[1] == pipe.vae.config.latent_channels


def pixel_size(pipe, image, name: str = "image") -> Tuple[int, int]:
    """``(height, width)`` in pixels of ``image`` (its first image; latents times the VAE factor)."""
    first = image[0] if isinstance(image, list) else image
    height, width = _raw_size(first, name, False)
    if is_latents(pipe, first):
        return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor
    return height, width


def processed_size(pipe, image) -> Tuple[int, int]:
    """The ``(height, width)`` diffusers' ``image_processor.preprocess(image)`` gives (sides rounded down to the VAE factor)."""
    first = image[0] if isinstance(image, list) else image
    if is_latents(pipe, first):
        return pixel_size(pipe, image)
    factor = pipe.vae_scale_factor
    height, width = _raw_size(first, "image", False)
    return height - height % factor, width - width % factor


def check_task_numbers(pipe, args: Dict[str, Any]) -> None:
    """``strength``, ``denoising_start`` (before ``denoising_end``), the aesthetic scores."""
    args["strength"] = check_number(args["strength"], "strength", 0.0, 1.0, low_open=True)
    args["denoising_start"] = check_number(
        args["denoising_start"], "denoising_start", 0.0, 1.0, low_open=True, high_open=True, optional=True
    )
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if name in args:
            args[name] = check_number(args[name], name)
    start, end = args["denoising_start"], args.get("denoising_end")
    if end is not None and not isinstance(end, bool) and isinstance(end, numbers.Real):
        end = float(end)
        if start is not None and 0 < end < 1 and start >= end:
            raise ValueError(f"denoising_start ({start:g}) must be below denoising_end ({end:g})")


def check_task_steps(pipe, args: Dict[str, Any]) -> None:
    """At least one step left after ``strength`` cuts the schedule (diffusers fails later, or loops zero times)."""
    if args["denoising_start"] is not None:
        return
    steps = args["num_inference_steps"]  # set from custom timesteps / sigmas by check_pipeline_call
    if int(steps * args["strength"]) < 1:
        raise ValueError(
            f"strength ({args['strength']:g}) * num_inference_steps ({steps}) leaves no step: "
            "raise strength or num_inference_steps"
        )


def check_img2img_call(pipe, args: Dict[str, Any]) -> Dict[str, Any]:
    """``check_pipeline_call`` plus ``image``, ``strength``, ``denoising_start`` / ``denoising_end`` and
    the aesthetic scores; the starting ``latents`` are checked against the image's latent shape."""
    check_image(args["image"], "image")
    check_task_numbers(pipe, args)
    latents = args["latents"]
    height, width = processed_size(pipe, args["image"])
    if latents is not None:
        check_tensor(latents, "latents", (None, pipe.vae.config.latent_channels, None, None), "(batch, latent channels, h, w)", optional=False)
        height, width = latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least {pipe.vae_scale_factor} pixels on each side, got {pixel_size(pipe, args['image'])}")
    checked = check_pipeline_call(pipe, {**args, "height": height, "width": width, "latents": None})
    checked.pop("height"), checked.pop("width")
    checked["latents"] = latents
    check_task_steps(pipe, checked)
    return checked


# --------------------------------------------------------------------------------------------
# What the image-conditioned pipelines share
# --------------------------------------------------------------------------------------------


class ImageTaskMixin:
    """SDXL image-task glue: diffusers' img2img/inpaint time ids (aesthetic scores) and sigma cuts."""

    @property
    def default_sample_size(self) -> int:
        """The UNet's sample size (diffusers' inpainting default for ``height`` / ``width``, in latents)."""
        unet = getattr(self, "unet", None)
        return unet.config.sample_size if unet is not None else 128

    def _get_add_time_ids(
        self, original_size, crops_coords_top_left, target_size, aesthetic_score=None, negative_aesthetic_score=None,
        negative_original_size=None, negative_crops_coords_top_left=None, negative_target_size=None, dtype=None,
        text_encoder_projection_dim=None,
    ):  # fmt: skip
        """diffusers' image-task form (a positive and a negative pair); ``dualguide.conditioning`` asks with the
        text-to-image form (no aesthetic score) and gets the positive ids, which ``task_inputs`` then replaces."""
        if aesthetic_score is None:
            ids, _ = super()._get_add_time_ids(
                original_size, crops_coords_top_left, target_size, 6.0, 2.5, original_size, crops_coords_top_left,
                target_size, dtype=dtype, text_encoder_projection_dim=text_encoder_projection_dim,
            )  # fmt: skip
            return ids
        return super()._get_add_time_ids(
            original_size, crops_coords_top_left, target_size, aesthetic_score, negative_aesthetic_score,
            negative_original_size, negative_crops_coords_top_left, negative_target_size, dtype=dtype,
            text_encoder_projection_dim=text_encoder_projection_dim,
        )  # fmt: skip

    def task_inputs(self, args: Dict[str, Any], terms, batch: int, height: int, width: int, device):
        """The guidance inputs with diffusers' image-task time ids (aesthetic scores, its negative ids)."""
        inputs = self.guidance_inputs({**args, "height": height, "width": width}, terms[0], terms[3], batch, device)
        cond = inputs.cond
        original_size = args["original_size"] or (height, width)
        target_size = args["target_size"] or (height, width)
        projection_dim = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(cond.pooled_embeds.shape[-1])
        ids, negative_ids = self._get_add_time_ids(
            original_size, args["crops_coords_top_left"], target_size, args["aesthetic_score"],
            args["negative_aesthetic_score"], args["negative_original_size"] or original_size,
            args["negative_crops_coords_top_left"], args["negative_target_size"] or target_size,
            dtype=cond.prompt_embeds.dtype, text_encoder_projection_dim=projection_dim,
        )  # fmt: skip
        rows = cond.batch_size
        inputs.cond = replace(cond, time_ids=ids.to(device).repeat(rows, 1))
        if inputs.uncond is not None:
            inputs.uncond = replace(inputs.uncond, time_ids=negative_ids.to(device).repeat(rows, 1))
        return inputs

    def noise_options(self, add_noise: bool) -> Dict[str, bool]:
        """``prepare_latents``' noise switch (SDXL's ``add_noise``: off from ``denoising_start``)."""
        return {"add_noise": add_noise}

    def start_latents(self, image: torch.Tensor, timestep: torch.Tensor, batch: int, per_prompt: int, dtype, device, generator,
                      add_noise: bool) -> torch.Tensor:  # fmt: skip
        """The scheduler loop's first latents: ``image`` encoded and noised to ``timestep`` by diffusers' ``prepare_latents``."""
        return self.prepare_latents(image, timestep, batch, per_prompt, dtype, device, generator, **self.noise_options(add_noise))

    def image_latents(self, image: torch.Tensor, batch: int, per_prompt: int, dtype, device, generator) -> torch.Tensor:
        """The VAE latents of the preprocessed ``image``, one row per image of the call, without noise."""
        return self.prepare_latents(image, None, batch, per_prompt, dtype, device, generator, add_noise=False)

    @staticmethod
    def noised(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The k-diffusion start at ``sigma``: ``latents + sigma * noise`` (a flow family: ``(1 - t) latents + t noise``)."""
        return latents + noise * sigma

    def task_sigmas(self, args: Dict[str, Any], latent_shape: Tuple[int, ...]) -> torch.Tensor:
        """k-diffusion sigmas cut at ``strength`` (or from ``denoising_start``), then at ``denoising_end``."""
        options = self.timestep_options(args, latent_shape)
        sigmas, _ = kdiffusion_sigmas(self.scheduler, {**args, "denoising_end": None}, options)
        if args["denoising_start"] is not None:
            sigmas = sigmas_from(sigmas, self.scheduler, args["denoising_start"])
        else:
            sigmas = strength_sigmas(sigmas, args["strength"])
        return sigmas_until(sigmas, self.scheduler, args["denoising_end"])

    def task_timesteps(self, args: Dict[str, Any], device, latent_shape: Tuple[int, ...] = ()):
        """diffusers' timesteps: ``retrieve_timesteps`` then ``get_timesteps`` (strength / denoising_start)."""
        options = {"sigmas": args["sigmas"], **self.timestep_options(args, latent_shape)}  # a family's options may carry sigmas (Flux's)
        timesteps, steps = retrieve_timesteps(self.scheduler, args["num_inference_steps"], device, args["timesteps"], **options)
        start = {} if args["denoising_start"] is None else {"denoising_start": args["denoising_start"]}  # not every task takes it
        timesteps, steps = self.get_timesteps(steps, args["strength"], device, **start)
        begin_index = getattr(self.scheduler, "begin_index", None) or 0
        return timesteps, steps, begin_index


class ImageToImageMixin(ImageTaskMixin):
    """The image-to-image run (both sampling loops, decoding), shared by the plain and the ControlNet pipelines."""

    def image_to_image(self, args: Dict[str, Any]):
        """Transform ``args["image"]`` from the checked arguments of a call (diffusers' output)."""
        terms = self.guidance_terms(args)
        self.set_call_state(args)
        device = self._execution_device
        batch = self.prompt_batch(args)
        images = batch * args["num_images_per_prompt"]
        generator, latents = args["generator"], args["latents"]
        init_image = self.image_processor.preprocess(args["image"], height=args.get("height"), width=args.get("width"))
        if latents is not None:
            height, width = latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor
        else:
            height, width = init_image.shape[-2], init_image.shape[-1]
            if init_image.shape[1] == self.vae.config.latent_channels:
                height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        inputs = self.task_inputs(args, terms, batch, height, width, device)
        inputs.control = self.task_control(args, images, height, width, device)
        dtype = inputs.cond.prompt_embeds.dtype
        add_noise = args["denoising_start"] is None
        latent_shape = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        try:
            if args["sampler"] is None:
                timesteps, _, begin_index = self.task_timesteps(args, device, latent_shape)
                if latents is None:
                    latents = self.start_latents(
                        init_image, timesteps[:1].repeat(images), batch, args["num_images_per_prompt"], dtype, device, generator, add_noise
                    )  # fmt: skip
                latents = self.scheduler_sample(args, terms, inputs, latents, timesteps, begin_index, device)
            else:
                sigmas_k = self.task_sigmas(args, latent_shape)
                if latents is None:
                    init_latents = self.image_latents(init_image, batch, args["num_images_per_prompt"], dtype, device, generator)
                    x = init_latents.float()
                    if add_noise:
                        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
                        x = self.noised(x, noise.float(), sigmas_k[0].to(device))
                else:
                    x = latents.to(device=device, dtype=torch.float32)
                timestep_cond = self.guidance_timestep_cond(x.shape[0], device, x.dtype)
                latents = self.kdiffusion_sample(args, terms, inputs, x, sigmas_k, seeds_from(generator), timestep_cond)
        except Interrupted as stop:
            latents = stop.latents
        return self.output(self.decode(latents, args["output_type"]), args)


class StableDiffusionXLTPGImg2ImgPipeline(ImageToImageMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image / refiner with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    __call__ = guided_call(
        StableDiffusionXLImg2ImgPipeline, SDXL, check_img2img_call, "image_to_image",
        "Transform ``image`` (PIL / array / tensor, or latents of a base model for a refiner) guided by the prompt.",
        defaults={"guidance_scale": 7.5},
    )  # fmt: skip
