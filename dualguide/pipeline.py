"""``StableDiffusionXLTPGPipeline``: a diffusers SDXL pipeline that samples through ``GuidedDenoiser``.

It keeps diffusers' ``StableDiffusionXLPipeline`` loading, LoRA, textual inversion and
offload support, and adds TPG, PAG/SoftPAG and NAG next to CFG, any k-diffusion sampler
and sigma schedule. With ``sampler="euler"``, ``sigma_schedule="model"`` and no extra
guidance it reproduces ``StableDiffusionXLPipeline`` with ``EulerDiscreteScheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

import samplers

from .conditioning import encode_nag_negative, encode_sdxl, prompt_batch_size
from .config import CFG, DEFAULT_PAG_LAYERS, DEFAULT_TPG_LAYERS, NAG, PAG, TPG, Interval
from .denoiser import GuidedDenoiser
from .layers import LayerSpec


@dataclass(frozen=True)
class _SoftPAGSettings:
    beta: float
    heads: Optional[Tuple[int, ...]]


class _Interrupted(Exception):
    """Raised from the step callback when ``pipe.interrupt`` is set."""


def apply_softpag(pipe: "StableDiffusionXLTPGPipeline", beta: float = 0.5, selected_heads: Optional[Sequence[int]] = None):
    """Make later calls of ``pipe`` use SoftPAG: ``(1-beta) A + beta I`` on ``selected_heads`` (all when None).

    ``pag_scale`` then defaults to 3.0. Returns ``pipe``.
    """
    settings = PAG(beta=beta, heads=selected_heads)  # validates beta and selected_heads
    pipe._softpag = _SoftPAGSettings(settings.beta, settings.heads)
    return pipe


def apply_nag(
    pipe: "StableDiffusionXLTPGPipeline",
    nag_scale: float = 3.0,
    nag_tau: float = 2.5,
    nag_alpha: float = 0.5,
    nag_use_l1: bool = True,
    nag_negative_prompt: Optional[Union[str, List[str]]] = None,
    nag_end: float = 1.0,
):
    """Make later calls of ``pipe`` use NAG with these settings (``do_nag=True``); returns ``pipe``."""
    NAG(scale=nag_scale, tau=nag_tau, alpha=nag_alpha, use_l1=nag_use_l1, interval=(0.0, nag_end))  # validates
    pipe._nag_defaults = dict(
        do_nag=True,
        nag_scale=nag_scale,
        nag_tau=nag_tau,
        nag_alpha=nag_alpha,
        nag_use_l1=nag_use_l1,
        nag_negative_prompt=nag_negative_prompt,
        nag_end=nag_end,
    )
    return pipe


class StableDiffusionXLTPGPipeline(StableDiffusionXLPipeline):
    """SDXL text-to-image with dual guidance (CFG + TPG + NAG, PAG/SoftPAG) in one UNet call per step."""

    _callback_tensor_inputs = ["latents", "denoised"]
    _softpag: Optional[_SoftPAGSettings] = None
    _nag_defaults: Dict[str, Any] = {}

    def _guidance_terms(
        self, guidance_scale, guidance_rescale, tpg_scale, tpg_layers, pag_scale, pag_layers, nag_settings, intervals
    ) -> Tuple[CFG, TPG, PAG, NAG]:
        softpag = self._softpag
        if pag_scale is None:
            pag_scale = 3.0 if softpag is not None else 0.0
        cfg = CFG(scale=guidance_scale, rescale=guidance_rescale, interval=intervals["cfg"])
        tpg = TPG(scale=tpg_scale, layers=tpg_layers, interval=intervals["tpg"])
        pag = PAG(
            scale=pag_scale,
            layers=pag_layers,
            beta=softpag.beta if softpag else 1.0,
            heads=softpag.heads if softpag else None,
            interval=intervals["pag"],
        )
        nag_interval = intervals["nag"]
        nag_end = nag_settings["nag_end"]
        if nag_interval is None:
            nag_interval = (0.0, nag_end)
        elif nag_end != 1.0:
            raise ValueError("give either nag_end or nag_interval, not both")
        nag = NAG(
            scale=nag_settings["nag_scale"] if nag_settings["do_nag"] else 1.0,
            tau=nag_settings["nag_tau"],
            alpha=nag_settings["nag_alpha"],
            use_l1=nag_settings["nag_use_l1"],
            interval=nag_interval,
        )
        return cfg, tpg, pag, nag

    def _check_call(self, prompt, negative_prompt, negative_prompt_2, height, width, num_images_per_prompt):
        if not isinstance(height, int) or not isinstance(width, int) or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive integers, got height={height!r}, width={width!r}")
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of the VAE factor {factor}; got height={height}, width={width}"
            )
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if prompt is None:
            return
        batch = prompt_batch_size(prompt)
        for name, negative in (("negative_prompt", negative_prompt), ("negative_prompt_2", negative_prompt_2)):
            if negative is not None and not isinstance(negative, str) and prompt_batch_size(negative, name) != batch:
                raise ValueError(
                    f"{name} has {len(negative)} entries but prompt has {batch}; give one per prompt or a single string"
                )

    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        prompt_2: Optional[Union[str, List[str]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        negative_prompt_2: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
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
        cfg_interval: Optional[Union[Interval, Tuple[float, float]]] = None,
        tpg_interval: Optional[Union[Interval, Tuple[float, float]]] = None,
        pag_interval: Optional[Union[Interval, Tuple[float, float]]] = None,
        nag_interval: Optional[Union[Interval, Tuple[float, float]]] = None,
        # sampling
        sampler: Union[str, Callable] = "euler",
        sigma_schedule: str = "model",
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        max_batch_rows: Optional[int] = None,
    ):
        r"""Generate images; the SDXL arguments mean what they mean in ``StableDiffusionXLPipeline``.

        Dual guidance: ``tpg_scale`` (3.0; 0 turns TPG off) on ``tpg_applied_layers_index``
        ("d6-d23"), ``pag_scale`` (0, or 3.0 after ``apply_softpag``) on
        ``pag_applied_layers_index`` ("m0-m9"), and NAG with ``do_nag`` and ``nag_scale`` (3.0),
        ``nag_tau`` (2.5), ``nag_alpha`` (0.5), ``nag_use_l1`` (True), ``nag_negative_prompt``,
        ``nag_end`` (1.0). ``*_interval`` limit a term to ``(start, end)`` fractions of the
        schedule. ``sampler`` is a k-diffusion sampler name or a callable
        ``(model, x, sigmas, extra_args, callback, disable, seed)``; ``sigma_schedule`` is
        "model", "karras" or "exponential". ``max_batch_rows`` splits a step's rows over
        several UNet calls to save memory.
        """
        # 1. Everything that can be wrong is checked before any work.
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self._check_call(prompt, negative_prompt, negative_prompt_2, height, width, num_images_per_prompt)
        nag_settings = {
            "do_nag": False, "nag_scale": 3.0, "nag_tau": 2.5, "nag_alpha": 0.5, "nag_use_l1": True,
            "nag_negative_prompt": None, "nag_end": 1.0, **self._nag_defaults,
        }  # fmt: skip
        given = dict(do_nag=do_nag, nag_scale=nag_scale, nag_tau=nag_tau, nag_alpha=nag_alpha, nag_use_l1=nag_use_l1,
                     nag_negative_prompt=nag_negative_prompt, nag_end=nag_end)  # fmt: skip
        nag_settings.update({k: v for k, v in given.items() if v is not None})
        intervals = {"cfg": cfg_interval, "tpg": tpg_interval, "pag": pag_interval, "nag": nag_interval}
        cfg, tpg, pag, nag = self._guidance_terms(
            guidance_scale, guidance_rescale, tpg_scale, tpg_applied_layers_index, pag_scale, pag_applied_layers_index,
            nag_settings, intervals,
        )  # fmt: skip
        run_sampler = samplers.get(sampler) if isinstance(sampler, str) else sampler
        if not callable(run_sampler):
            raise TypeError(f"sampler must be a name ({', '.join(samplers.names())}) or a callable, got {sampler!r}")
        samplers.check_schedule_name(sigma_schedule)
        self.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, None, None,
            list(callback_on_step_end_tensor_inputs),
        )  # fmt: skip
        batch = prompt_batch_size(prompt) if prompt is not None else prompt_embeds.shape[0]
        if nag.enabled and nag_settings["nag_negative_prompt"] is not None:
            negatives = nag_settings["nag_negative_prompt"]
            if not isinstance(negatives, str) and prompt_batch_size(negatives, "nag_negative_prompt") != batch:
                raise ValueError(f"nag_negative_prompt has {len(negatives)} entries but prompt has {batch}")
        sigmas, init_noise_scale = samplers.get_sigmas(
            sigma_schedule, num_inference_steps, self.scheduler, sigma_min=sigma_min, sigma_max=sigma_max
        )
        denoiser = GuidedDenoiser(
            self.unet, self.scheduler, cfg=cfg, tpg=tpg, pag=pag, nag=nag, sigmas=sigmas,
            max_batch_rows=max_batch_rows, cross_attention_kwargs=cross_attention_kwargs,
        )  # fmt: skip

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = None
        self._interrupt = False
        self._num_timesteps = num_inference_steps
        device = self._execution_device

        # 2. Conditioning.
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        positive, negative = encode_sdxl(
            self, prompt, prompt_2, negative_prompt, negative_prompt_2,
            num_images_per_prompt=num_images_per_prompt, with_negative=cfg.enabled,
            size=original_size or (height, width), crop=crops_coords_top_left, target=target_size or (height, width),
            negative_size=negative_original_size, negative_crop=negative_crops_coords_top_left,
            negative_target=negative_target_size, device=device, lora_scale=lora_scale, clip_skip=clip_skip,
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )  # fmt: skip
        nag_negative = None
        if nag.enabled:
            nag_negative = encode_nag_negative(
                self, batch, num_images_per_prompt, nag_settings["nag_negative_prompt"], nag_negative_prompt_embeds,
                negative_prompt, device=device, lora_scale=lora_scale, clip_skip=clip_skip,
            )  # fmt: skip

        # 3. Initial noise exactly as diffusers draws it, then the seed for everything else.
        images = batch * num_images_per_prompt
        x = self._initial_noise(images, height, width, device, generator, latents) * init_noise_scale
        seed = _derive_seed(generator)
        denoiser.reseed(seed)

        # 4. Sample.
        sigmas = sigmas.to(device)
        extra_args = {"cond": positive.to(device), "uncond": negative.to(device) if negative is not None else None,
                      "nag_negative": nag_negative}  # fmt: skip
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            callback = _StepCallback(self, denoiser, callback_on_step_end, list(callback_on_step_end_tensor_inputs), progress_bar)
            try:
                with denoiser.hooks():
                    x = run_sampler(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=True, seed=seed)
                x = callback.finish(x)
            except _Interrupted:
                x = callback.latest
        self._last_denoiser = denoiser

        # 5. Decode.
        if output_type == "latent":
            image = x
        else:
            image = self._decode(x)
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)

    def _initial_noise(self, images: int, height: int, width: int, device, generator, latents) -> torch.Tensor:
        """Unit-variance starting noise in float32, drawn exactly as diffusers' ``prepare_latents`` draws it."""
        if latents is not None:
            return latents.to(device=device, dtype=torch.float32)
        shape = (images, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != images:
            raise ValueError(f"generator is a list of {len(generator)}; give one per image ({images}) or a single one")
        return randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype).float()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode with diffusers' upcasting and latent (de)normalisation."""
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
            return vae.decode(latents, return_dict=False)[0]
        finally:
            if needs_upcasting:
                vae.to(dtype=torch.float16)


