"""Image-to-image and inpainting building blocks for k-diffusion samplers, usable without a pipeline.

Everything works in k-diffusion's convention ``x = x0 + sigma * noise`` on VAE latents:

* ``strength_sigmas`` cuts a sigma schedule at ``strength`` as diffusers' ``get_timesteps`` does;
  ``sigmas_from`` / ``sigmas_until`` cut it where a refiner takes over (``denoising_start`` /
  ``denoising_end``);
* ``img2img_start`` gives the starting point ``init_latents + noise * sigmas[0]`` and the cut schedule;
* ``keep_known`` is the inpainting blend ``(1 - mask) * known + mask * x`` (mask 1 = repaint);
  ``InpaintModel`` wraps any k-diffusion model so that every evaluation keeps the unmasked region
  on the noised original, which makes any k-diffusion sampler an inpainting sampler (4-channel UNets).

    sigmas = get_sigmas_karras(20, denoiser.sigma_min, denoiser.sigma_max)
    x, sigmas = img2img_start(init_latents, torch.randn_like(init_latents), sigmas, strength=0.6)
    latents = sample_dpmpp_2m(InpaintModel(denoiser, init_latents, mask, noise), x, sigmas, extra_args=...)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["strength_sigmas", "sigmas_from", "sigmas_until", "img2img_start", "keep_known", "InpaintModel"]


def _check_strength(strength: float) -> float:
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be a finite number in (0, 1], got {strength!r}")
    return strength


def strength_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The last ``int(steps * strength)`` steps of ``sigmas`` (``steps = len(sigmas) - 1``), as diffusers'
    ``get_timesteps`` keeps the last ``int(num_inference_steps * strength)`` timesteps."""
    strength = _check_strength(strength)
    steps = len(sigmas) - 1
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(
            f"strength {strength:g} leaves no step of {steps}: strength * steps must be >= 1"
        )
    return sigmas[steps - kept :]


def _cutoff(scheduler, fraction: float) -> int:
    total = scheduler.config.num_train_timesteps
    return int(round(total - fraction * total))


def _timesteps_of(scheduler, sigmas: Tensor) -> Tensor:
    from .schedule import model_schedule

    return model_schedule(scheduler).sigma_to_t(torch.as_tensor(sigmas, dtype=torch.float32).cpu())


def sigmas_from(sigmas: Tensor, scheduler, denoising_start: float) -> Tensor:
    """The steps of ``sigmas`` a refiner starting at ``denoising_start`` (a fraction of the training
    schedule) runs: those whose timestep lies below diffusers' cutoff, as its ``get_timesteps`` keeps."""
    cutoff = _cutoff(scheduler, denoising_start)
    steps = int((_timesteps_of(scheduler, sigmas[:-1]) < cutoff).sum())
    if steps < 1:
        raise ValueError(f"denoising_start {denoising_start:g} leaves no step of this schedule")
    return sigmas[len(sigmas) - 1 - steps :]


def sigmas_until(sigmas: Tensor, scheduler, denoising_end: Optional[float]) -> Tensor:
    """``sigmas`` cut where ``denoising_end`` hands over to a refiner (its latents are then still noisy)."""
    if denoising_end is None or not 0 < denoising_end < 1:
        return sigmas
    steps = int((_timesteps_of(scheduler, sigmas[:-1]) >= _cutoff(scheduler, denoising_end)).sum())
    return sigmas[: steps + 1]


def img2img_start(init_latents: Tensor, noise: Tensor, sigmas: Tensor, strength: float = 1.0) -> Tuple[Tensor, Tensor]:
    """``(x, sigmas)``: the schedule cut at ``strength`` and the start ``init_latents + noise * sigmas[0]``."""
    sigmas = strength_sigmas(sigmas, strength)
    return init_latents + noise * sigmas[0].to(init_latents), sigmas


def keep_known(x: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """``(1 - mask) * known + mask * x``: repaint where ``mask`` is 1, keep ``known`` where it is 0."""
    return (1 - mask) * known + mask * x


class InpaintModel:
    """A k-diffusion model that inpaints with any sampler (4-channel UNets).

    Before each evaluation the unmasked region of ``x`` is replaced by ``init_latents + noise * sigma``
    (the original, noised to the current level, as diffusers' inpainting blend does each step); the
    prediction's unmasked region is ``init_latents``, so the sampler's result keeps the original there.
    ``mask`` is 1 where to repaint, broadcastable to the latents (e.g. ``[B, 1, h, w]``).
    """

    def __init__(self, model, init_latents: Tensor, mask: Tensor, noise: Optional[Tensor] = None) -> None:
        self.model = model
        self.init_latents = init_latents.float()
        self.mask = mask.float()
        self.noise = torch.zeros_like(self.init_latents) if noise is None else noise.float()

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        level = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))
        x = keep_known(x, self.init_latents + self.noise * level, self.mask)
        denoised = self.model(x, sigma, **extra_args)
        return keep_known(denoised, self.init_latents, self.mask)

    def __getattr__(self, name: str):  # sigma_min, sigma_max, sigma_to_t, ... of the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)
