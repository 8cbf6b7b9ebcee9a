"""Sigma schedules: the checkpoint scheduler's own ("model"), Karras, exponential."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Tuple

from .checks import check_choice, check_number

if TYPE_CHECKING:
    from torch import Tensor

SCHEDULE_NAMES: Tuple[str, ...] = ("model", "karras", "exponential")


def check_schedule_name(name: str) -> None:
    check_choice(name, "sigma_schedule", SCHEDULE_NAMES)


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching one (SD3's ``FlowMatchEulerDiscreteScheduler``...): its sigmas are the
    flow time ``t`` in ``[0, 1]``, ``x_t = (1 - t) x0 + t noise``, and it has no ``alphas_cumprod``."""
    return getattr(scheduler, "alphas_cumprod", None) is None and "FlowMatch" in type(scheduler).__name__


def trained_sigma_range(scheduler, scheduler_options: Optional[Mapping[str, Any]] = None) -> Tuple[float, float]:
    """The smallest and largest sigma of the checkpoint's training schedule (a flow model's shifted flow times;
    a dynamically shifted one's shifted by the ``mu`` of ``scheduler_options``, as its ``set_timesteps`` shifts)."""
    if is_flow_matching(scheduler):
        fresh = type(scheduler).from_config(scheduler.config)
        ends = (fresh.sigma_min, fresh.sigma_max)
        mu = (scheduler_options or {}).get("mu")
        if fresh.config.get("use_dynamic_shifting") and mu is not None:
            ends = [fresh.time_shift(mu, 1.0, end) for end in ends]
        return float(ends[0]), float(ends[1])
    trained = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()
    return float(trained.min()), float(trained.max())


def check_schedule(
    name: str,
    steps: int,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    scheduler=None,
    rho: float = 7.0,
    steps_name: str = "steps",
    scheduler_options: Optional[Mapping[str, Any]] = None,
) -> Tuple[int, Optional[float], Optional[float], float]:
    """Validate a schedule request; returns ``(steps, sigma_min, sigma_max, rho)`` as Python numbers.

    ``steps`` is a positive integer (numpy integers too); ``sigma_min`` / ``sigma_max`` are
    finite and positive, only for "karras" and "exponential", and with ``scheduler`` given
    the model's trained range (shifted by ``scheduler_options``' ``mu``) fills in the one not
    given (a scheduler without one needs both), both returned, and ``0 < sigma_min < sigma_max`` is checked.
    """
    check_schedule_name(name)
    steps = check_number(steps, steps_name, 1, integer=True)
    sigma_min = check_number(sigma_min, "sigma_min", 0.0, low_open=True, optional=True)
    sigma_max = check_number(sigma_max, "sigma_max", 0.0, low_open=True, optional=True)
    rho = check_number(rho, "rho", 0.0, low_open=True)
    if name == "model":
        if sigma_min is not None or sigma_max is not None:
            raise ValueError("sigma_min / sigma_max apply to the karras and exponential schedules, not to 'model'")
        return steps, sigma_min, sigma_max, rho
    low, high = sigma_min, sigma_max
    if scheduler is not None and (low is None or high is None):
        if getattr(scheduler, "alphas_cumprod", None) is None and not is_flow_matching(scheduler):
            raise ValueError(
                f"sigma_schedule={name!r}: {type(scheduler).__name__} has no trained sigma range; "
                "give sigma_min and sigma_max"
            )
        trained_low, trained_high = trained_sigma_range(scheduler, scheduler_options)
        low = trained_low if low is None else low
        high = trained_high if high is None else high
    if low is not None and high is not None and not low < high:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={low:g}, sigma_max={high:g}"
            + ("" if sigma_min is not None and sigma_max is not None else " (the other from the model's trained range)")
        )
    return steps, low, high, rho


def get_sigmas(
    name: str,
    steps: int,
    scheduler,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7.0,
    scheduler_options: Optional[Mapping[str, Any]] = None,
) -> Tuple[Tensor, float]:
    """Sigmas (``steps + 1`` values ending in 0) and the initial-noise scale for schedule ``name``.

    ``scheduler`` is the checkpoint's diffusers scheduler (left unmodified). "model" uses its
    own sigmas and ``init_noise_sigma`` (which reproduces diffusers' Euler), or for schedulers
    without one sigma per step (DDIM, LCM, TCD, Heun...) the sigmas of its timesteps; the other
    schedules span ``[sigma_min, sigma_max]``, by default the model's trained range, and start
    from ``sigma_max`` (a flow model's from unit noise: its ``x`` at flow time 1 is the noise itself).
    ``scheduler_options`` go to the scheduler's ``set_timesteps`` for "model"; ``mu`` of a dynamically
    shifted flow scheduler also shifts the trained range, as diffusers' own Karras / exponential sigmas do.
    """
    steps, sigma_min, sigma_max, rho = check_schedule(
        name, steps, sigma_min, sigma_max, scheduler, rho, scheduler_options=scheduler_options
    )
    if name == "model":
        return _scheduler_sigmas(scheduler, steps, scheduler_options or {})
    from k_diffusion import sampling

    if name == "karras":
        sigmas = sampling.get_sigmas_karras(steps, sigma_min, sigma_max, rho=rho)
    else:
        sigmas = sampling.get_sigmas_exponential(steps, sigma_min, sigma_max)
    return sigmas.float().cpu(), 1.0 if is_flow_matching(scheduler) else sigma_max


def _scheduler_sigmas(scheduler, steps: int, options: Mapping[str, Any]) -> Tuple[Tensor, float]:
    """The scheduler's own schedule for ``steps`` steps as k-diffusion sigmas, and the initial-noise scale."""
    import numpy as np
    import torch

    own = type(scheduler).from_config(scheduler.config)
    own.set_timesteps(steps, **options)
    sigmas = getattr(own, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and len(sigmas) == steps + 1:
        return sigmas.float().cpu(), float(getattr(own, "init_noise_sigma", 1.0))
    alphas_cumprod = own.alphas_cumprod.double()
    trained = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    timesteps = torch.unique_consecutive(torch.as_tensor(own.timesteps).cpu().double())
    levels = torch.from_numpy(np.interp(timesteps.numpy(), np.arange(len(trained)), trained.numpy()))
    sigmas = torch.cat([levels.float(), torch.zeros(1)])
    return sigmas, float(sigmas[0])
