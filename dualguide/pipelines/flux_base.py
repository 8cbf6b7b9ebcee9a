"""What the Flux.1 pipelines change in the shared guided runs: the transformer as the backbone, CLIP-pooled + T5
prompt encoding (``max_sequence_length``), true CFG (``true_cfg_scale`` with a negative prompt) as uncond rows of
the one call, the distilled ``guidance_scale`` as each row's guidance embedding, NAG's negative by the official
NAG Flux rule with its official settings (alpha 0.25, L2; ``nag_scale > 1`` turns it on, as there), Flux's sigmas
and dynamic shift, and its 2x2-packed latents at the pipeline's edges (the denoiser sees ``[B, 16, h, w]``).

The flow-matching parts (latent decode with the VAE's shift, the image tasks' noising, no extra step kwargs) are
SD3's (``SD3FamilyMixin``)."""

from __future__ import annotations

import math
import numbers
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..checks import is_number
from ..conditioning import Conditioning, encode_flux, encode_flux_nag_negative
from ..config import CFG, Interval
from ..families import FLUX
from ..families.flux import pack_latents, unpack_latents
from ..validation import check_pipeline_call
from .sd3_base import SD3FamilyMixin

logger = logging.get_logger(__name__)


def check_flux_call(pipe, args: Dict[str, Any]) -> Dict[str, Any]:
    """``check_pipeline_call`` with Flux's rules: NAG on when ``nag_scale > 1`` and ``do_nag`` is not given (the official
    NAG Flux pipeline has no ``do_nag``); T5's ``max_sequence_length`` at most 512; ``height`` and
    ``width`` rounded down to a multiple of ``size_multiple`` with a warning, as diffusers' Flux pipelines resize them."""
    args = dict(args)
    side = pipe.size_multiple
    for name in ("height", "width"):
        value = args.get(name)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > side and value % side:
            logger.warning(f"{name} has to be divisible by {side} but is {value}; it is resized to {value - value % side}")
            args[name] = int(value - value % side)
    if args["do_nag"] is None and args["nag_scale"] is not None and args["nag_scale"] > 1:
        args["do_nag"] = True
    check_negative_embeds_shape(pipe, args)
    return check_pipeline_call(pipe, args)


IP_ADAPTER_INPUTS = ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image", "negative_ip_adapter_image_embeds")


def check_negative_embeds_shape(pipe, args: Dict[str, Any]) -> None:
    """``negative_prompt_embeds`` of another shape than ``prompt_embeds``: refused with diffusers' Flux message when CFG
    uses them (their rows join the prompt's in the one call), dropped with their pooled embeds when neither CFG nor NAG
    does, as diffusers' Flux pipelines ignore a negative without true CFG (NAG reusing them is left to the shared check)."""
    embeds, negative = args.get("prompt_embeds"), args.get("negative_prompt_embeds")
    if not (isinstance(embeds, Tensor) and isinstance(negative, Tensor)) or embeds.shape == negative.shape:
        return
    scale = pipe.cfg_scale(args)
    if is_number(scale) and scale > 1:
        raise ValueError(
            f"prompt_embeds and negative_prompt_embeds must have the same shape when passed directly (CFG stacks their rows "
            f"in one transformer call), got {tuple(embeds.shape)} and {tuple(negative.shape)}"
        )
    nag_on = args["do_nag"] if args["do_nag"] is not None else pipe._nag_defaults.get("do_nag", False)
    if is_number(scale) and not nag_on:
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_attention_mask"):
            if name in args:
                args[name] = None


def official_nag_interval(nag_end: float) -> Interval:
    """The official NAG Flux rule for ``nag_end``: NAG guides the steps whose timestep ``t >= (1 - nag_end) * 1000``,
    i.e. whose flow time (the shifted sigma) is at least ``1 - nag_end`` (``nag_end`` 0 still guides the step at 1)."""
    if nag_end >= 1.0:
        return Interval(name="nag_interval")
    return Interval(sigma_low=math.nextafter(1.0 - nag_end, -math.inf), name="nag_interval")


