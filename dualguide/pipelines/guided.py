"""What every guided pipeline shares: guidance terms from the call's arguments, the conditioning,
the seeds, the choice of sampling loop, the decode. Task pipelines are thin over ``GuidedSamplingMixin``;
its prompt encoding and decoding are SDXL's, which other families' mixins override (``sd_base``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from torch import Tensor

import samplers

from ..conditioning import Conditioning, encode_nag_negative, encode_sdxl
from ..config import CFG, NAG, PAG, TPG
from ..control import ControlNetInput
from ..denoiser import GuidedDenoiser
from ..families import SDXL
from ..validation import check_number, check_prompt
from .sampling import CALLBACK_TENSOR_INPUTS, GuidanceInputs, StepEvents, kdiffusion_loop, scheduler_levels, scheduler_loop
from .schedules import timesteps_until

NAG_DEFAULTS: Dict[str, Any] = {
    "do_nag": False, "nag_scale": 3.0, "nag_tau": 2.5, "nag_alpha": 0.5, "nag_use_l1": True,
    "nag_negative_prompt": None, "nag_end": 1.0,
}  # fmt: skip


@dataclass(frozen=True)
class SoftPAGSettings:
    beta: float
    heads: Optional[Tuple[int, ...]]


def apply_softpag(pipe, beta: float = 0.5, selected_heads: Optional[Sequence[int]] = None):
    """Make later calls of ``pipe`` use SoftPAG: ``(1-beta) A + beta I`` on ``selected_heads`` (all when None).

    ``pag_scale`` then defaults to 3.0. Returns ``pipe``.
    """
    settings = PAG(beta=beta, heads=selected_heads)  # validates beta and selected_heads
    pipe._softpag = SoftPAGSettings(settings.beta, settings.heads)
    return pipe


def apply_nag(
    pipe,
    nag_scale: float = 3.0,
    nag_tau: float = 2.5,
    nag_alpha: float = 0.5,
    nag_use_l1: bool = True,
    nag_negative_prompt: Optional[Union[str, List[str]]] = None,
    nag_end: float = 1.0,
):
    """Make later calls of ``pipe`` use NAG with these settings (``do_nag=True``); returns ``pipe``."""
    nag = NAG(scale=nag_scale, tau=nag_tau, alpha=nag_alpha, use_l1=nag_use_l1)  # validates
    pipe._nag_defaults = dict(
        do_nag=True,
        nag_scale=nag.scale,
        nag_tau=nag.tau,
        nag_alpha=nag.alpha,
        nag_use_l1=nag.use_l1,
        nag_negative_prompt=check_prompt(nag_negative_prompt, "nag_negative_prompt"),
        nag_end=check_number(nag_end, "nag_end", 0.0, 1.0),
    )
    return pipe


def seeds_from(generator) -> Union[int, List[int]]:
    """Seeds for TPG permutations and sampler noise, read from the caller's generator(s) without drawing
    from them (so a scheduler that uses the generator afterwards sees exactly diffusers' stream).

    One int for one generator (or the global RNG when None), one per generator for a list.
    """
    if isinstance(generator, (list, tuple)):
        return [seeds_from(g) for g in generator]
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    digest = hashlib.sha256(generator.get_state().cpu().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


class GuidedSamplingMixin:
    """Guidance arguments, conditioning, seeds, both sampling loops and decoding, for every task pipeline.

    ``family`` is the pipeline's model family adapter (SDXL here; other families' mixins set theirs)."""

    family = SDXL
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)
    _softpag: Optional[SoftPAGSettings] = None
    _nag_defaults: Dict[str, Any] = {}
    family_nag_defaults: Dict[str, Any] = {}  # a family's official NAG settings over SDXL's (Flux: alpha 0.25, L2)

    @property
    def backbone(self):
        """The denoising network: the UNet here; a transformer family's mixin returns its transformer."""
        return self.unet

    @property
    def guidance_embedding_dim(self) -> Optional[int]:
        """The guidance-scale embedding width of a guidance-distilled UNet (LCM: ``time_cond_proj_dim``), else None."""
        return getattr(self.backbone.config, "time_cond_proj_dim", None)

    @property
    def guidance_scale_is_cfg(self) -> bool:
        """Whether ``pipe._guidance_scale`` is the CFG scale, so that a ``callback_on_step_end`` changing it changes CFG's;
        not for a guidance-distilled backbone, which embeds it once per run (LCM), as in diffusers."""
        return self.guidance_embedding_dim is None

    def timestep_options(self, args: Dict[str, Any], shape: Tuple[int, ...]) -> Dict[str, Any]:
        """Extra ``set_timesteps`` arguments of the scheduler for latents of ``shape`` (none for UNet families)."""
        return {}

    def attention_kwargs(self, args: Dict[str, Any]) -> Optional[dict]:
        """The call's kwargs for the attention processors (``cross_attention_kwargs``; SD3: ``joint_attention_kwargs``)."""
        return args["cross_attention_kwargs"]

    def guidance_terms(self, args: Dict[str, Any]) -> Tuple[CFG, TPG, PAG, NAG]:
        """The four guidance terms of a call (arguments over ``apply_nag`` / ``apply_softpag`` settings)."""
        softpag = self._softpag
        pag_scale = args["pag_scale"]
        if pag_scale is None:
            pag_scale = 3.0 if softpag is not None else 0.0
        nag_settings = {**NAG_DEFAULTS, **self.family_nag_defaults, **self._nag_defaults}
        nag_settings.update({k: args[k] for k in NAG_DEFAULTS if args.get(k) is not None})
        nag_interval = args["nag_interval"] if args["nag_interval"] is not None else (0.0, nag_settings["nag_end"])
        # Guidance-distilled UNets (LCM) take the scale as an embedding instead of uncond rows, as in diffusers.
        cfg_scale = args["guidance_scale"] if self.guidance_embedding_dim is None else 1.0
        return (
            CFG(scale=cfg_scale, rescale=args["guidance_rescale"], interval=args["cfg_interval"]),
            TPG(scale=args["tpg_scale"], layers=args["tpg_applied_layers_index"], interval=args["tpg_interval"]),
            PAG(
                scale=pag_scale, layers=args["pag_applied_layers_index"], beta=softpag.beta if softpag else 1.0,
                heads=softpag.heads if softpag else None, interval=args["pag_interval"], adaptive_scale=args["pag_adaptive_scale"],
            ),  # fmt: skip
            NAG(
                scale=nag_settings["nag_scale"] if nag_settings["do_nag"] else 1.0, tau=nag_settings["nag_tau"],
                alpha=nag_settings["nag_alpha"], use_l1=nag_settings["nag_use_l1"], interval=nag_interval,
            ),  # fmt: skip
        )

    def nag_negative_source(self, args: Dict[str, Any]):
        """The NAG negative prompt in effect: the call's, else ``apply_nag``'s."""
        if args["nag_negative_prompt"] is not None:
            return args["nag_negative_prompt"]
        return self._nag_defaults.get("nag_negative_prompt")

    def encode_prompts(self, args: Dict[str, Any], cfg: CFG, device, lora_scale: Optional[float]) -> Tuple[Conditioning, Optional[Conditioning]]:
        """The positive and (with CFG) negative conditioning of the call's prompts: SDXL's here, long prompts
        window by window; other families' pipelines override it."""
        height, width = args["height"], args["width"]
        return encode_sdxl(
            self, args["prompt"], args["prompt_2"], args["negative_prompt"], args["negative_prompt_2"],
            num_images_per_prompt=args["num_images_per_prompt"], with_negative=cfg.enabled,
            size=args["original_size"] or (height, width), crop=args["crops_coords_top_left"],
            target=args["target_size"] or (height, width), negative_size=args["negative_original_size"],
            negative_crop=args["negative_crops_coords_top_left"], negative_target=args["negative_target_size"],
            device=device, lora_scale=lora_scale, clip_skip=args["clip_skip"], prompt_embeds=args["prompt_embeds"],
            pooled_prompt_embeds=args["pooled_prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
            negative_pooled_prompt_embeds=args["negative_pooled_prompt_embeds"],
            truncate_long_prompts=args["truncate_long_prompts"],
        )  # fmt: skip

    def encode_nag_negative(self, args: Dict[str, Any], batch: int, negative: Optional[Conditioning], device, lora_scale) -> Tensor:
        """The NAG negative's prompt embeds, one row per image (``negative``: the call's CFG negative, if any)."""
        return encode_nag_negative(
            self, batch, args["num_images_per_prompt"], self.nag_negative_source(args),
            args["nag_negative_prompt_embeds"], args["negative_prompt"], device=device, lora_scale=lora_scale,
            clip_skip=args["clip_skip"], truncate_long_prompts=args["truncate_long_prompts"],
        )  # fmt: skip

    def guidance_inputs(self, args: Dict[str, Any], cfg: CFG, nag: NAG, batch: int, device) -> GuidanceInputs:
        """Encode the prompts (``encode_prompts``), the NAG negative and the IP-Adapter image embeds."""
        lora_scale = (self.attention_kwargs(args) or {}).get("scale")
        positive, negative = self.encode_prompts(args, cfg, device, lora_scale)
        nag_negative = self.encode_nag_negative(args, batch, negative, device, lora_scale) if nag.enabled else None
        image_embeds = self.ip_adapter_embeds(args, cfg, batch, device)
        if image_embeds is not None:
            positive = positive.with_image_embeds(image_embeds[0])
            negative = None if negative is None else negative.with_image_embeds(image_embeds[1])
        return GuidanceInputs(positive.to(device), None if negative is None else negative.to(device), nag_negative)

    def ip_adapter_embeds(self, args: Dict[str, Any], cfg: CFG, batch: int, device) -> Optional[Tuple[List[Tensor], Optional[List[Tensor]]]]:
        """The IP-Adapter image embeds (one tensor per adapter) of the positive and (with CFG) the negative rows;
        None without IP-Adapter inputs."""
        if args["ip_adapter_image"] is None and args["ip_adapter_image_embeds"] is None:
            return None
        image_embeds = self.prepare_ip_adapter_image_embeds(
            args["ip_adapter_image"], args["ip_adapter_image_embeds"], device, batch * args["num_images_per_prompt"], cfg.enabled,
        )  # fmt: skip
        if not cfg.enabled:
            return image_embeds, None
        pairs = [embeds.chunk(2) for embeds in image_embeds]
        return [p for _, p in pairs], [n for n, _ in pairs]

    def task_control(self, args: Dict[str, Any], images: int, height: int, width: int, device, **preprocess) -> Optional[ControlNetInput]:
        """The call's ControlNet with its preprocessed image(s), one row per image; None without a ControlNet.

        ``preprocess``: ``crops_coords`` / ``resize_mode`` of the task's own image (inpainting's crop)."""
        return None

    def guided_denoiser(self, args: Dict[str, Any], terms, sigmas: Optional[Tensor], seeds, timestep_cond=None) -> GuidedDenoiser:
        cfg, tpg, pag, nag = terms
        return GuidedDenoiser(
            self.backbone, self.scheduler, cfg=cfg, tpg=tpg, pag=pag, nag=nag, sigmas=sigmas, seed=seeds,
            max_batch_rows=args["max_batch_rows"], cross_attention_kwargs=self.attention_kwargs(args),
            timestep_cond=timestep_cond, family=self.family, share_prefix=args["share_prefix"],
        )  # fmt: skip

    def step_events(self, args: Dict[str, Any], denoiser: GuidedDenoiser, inputs: GuidanceInputs, progress_bar) -> StepEvents:
        return StepEvents(
            self, denoiser, inputs, args["callback_on_step_end"], args["callback_on_step_end_tensor_inputs"], progress_bar
        )

    def guidance_timestep_cond(self, images: int, device, dtype) -> Optional[Tensor]:
        """The guidance-scale embedding of guidance-distilled UNets (``time_cond_proj_dim``), as diffusers."""
        if self.guidance_embedding_dim is None:
            return None
        scale = torch.tensor(self._guidance_scale - 1).repeat(images)
        return self.get_guidance_scale_embedding(scale, embedding_dim=self.guidance_embedding_dim).to(device=device, dtype=dtype)

    def set_call_state(self, args: Dict[str, Any]) -> None:
        """The per-call attributes diffusers' pipelines keep (read by callbacks: ``pipe._guidance_scale``...)."""
        self._guidance_scale = args["guidance_scale"]
        self._guidance_rescale = args["guidance_rescale"]
        self._clip_skip = args["clip_skip"]
        self._cross_attention_kwargs = args["cross_attention_kwargs"]
        self._denoising_end = args["denoising_end"]
        self._denoising_start = args.get("denoising_start")
        self._interrupt = False

    @staticmethod
    def prompt_batch(args: Dict[str, Any]) -> int:
        """Number of prompts of the call (``prompt`` or ``prompt_embeds``)."""
        prompt = args["prompt"]
        return (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else args["prompt_embeds"].shape[0]

    def scheduler_sample(self, args, terms, inputs: GuidanceInputs, latents: Tensor, timesteps: Tensor, begin_index: int, device, **loop_options) -> Tensor:
        """diffusers' loop from ``latents`` over ``timesteps`` (cut at ``denoising_end``), one guided call per step."""
        generator = args["generator"]
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, args["eta"])
        timesteps = timesteps_until(self.scheduler, timesteps, args["denoising_end"])
        timestep_cond = self.guidance_timestep_cond(latents.shape[0], device, latents.dtype)
        levels = scheduler_levels(self.scheduler, timesteps, begin_index)
        denoiser = self.guided_denoiser(args, terms, levels, seeds_from(generator), timestep_cond)
        self._last_denoiser = denoiser
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar, denoiser.hooks():
            events = self.step_events(args, denoiser, inputs, progress_bar)
            return scheduler_loop(
                self.scheduler, denoiser, latents, timesteps, inputs, events, extra_step_kwargs,
                begin_index=begin_index, **loop_options,
            )  # fmt: skip

    def kdiffusion_sample(
        self, args, terms, inputs: GuidanceInputs, x: Tensor, sigmas: Tensor, seeds, timestep_cond=None, wrap_model=None
    ) -> Tensor:
        """Run the k-diffusion sampler named by ``sampler`` (or the callable) over ``sigmas`` from ``x``.

        ``wrap_model(model)`` may wrap the k-diffusion model the sampler sees (inpainting's blend)."""
        sampler = args["sampler"]
        run = samplers.get(sampler) if isinstance(sampler, str) else sampler
        if wrap_model is not None:
            inner = run
            run = lambda model, *rest, **kwargs: inner(wrap_model(model), *rest, **kwargs)  # noqa: E731
        denoiser = self.guided_denoiser(args, terms, sigmas, seeds, timestep_cond)
        self._last_denoiser = denoiser
        steps = len(sigmas) - 1
        with self.progress_bar(total=steps) as progress_bar:
            events = self.step_events(args, denoiser, inputs, progress_bar)
            name = sampler if isinstance(sampler, str) else None
            return kdiffusion_loop(run, name, denoiser, x, sigmas.to(x.device), inputs, events, seeds)

    def output(self, images, args: Dict[str, Any]):
        """diffusers' return value for decoded ``images`` (offloaded models freed first)."""
        self.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=images) if args["return_dict"] else (images,)

    def decode(self, latents: Tensor, output_type: str):
        """VAE decode with diffusers' upcasting and latent (de)normalisation, then post-processing."""
        if output_type == "latent":
            return latents
        vae = self.vae
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:
            vae.to(dtype=torch.float32)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        latents = latents.to(vae.dtype)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents)
            std = torch.tensor(std).view(shape).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        try:
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if needs_upcasting:
                vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)

