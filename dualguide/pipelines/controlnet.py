"""SDXL ControlNet pipelines with dual guidance: text-to-image, image-to-image and inpainting.

Each subclasses diffusers' SDXL ControlNet pipeline of its task, takes exactly its arguments plus the
guidance and sampler arguments of ``StableDiffusionXLTPGPipeline``, and runs the task's shared guided
run (``TextToImageMixin``, ``ImageToImageMixin``, ``InpaintMixin``). ``ControlNetMixin`` adds the
ControlNet (one ``ControlNetModel`` or a ``MultiControlNetModel``): its image is preprocessed once per
call and the GuidedDenoiser runs it on the uncond and cond rows only; the perturbed rows (TPG, PAG)
reuse the cond rows' residuals (``dualguide.control``).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Callable, Dict

import torch
from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLControlNetPipeline, StableDiffusionXLImg2ImgPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from ..control import ControlNetInput
from ..families import SDXL
from ..validation import check_control_guidance, check_pipeline_call, control_batch, control_images_per_net
from .guided import GuidedSamplingMixin
from .img2img import ImageTaskMixin, ImageToImageMixin, check_image, check_task_numbers, check_task_steps, processed_size
from .inpaint import InpaintMixin, check_inpaint_call
from .pag_layers import PAGLayersMixin
from .parameters import ABSENT, guided_call, with_absent
from .sampling import scheduler_levels
from .text2img import TextToImageMixin


def _unwrapped(controlnet):
    return getattr(controlnet, "_orig_mod", controlnet)  # torch.compile'd


def controlnet_count(controlnet) -> int:
    """How many ControlNets ``controlnet`` holds (a ``MultiControlNetModel`` several, else one)."""
    net = _unwrapped(controlnet)
    return len(net.nets) if isinstance(net, MultiControlNetModel) else 1


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_image_task(pipe, args: Dict[str, Any]) -> Dict[str, Any]:
    """The image-to-image checks at the size the control image sets: ``image``, ``strength``, then every
    argument of the call."""
    check_image(args["image"], "image")
    check_task_numbers(pipe, args)
    checked = check_pipeline_call(pipe, args)
    check_task_steps(pipe, checked)
    return checked


def check_controlnet_call(
    pipe, args: Dict[str, Any], image_name: str, size_name: str, task_check: Callable[[Any, Dict[str, Any]], Dict[str, Any]]
) -> Dict[str, Any]:
    """The control image(s) in ``image_name`` (one per ControlNet, each a PIL image / array / tensor or a
    list of one per prompt), the ControlNet numbers, then ``task_check``. ``height`` / ``width`` left None
    take the size of ``size_name`` (rounded down to the VAE factor), as diffusers' ControlNet pipelines do."""
    nets = controlnet_count(pipe.controlnet)
    per_net = control_images_per_net(args[image_name], image_name, nets)
    for item in per_net:
        check_image(item, image_name)
    check_control_guidance(args, nets)
    sized = per_net[0] if size_name == image_name else check_image(args[size_name], size_name)
    height, width = processed_size(pipe, sized)
    args["height"] = height if args["height"] is None else args["height"]
    args["width"] = width if args["width"] is None else args["width"]
    absent = ABSENT.keys() - args.keys()
    checked = task_check(pipe, with_absent(args))
    batch = GuidedSamplingMixin.prompt_batch(checked)
    for item in per_net:
        if control_batch(item) not in (1, batch):
            raise ValueError(f"{image_name} holds {control_batch(item)} images for {batch} prompt(s); give one, or one per prompt")
    return {name: value for name, value in checked.items() if name not in absent}


# --------------------------------------------------------------------------------------------
# The ControlNet part of every task
# --------------------------------------------------------------------------------------------