class FluxFamilyMixin(SD3FamilyMixin):
    """Flux.1 parts of a guided pipeline; first in the pipeline's bases."""

    family = FLUX
    family_nag_defaults = {"nag_alpha": 0.25, "nag_use_l1": False}  # the official NAG Flux pipeline's
    guidance_scale_is_cfg = False  # the distilled guidance embedding, set once per run as in FluxPipeline; CFG is true_cfg_scale
    # diffusers' Flux names, plus the x0 prediction of the step: guided and per branch.
    _callback_tensor_inputs = ["latents", "prompt_embeds", "denoised", "denoised_uncond", "denoised_cond", "denoised_tpg", "denoised_pag"]

    @property
    def size_multiple(self) -> int:
        """Image sides are multiples of twice the VAE factor (latents packed in 2x2 patches)."""
        return self.vae_scale_factor * 2

    def packed_latents_shape(self, images: int, height: int, width: int) -> Tuple[Tuple[int, ...], str]:
        """The shape of the ``latents`` a call takes (packed, as ``FluxPipeline`` takes them), and its meaning."""
        side = self.size_multiple
        shape = (images, (height // side) * (width // side), self.transformer.config.in_channels)
        return shape, "(batch * num_images_per_prompt, (height // 16) * (width // 16), transformer in_channels): packed, as FluxPipeline takes them"

    def latent_shape(self, images: int, height: int, width: int) -> Tuple[int, ...]:
        """``[images, 16, h, w]``: Flux's unpacked latents, as its ``prepare_latents`` draws them before packing."""
        side = self.vae_scale_factor * 2
        return (images, self.transformer.config.in_channels // 4, 2 * (height // side), 2 * (width // side))

    def start_noise(self, shape: Tuple[int, ...], latents: Optional[Tensor], generator, device, dtype) -> Tensor:
        """The caller's ``latents`` (packed, as diffusers' Flux takes them, or unpacked), else drawn as diffusers draws them."""
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return unpack_latents(latents, *shape[-2:]) if latents.ndim == 3 else latents

    def scheduler_latents(self, shape: Tuple[int, ...], args: Dict[str, Any], dtype, device) -> Tensor:
        return self.start_noise(shape, args["latents"], args["generator"], device, dtype).to(device=device, dtype=dtype)

    def timestep_options(self, args: Dict[str, Any], shape: Tuple[int, ...]) -> Dict[str, Any]:
        """``mu`` from the image's token count and Flux's default sigmas ``linspace(1, 1 / steps, steps)`` (or the call's),
        which the scheduler shifts, as diffusers' Flux pipelines hand them to ``set_timesteps``."""
        config = self.scheduler.config
        tokens = (shape[-2] // 2) * (shape[-1] // 2)
        options: Dict[str, Any] = {"mu": calculate_shift(
            tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )}  # fmt: skip
        if args["timesteps"] is None:
            steps = args["num_inference_steps"]
            sigmas = np.linspace(1.0, 1 / steps, steps) if args["sigmas"] is None else args["sigmas"]
            options["sigmas"] = None if config.get("use_flow_sigmas", False) else sigmas
        return options

    def cfg_scale(self, args: Dict[str, Any]) -> float:
        """True CFG's scale: ``true_cfg_scale`` when a negative prompt is given (diffusers' rule), else 1 (off);
        ``guidance_scale`` is the distilled guidance embedding, not a term."""
        has_negative = args["negative_prompt"] is not None or args["negative_prompt_embeds"] is not None
        return args["true_cfg_scale"] if has_negative else 1.0

    def guidance_terms(self, args: Dict[str, Any]):
        """CFG at ``cfg_scale``; NAG's end by the official NAG Flux rule unless ``nag_interval`` is given; IP-Adapter
        inputs with PAG or NAG refused."""
        cfg, tpg, pag, nag = super().guidance_terms({**args, "guidance_scale": self.cfg_scale(args)})
        if args["nag_interval"] is None:
            defaults = {**self.family_nag_defaults, **self._nag_defaults}  # apply_nag's settings over the pipeline's
            end = args["nag_end"] if args["nag_end"] is not None else defaults.get("nag_end", 1.0)
            nag = replace(nag, interval=official_nag_interval(end))
        given = [name for name in IP_ADAPTER_INPUTS if args.get(name) is not None]
        if given and (pag.enabled or nag.enabled):
            raise ValueError(
                f"{given[0]} with {'PAG' if pag.enabled else 'NAG'} is not supported on Flux: their attention wrapper computes "
                f"diffusers' FluxAttnProcessor, which an IP-Adapter's processor replaces; use IP-Adapter with true CFG / TPG only"
            )
        return cfg, tpg, pag, nag

    def distilled_guidance(self, cond: Conditioning) -> Conditioning:
        """``cond`` with each row's guidance embedding input (``guidance_scale``) when the transformer has one (dev)."""
        if not self.transformer.config.guidance_embeds:
            return cond
        rows = cond.batch_size
        return replace(cond, guidance=torch.full((rows,), float(self._guidance_scale), dtype=torch.float32, device=cond.prompt_embeds.device))

    def encode_prompts(self, args: Dict[str, Any], cfg: CFG, device, lora_scale: Optional[float]) -> Tuple[Conditioning, Optional[Conditioning]]:
        positive, negative = encode_flux(
            self, args["prompt"], args["prompt_2"], args["negative_prompt"], args["negative_prompt_2"],
            num_images_per_prompt=args["num_images_per_prompt"], with_negative=cfg.enabled, device=device,
            lora_scale=lora_scale, max_sequence_length=args["max_sequence_length"], prompt_embeds=args["prompt_embeds"],
            pooled_prompt_embeds=args["pooled_prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
            negative_pooled_prompt_embeds=args["negative_pooled_prompt_embeds"],
        )  # fmt: skip
        return self.distilled_guidance(positive), None if negative is None else self.distilled_guidance(negative)

    def encode_nag_negative(self, args: Dict[str, Any], batch: int, negative: Optional[Conditioning], device, lora_scale) -> Conditioning:
        """The NAG negative text and its pooled embeds, one row per image (the official NAG Flux rule)."""
        embeds, pooled = encode_flux_nag_negative(
            self, batch, args["num_images_per_prompt"], self.nag_negative_source(args), args["nag_negative_prompt_2"],
            args["nag_negative_prompt_embeds"], args["nag_negative_pooled_prompt_embeds"], args["negative_prompt"],
            args["negative_prompt_2"], negative, device=device, lora_scale=lora_scale,
            max_sequence_length=args["max_sequence_length"],
        )  # fmt: skip
        return Conditioning(embeds, pooled)

    def ip_adapter_embeds(self, args: Dict[str, Any], cfg: CFG, batch: int, device) -> Optional[Tuple[List[Tensor], Optional[List[Tensor]]]]:
        """``FluxPipeline``'s IP-Adapter rule: positive and negative image (embeds) each, a black image standing in for
        a side not given; the negative's only with true CFG."""
        positive = (args["ip_adapter_image"], args["ip_adapter_image_embeds"])
        negative = (args["negative_ip_adapter_image"], args["negative_ip_adapter_image_embeds"])
        if all(value is None for value in (*positive, *negative)):
            return None
        black = [np.zeros((args["width"], args["height"], 3), dtype=np.uint8)] * self.transformer.encoder_hid_proj.num_ip_adapters
        images = batch * args["num_images_per_prompt"]

        def embeds(image, image_embeds) -> List[Tensor]:
            image = black if image is None and image_embeds is None else image
            return self.prepare_ip_adapter_image_embeds(image, image_embeds, device, images)

        return embeds(*positive), embeds(*negative) if cfg.enabled else None

    def set_call_state(self, args: Dict[str, Any]) -> None:
        """The per-call attributes diffusers' Flux pipelines keep."""
        self._guidance_scale = args["guidance_scale"]
        self._joint_attention_kwargs = args["joint_attention_kwargs"]
        self._current_timestep = None
        self._interrupt = False

    def decode(self, latents: Tensor, output_type: str):
        """SD3's decode (``latents / scaling_factor + shift_factor``); ``"latent"`` gives them packed, as diffusers' Flux."""
        if output_type == "latent":
            return pack_latents(latents)
        return super().decode(latents, output_type)

    def output(self, images, args: Dict[str, Any]):
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=images) if args["return_dict"] else (images,)