class _StepCallback:
    """Adapts k-diffusion's per-step callback to diffusers' ``callback_on_step_end``.

    k-diffusion reports step ``i`` before updating ``x``; diffusers reports it after. So step
    ``i - 1`` is reported at step ``i`` (with the updated latents) and the last one by ``finish``.
    Latents returned by the user's callback replace the sampler state in place.
    """

    def __init__(self, pipe, denoiser, user_callback, tensor_inputs: List[str], progress_bar) -> None:
        self.pipe = pipe
        self.denoiser = denoiser
        self.user_callback = user_callback
        self.tensor_inputs = tensor_inputs
        self.progress_bar = progress_bar
        self.previous: Optional[dict] = None
        self.latest: Optional[torch.Tensor] = None

    def __call__(self, info: dict) -> None:
        self.latest = info["x"]
        if self.previous is not None:
            self._report(self.previous, info["x"])
        self.previous = {"i": info["i"], "sigma": info["sigma"], "denoised": info["denoised"]}

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        self.latest = x
        if self.previous is not None:
            self._report(self.previous, x)
        return self.latest

    def _report(self, step: dict, x: torch.Tensor) -> None:
        self.progress_bar.update()
        if self.user_callback is not None:
            sigma = torch.as_tensor(step["sigma"], dtype=torch.float32).reshape(-1)[:1]
            timestep = self.denoiser.sigma_to_t(sigma)[0]
            available = {"latents": x, "denoised": step["denoised"]}
            outputs = self.user_callback(self.pipe, step["i"], timestep, {k: available[k] for k in self.tensor_inputs})
            if outputs and "latents" in outputs:
                x.copy_(outputs["latents"])
        if self.pipe.interrupt:
            raise _Interrupted


def _derive_seed(generator) -> int:
    """A seed for permutations and sampler noise, drawn from the caller's generator (or the global RNG)."""
    if isinstance(generator, list):
        generator = generator[0]
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
