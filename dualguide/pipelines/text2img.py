"""``StableDiffusionXLTPGPipeline``: diffusers' SDXL text-to-image with dual guidance in one UNet call per step.

It keeps ``StableDiffusionXLPipeline``'s loading, LoRA, textual inversion, IP-Adapter and offload
support and every argument of its ``__call__``, and adds TPG, PAG/SoftPAG and NAG next to CFG.
Without ``sampler`` it follows ``pipe.scheduler`` exactly as diffusers does; with ``sampler`` (a
k-diffusion name or callable) it runs that sampler on the guided x0 prediction.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ..config import DEFAULT_PAG_LAYERS, DEFAULT_TPG_LAYERS, Interval
from ..layers import LayerSpec
from ..validation import check_pipeline_call, checked_call
from .guided import GuidedSamplingMixin, seeds_from
from .sampling import Interrupted
from .schedules import kdiffusion_sigmas

IntervalLike = Optional[Union[Interval, Tuple[float, float]]]


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
        shape = (images, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        try:
            if args["sampler"] is None:
                latents = self._scheduler_sample(args, terms, inputs, shape, device)
            else:
                sigmas_k, init_noise_scale = kdiffusion_sigmas(self.scheduler, args)
                noise = latents if latents is not None else randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
                x = noise.to(device=device, dtype=torch.float32) * init_noise_scale
                timestep_cond = self.guidance_timestep_cond(images, device, x.dtype)
                latents = self.kdiffusion_sample(args, terms, inputs, x, sigmas_k, seeds_from(generator), timestep_cond)
        except Interrupted as stop:
            latents = stop.latents
        return self.output(self.decode(latents, args["output_type"]), args)

    def _scheduler_sample(self, args: Dict[str, Any], terms, inputs, shape, device) -> torch.Tensor:
        """diffusers' denoising loop over ``pipe.scheduler``, each step one guided UNet call."""
        timesteps, _ = retrieve_timesteps(self.scheduler, args["num_inference_steps"], device, args["timesteps"], args["sigmas"])
        dtype = inputs.cond.prompt_embeds.dtype
        latents = self.prepare_latents(*shape[:2], args["height"], args["width"], dtype, device, args["generator"], args["latents"])
        return self.scheduler_sample(args, terms, inputs, latents, timesteps, 0, device)


class StableDiffusionXLTPGPipeline(TextToImageMixin, GuidedSamplingMixin, StableDiffusionXLPipeline):
    """SDXL text-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    @checked_call(check_pipeline_call)
    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        prompt_2: Optional[Union[str, List[str]]] = None,
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
        guidance_rescale: float = 0.0,
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
        r"""Generate images; the SDXL arguments mean what they mean in ``StableDiffusionXLPipeline``.

        Dual guidance: ``tpg_scale`` (3.0; 0 turns TPG off) on ``tpg_applied_layers_index``
        ("d6-d23"), ``pag_scale`` (0, or 3.0 after ``apply_softpag``) on
        ``pag_applied_layers_index`` ("m0-m9"), and NAG with ``do_nag`` and ``nag_scale`` (3.0),
        ``nag_tau`` (2.5), ``nag_alpha`` (0.5), ``nag_use_l1`` (True), ``nag_negative_prompt``,
        ``nag_end`` (1.0). ``*_interval`` limit a term to ``(start, end)`` fractions of the
        schedule. Without ``sampler`` the loop follows ``pipe.scheduler`` as diffusers does; a
        k-diffusion sampler name or a callable ``(model, x, sigmas, extra_args, callback, disable,
        seed)`` runs that sampler instead, over ``sigma_schedule`` ("model", "karras",
        "exponential"), ``sigmas`` or ``timesteps``. ``max_batch_rows`` splits a step's rows over
        several UNet calls to save memory. Prompts longer than the tokenizer's window are encoded
        window by window unless ``truncate_long_prompts``.
        """
        args = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        return self.text_to_image(args)
