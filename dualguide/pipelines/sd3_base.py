"""What the Stable Diffusion 3 / 3.5 pipelines change in the shared guided runs: the transformer as the backbone,
three text encoders (``encode_sd3``, ``max_sequence_length``), NAG's negative by the official SD3 rule, diffusers'
skip-layer guidance, flow-matching timesteps (``mu`` for dynamic shifting) and SD3's latent decoding."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from torch import Tensor

from ..conditioning import Conditioning, encode_sd3, encode_sd3_nag_negative
from ..config import CFG
from ..denoiser import GuidedDenoiser
from ..families import SD3
from .schedules import kdiffusion_sigmas
from .sd_base import vae_latents


class SkipLayerGuidance:
    """diffusers' SD3 skip-layer guidance around a guided denoiser (the scheduler loop): on the steps
    ``start * steps < i < stop * steps`` of a run with CFG, one more transformer call on the cond rows with
    ``layers`` skipped, and ``output += scale * (cond - skipped)``. Everything else is the denoiser's."""

    def __init__(self, denoiser: GuidedDenoiser, layers, scale: float, start: float, stop: float, steps: int, attention_kwargs) -> None:
        self.denoiser = denoiser
        self.layers, self.scale, self.window = list(layers), scale, (start * steps, stop * steps)
        self.attention_kwargs = attention_kwargs
        self.step = 0

    def __getattr__(self, name: str):
        return getattr(self.denoiser, name)

    def predict(self, model_input: Tensor, timestep: Tensor, cond: Conditioning, uncond=None, nag_negative=None, **kwargs) -> Tensor:
        output = self.denoiser.predict(model_input, timestep, cond, uncond, nag_negative, **kwargs)
        step, self.step = self.step, self.step + 1
        if not (self.denoiser.cfg.enabled and self.window[0] < step < self.window[1]):
            return output
        transformer = self.denoiser.unet
        skipped = transformer(
            hidden_states=model_input.to(self.denoiser.model_dtype),
            timestep=torch.as_tensor(timestep, device=model_input.device).reshape(-1).expand(model_input.shape[0]),
            encoder_hidden_states=cond.prompt_embeds.to(self.denoiser.model_dtype),
            pooled_projections=cond.pooled_embeds.to(self.denoiser.model_dtype),
            joint_attention_kwargs=None if self.attention_kwargs is None else dict(self.attention_kwargs),
            return_dict=False,
            skip_layers=self.layers,
        )[0]
        return output + (self.denoiser.last_outputs["cond"] - skipped.float()) * self.scale


