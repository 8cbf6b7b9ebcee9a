"""Sigma schedules: the checkpoint scheduler's own ("model"), Karras, exponential."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    from torch import Tensor

SCHEDULE_NAMES: Tuple[str, ...] = ("model", "karras", "exponential")


def check_schedule_name(name: str) -> None:
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"sigma_schedule must be one of {', '.join(SCHEDULE_NAMES)}; got {name!r}")


def get_sigmas(
    name: str,
    steps: int,
    scheduler,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7.0,
) -> Tuple[Tensor, float]:
    """Sigmas (``steps + 1`` values ending in 0) and the initial-noise scale for schedule ``name``.

    ``scheduler`` is the checkpoint's diffusers scheduler (left unmodified). "model" uses its
    own sigmas and ``init_noise_sigma`` (which reproduces diffusers' pipelines); the other
    schedules span ``[sigma_min, sigma_max]``, by default the model's trained range, and start
    from ``sigma_max``.
    """
    import torch

    check_schedule_name(name)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
    if name == "model":
        if sigma_min is not None or sigma_max is not None:
            raise ValueError("sigma_min / sigma_max apply to the karras and exponential schedules, not to 'model'")
        own = type(scheduler).from_config(scheduler.config)
        own.set_timesteps(steps)
        sigmas = torch.as_tensor(own.sigmas, dtype=torch.float32).cpu()
        return sigmas, float(own.init_noise_sigma)
    trained = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()
    sigma_min = float(trained.min()) if sigma_min is None else float(sigma_min)
    sigma_max = float(trained.max()) if sigma_max is None else float(sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min:g}, sigma_max={sigma_max:g}")
    from k_diffusion import sampling

    if name == "karras":
        sigmas = sampling.get_sigmas_karras(steps, sigma_min, sigma_max, rho=rho)
    else:
        sigmas = sampling.get_sigmas_exponential(steps, sigma_min, sigma_max)
    return sigmas.float().cpu(), sigma_max
