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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from ..config import DEFAULT_PAG_LAYERS, DEFAULT_TPG_LAYERS
from ..control import ControlNetInput
from ..layers import LayerSpec
from ..validation import check_control_guidance, check_pipeline_call, checked_call, control_batch, control_images_per_net
from .guided import GuidedSamplingMixin
from .img2img import ImageTaskMixin, ImageToImageMixin, IntervalLike, check_image, check_task_numbers, check_task_steps, processed_size
from .inpaint import InpaintMixin, check_inpaint_call
from .parameters import ABSENT, with_absent
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


class StableDiffusionXLControlNetTPGPipeline(ControlNetMixin, TextToImageMixin, GuidedSamplingMixin, StableDiffusionXLControlNetPipeline):
    """SDXL ControlNet text-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    control_image_name = "image"

    @checked_call(partial(check_controlnet_call, image_name="image", size_name="image", task_check=check_pipeline_call))
    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        prompt_2: Optional[Union[str, List[str]]] = None,
        image: Any = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
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
        controlnet_conditioning_scale: Union[float, List[float]] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: Union[float, List[float]] = 0.0,
        control_guidance_end: Union[float, List[float]] = 1.0,
        original_size: Optional[Tuple[int, int]] = None,
        crops_coords_top_left: Tuple[int, int] = (0, 0),
        target_size: Optional[Tuple[int, int]] = None,
        negative_original_size: Optional[Tuple[int, int]] = None,
        negative_crops_coords_top_left: Tuple[int, int] = (0, 0),
        negative_target_size: Optional[Tuple[int, int]] = None,
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
        r"""Generate images that follow the control ``image`` (one per ControlNet for a ``MultiControlNetModel``).

        The SDXL and ControlNet arguments mean what they mean in ``StableDiffusionXLControlNetPipeline``
        (``height`` / ``width`` default to the control image's size); the guidance and sampler arguments
        are those of ``StableDiffusionXLTPGPipeline``. ``control_guidance_start`` / ``_end`` are fractions
        of the steps: following ``pipe.scheduler`` counted before ``denoising_end`` cuts the run, as
        diffusers counts them; with ``sampler``, of the sampler's steps.
        """
        return self.text_to_image(with_absent({name: value for name, value in locals().items() if name not in ("self", "__class__")}))


class StableDiffusionXLControlNetTPGImg2ImgPipeline(
    ControlNetMixin, ImageToImageMixin, GuidedSamplingMixin, StableDiffusionXLControlNetImg2ImgPipeline
):
    """SDXL ControlNet image-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    @checked_call(partial(check_controlnet_call, image_name="control_image", size_name="control_image", task_check=check_image_task))
    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        prompt_2: Optional[Union[str, List[str]]] = None,
        image: Any = None,
        control_image: Any = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
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
        controlnet_conditioning_scale: Union[float, List[float]] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: Union[float, List[float]] = 0.0,
        control_guidance_end: Union[float, List[float]] = 1.0,
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
        r"""Transform ``image`` guided by the prompt and by ``control_image`` (one per ControlNet).

        The SDXL and ControlNet arguments mean what they mean in ``StableDiffusionXLControlNetImg2ImgPipeline``
        (``strength`` 0.8, ``controlnet_conditioning_scale`` 0.8, ``height`` / ``width`` from the control
        image, to which ``image`` is resized); the guidance and sampler arguments are those of
        ``StableDiffusionXLTPGPipeline``.
        """
        return self.image_to_image(with_absent({name: value for name, value in locals().items() if name not in ("self", "__class__")}))


class StableDiffusionXLControlNetTPGInpaintPipeline(
    ControlNetMixin, InpaintMixin, GuidedSamplingMixin, ImageTaskTimeIds, StableDiffusionXLControlNetInpaintPipeline
):
    """SDXL ControlNet inpainting (4- or 9-channel UNets) with dual guidance in one UNet call per step;
    diffusers' PAG has no counterpart."""

    @checked_call(partial(check_controlnet_call, image_name="control_image", size_name="image", task_check=check_inpaint_call))
    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        prompt_2: Optional[Union[str, List[str]]] = None,
        image: Any = None,
        mask_image: Any = None,
        control_image: Any = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        padding_mask_crop: Optional[int] = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
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
        ip_adapter_image: Optional[Any] = None,
        ip_adapter_image_embeds: Optional[List[torch.Tensor]] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        controlnet_conditioning_scale: Union[float, List[float]] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: Union[float, List[float]] = 0.0,
        control_guidance_end: Union[float, List[float]] = 1.0,
        guidance_rescale: float = 0.0,
        original_size: Optional[Tuple[int, int]] = None,
        crops_coords_top_left: Tuple[int, int] = (0, 0),
        target_size: Optional[Tuple[int, int]] = None,
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
        r"""Repaint the white region of ``mask_image`` in ``image``, guided by the prompt and ``control_image``.

        The SDXL and ControlNet arguments mean what they mean in ``StableDiffusionXLControlNetInpaintPipeline``
        (``height`` / ``width`` default to the image's size; the control image is resized and cropped
        like it); the guidance and sampler arguments are those of ``StableDiffusionXLTPGPipeline``.
        """
        return self.inpaint(with_absent({name: value for name, value in locals().items() if name not in ("self", "__class__")}))