class SD3FamilyMixin:
    """Stable Diffusion 3 / 3.5 parts of a guided pipeline; first in the pipeline's bases."""

    family = SD3
    # diffusers' SD3 names, plus the x0 prediction of the step: guided and per branch.
    _callback_tensor_inputs = [
        "latents", "prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds", "denoised",
        "denoised_uncond", "denoised_cond", "denoised_tpg", "denoised_pag",
    ]  # fmt: skip

    @property
    def backbone(self):
        return self.transformer

    @property
    def default_sample_size(self) -> int:
        """The transformer's sample size, which diffusers' SD3 ``__init__`` sets (the image tasks' mixin reads it)."""
        return self._default_sample_size

    @default_sample_size.setter
    def default_sample_size(self, value: int) -> None:
        self._default_sample_size = value

    def attention_kwargs(self, args: Dict[str, Any]) -> Optional[dict]:
        return args["joint_attention_kwargs"]

    def encode_prompts(self, args: Dict[str, Any], cfg: CFG, device, lora_scale: Optional[float]) -> Tuple[Conditioning, Optional[Conditioning]]:
        return encode_sd3(
            self, args["prompt"], args["prompt_2"], args["prompt_3"], args["negative_prompt"], args["negative_prompt_2"],
            args["negative_prompt_3"], num_images_per_prompt=args["num_images_per_prompt"], with_negative=cfg.enabled,
            device=device, lora_scale=lora_scale, clip_skip=args["clip_skip"], max_sequence_length=args["max_sequence_length"],
            prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
            pooled_prompt_embeds=args["pooled_prompt_embeds"], negative_pooled_prompt_embeds=args["negative_pooled_prompt_embeds"],
        )  # fmt: skip

    def encode_nag_negative(self, args: Dict[str, Any], batch: int, negative: Optional[Conditioning], device, lora_scale) -> Tensor:
        return encode_sd3_nag_negative(
            self, batch, args["num_images_per_prompt"], self.nag_negative_source(args), args["nag_negative_prompt_embeds"],
            args["negative_prompt"], None if negative is None else negative.prompt_embeds, device=device,
            lora_scale=lora_scale, clip_skip=args["clip_skip"], max_sequence_length=args["max_sequence_length"],
            negative_prompt_2=args["negative_prompt_2"], negative_prompt_3=args["negative_prompt_3"],
        )  # fmt: skip

    def timestep_options(self, args: Dict[str, Any], shape: Tuple[int, ...]) -> Dict[str, Any]:
        """``mu`` for a scheduler with dynamic shifting, from the image's token count (``shape`` ends in the latent
        height and width), as diffusers' SD3 pipelines."""
        config = self.scheduler.config
        if args["mu"] is not None:
            return {"mu": args["mu"]}
        if not config.get("use_dynamic_shifting", False):
            return {}
        if len(shape) < 2:
            raise ValueError("mu must be given for a scheduler with use_dynamic_shifting here")
        patch = self.transformer.config.patch_size
        tokens = (shape[-2] // patch) * (shape[-1] // patch)
        return {"mu": calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)}

    def task_inputs(self, args: Dict[str, Any], terms, batch: int, height: int, width: int, device):
        """The guidance inputs of an image task: SD3 rows carry no size conditioning."""
        return self.guidance_inputs(args, terms[0], terms[3], batch, device)

    def noise_options(self, add_noise: bool) -> Dict[str, bool]:
        """SD3's ``prepare_latents`` always adds noise."""
        return {}

    def image_latents(self, image: Tensor, batch: int, per_prompt: int, dtype, device, generator) -> Tensor:
        """The VAE latents of ``image`` without noise, as SD3's ``prepare_latents`` encodes them."""
        return vae_latents(self, image, batch, per_prompt, dtype, device, generator)

    @staticmethod
    def noised(latents: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """The flow-matching start at flow time ``sigma``: ``(1 - sigma) latents + sigma noise``."""
        return torch.lerp(latents, noise, sigma)

    def task_sigmas(self, args: Dict[str, Any], latent_shape: Tuple[int, ...]) -> Tensor:
        """k-diffusion sigmas from the step SD3's ``get_timesteps`` starts at for ``strength``."""
        sigmas, _ = kdiffusion_sigmas(self.scheduler, args, self.timestep_options(args, latent_shape))
        steps = len(sigmas) - 1
        return sigmas[int(max(steps - steps * args["strength"], 0)) :]

    def prepare_extra_step_kwargs(self, generator, eta) -> Dict[str, Any]:
        """diffusers' SD3 pipelines pass nothing extra to ``scheduler.step``."""
        return {}

    def guided_denoiser(self, args: Dict[str, Any], terms, sigmas: Optional[Tensor], seeds, timestep_cond=None):
        denoiser = super().guided_denoiser(args, terms, sigmas, seeds, timestep_cond)
        layers = args["skip_guidance_layers"]
        if layers is None or args["sampler"] is not None:
            return denoiser
        return SkipLayerGuidance(
            denoiser, layers, args["skip_layer_guidance_scale"], args["skip_layer_guidance_start"],
            args["skip_layer_guidance_stop"], args["num_inference_steps"], self.attention_kwargs(args),
        )  # fmt: skip

    def set_call_state(self, args: Dict[str, Any]) -> None:
        """The per-call attributes diffusers' SD3 pipelines keep."""
        self._guidance_scale = args["guidance_scale"]
        self._skip_layer_guidance_scale = args.get("skip_layer_guidance_scale")
        self._clip_skip = args["clip_skip"]
        self._joint_attention_kwargs = args["joint_attention_kwargs"]
        self._interrupt = False

    def decode(self, latents: Tensor, output_type: str):
        """SD3's VAE decode: ``latents / scaling_factor + shift_factor``, then post-processing."""
        if output_type == "latent":
            return latents
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    def output(self, images, args: Dict[str, Any]):
        self.maybe_free_model_hooks()
        return StableDiffusion3PipelineOutput(images=images) if args["return_dict"] else (images,)
