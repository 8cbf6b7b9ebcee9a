"""The steps of a guided run: k-diffusion sigmas from the call's arguments, and the ``denoising_end`` cut."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

import samplers

from ..schedule import model_schedule


def denoising_end_cutoff(scheduler, denoising_end: Optional[float]) -> Optional[int]:
    """The first training timestep a run stopping at ``denoising_end`` no longer denoises (diffusers' rule)."""
    if denoising_end is None or not 0 < denoising_end < 1:
        return None
    total = scheduler.config.num_train_timesteps
    return int(round(total - denoising_end * total))


def timesteps_until(scheduler, timesteps: Tensor, denoising_end: Optional[float]) -> Tensor:
    """``timesteps`` cut where ``denoising_end`` hands over to a refiner (all of them when None)."""
    cutoff = denoising_end_cutoff(scheduler, denoising_end)
    if cutoff is None:
        return timesteps
    return timesteps[: int((timesteps >= cutoff).sum())]


def kdiffusion_sigmas(
    scheduler, args: Dict[str, Any], scheduler_options: Optional[Dict[str, Any]] = None
) -> Tuple[Tensor, float]:
    """Sigmas for a k-diffusion run and the initial-noise scale.

    ``sigmas`` or ``timesteps`` given: that schedule (a final 0 appended when missing), starting
    at its first sigma; else ``sigma_schedule`` over ``num_inference_steps`` ("model" by default:
    the scheduler's own sigmas and initial-noise scale, as diffusers' Euler uses them). Cut at
    ``denoising_end``, whose latents are then still noisy, for a refiner. ``scheduler_options`` go to
    the scheduler's ``set_timesteps`` (``mu`` of a dynamically shifted flow scheduler; Flux's ``sigmas``, which then
    stand for the call's and are shifted by the scheduler as in diffusers' Flux pipelines).
    """
    schedule = model_schedule(scheduler)
    # A family that hands its sigmas to the scheduler (Flux: unshifted, the scheduler shifts them) has them in the options.
    given = None if "sigmas" in (scheduler_options or {}) else args["sigmas"]
    if given is not None or args["timesteps"] is not None:
        if given is not None:
            sigmas = torch.as_tensor(given, dtype=torch.float32).reshape(-1)
        else:
            sigmas = schedule.t_to_sigma(torch.as_tensor(args["timesteps"], dtype=torch.float32).reshape(-1))
        if float(sigmas[-1]) != 0.0:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        init_noise_scale = float(sigmas[0])
    else:
        sigmas, init_noise_scale = samplers.get_sigmas(
            args["sigma_schedule"] or "model", args["num_inference_steps"], scheduler,
            sigma_min=args["sigma_min"], sigma_max=args["sigma_max"], scheduler_options=scheduler_options,
        )  # fmt: skip
    cutoff = denoising_end_cutoff(scheduler, args["denoising_end"])
    if cutoff is not None:
        steps = int((schedule.sigma_to_t(sigmas[:-1]) >= cutoff).sum())
        sigmas = sigmas[: steps + 1]
    return sigmas, init_noise_scale