class ControlNetMixin:
    """The call's ControlNet input for the shared guided runs (``task_control``)."""

    control_image_name = "control_image"  # the argument that holds the control image(s)
    default_sample_size = ImageTaskMixin.default_sample_size  # diffusers' ControlNet pipelines lack it

    def task_control(self, args: Dict[str, Any], images: int, height: int, width: int, device, **preprocess) -> ControlNetInput:
        """``pipe.controlnet`` with its image(s) at ``height`` x ``width``, one row per image, and the call's
        scale, window and guess mode (always on for ControlNets trained with global pooling, as diffusers'
        text-to-image and image-to-image pipelines have it)."""
        net = _unwrapped(self.controlnet)
        multi = isinstance(net, MultiControlNetModel)
        given = args[self.control_image_name]
        prepared = [self._control_pixels(item, images, height, width, device, **preprocess) for item in (given if multi else [given])]
        pooled = (net.nets[0] if multi else net).config.global_pool_conditions
        return ControlNetInput(
            self.controlnet, prepared if multi else prepared[0], scale=args["controlnet_conditioning_scale"],
            start=args["control_guidance_start"], end=args["control_guidance_end"], guess_mode=args["guess_mode"] or pooled,
        )  # fmt: skip

    def _control_pixels(self, image, images: int, height: int, width: int, device, **preprocess) -> torch.Tensor:
        pixels = self.control_image_processor.preprocess(image, height=height, width=width, **preprocess).to(torch.float32)
        pixels = pixels.repeat_interleave(images // pixels.shape[0], dim=0)  # one, or one per prompt
        return pixels.to(device=device, dtype=self.controlnet.dtype)

    def scheduler_sample(self, args, terms, inputs, latents, timesteps, begin_index, device, **loop_options):
        """diffusers' loop; the control windows count the steps before ``denoising_end`` cuts the run, as diffusers'."""
        steps = len(scheduler_levels(self.scheduler, timesteps, begin_index)) - 1
        inputs.control = replace(inputs.control, steps=steps)
        return super().scheduler_sample(args, terms, inputs, latents, timesteps, begin_index, device, **loop_options)


class ImageTaskTimeIds:
    """SDXL image tasks' time ids with negative sizes: diffusers' ControlNet inpainting takes none, its
    image-to-image pipeline (whose form ``ImageTaskMixin`` calls) does."""

    _get_add_time_ids = StableDiffusionXLImg2ImgPipeline._get_add_time_ids


# --------------------------------------------------------------------------------------------
# The pipelines
# --------------------------------------------------------------------------------------------


class StableDiffusionXLControlNetTPGPipeline(ControlNetMixin, TextToImageMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionXLControlNetPipeline):
    """SDXL ControlNet text-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    control_image_name = "image"

    __call__ = guided_call(
        StableDiffusionXLControlNetPipeline, SDXL,
        partial(check_controlnet_call, image_name="image", size_name="image", task_check=check_pipeline_call), "text_to_image",
        "Generate images that follow the control ``image`` (one per ControlNet for a ``MultiControlNetModel``; "
        "``height`` / ``width`` default to its size).",
        defaults={"guidance_scale": 7.5},
    )  # fmt: skip


class StableDiffusionXLControlNetTPGImg2ImgPipeline(
    ControlNetMixin, ImageToImageMixin, PAGLayersMixin, GuidedSamplingMixin, StableDiffusionXLControlNetImg2ImgPipeline
):
    """SDXL ControlNet image-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    __call__ = guided_call(
        StableDiffusionXLControlNetImg2ImgPipeline, SDXL,
        partial(check_controlnet_call, image_name="control_image", size_name="control_image", task_check=check_image_task),
        "image_to_image", "Transform ``image`` guided by the prompt and by ``control_image`` (one per ControlNet; "
        "``height`` / ``width`` from the control image, to which ``image`` is resized).",
        defaults={"guidance_scale": 7.5},
    )  # fmt: skip


class StableDiffusionXLControlNetTPGInpaintPipeline(
    ControlNetMixin, InpaintMixin, PAGLayersMixin, GuidedSamplingMixin, ImageTaskTimeIds, StableDiffusionXLControlNetInpaintPipeline
):
    """SDXL ControlNet inpainting (4- or 9-channel UNets) with dual guidance in one UNet call per step;
    diffusers' PAG has no counterpart."""

    __call__ = guided_call(
        StableDiffusionXLControlNetInpaintPipeline, SDXL,
        partial(check_controlnet_call, image_name="control_image", size_name="image", task_check=check_inpaint_call),
        "inpaint", "Repaint the white region of ``mask_image`` in ``image``, guided by the prompt and ``control_image`` "
        "(resized and cropped like the image).",
        defaults={"guidance_scale": 7.5},
    )  # fmt: skip
