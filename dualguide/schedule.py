"""The checkpoint's discrete noise schedule: sigmas from ``alphas_cumprod`` and sigma <-> t."""

from __future__ import annotations

import torch
from torch import Tensor


class DiscreteModelSchedule:
    """Sigma <-> timestep conversion on a DDPM schedule (log-sigma interpolation).

    ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`` for the training timesteps;
    ``sigma_to_t`` interpolates linearly in log-sigma between neighbouring timesteps.
    """

    def __init__(self, alphas_cumprod: Tensor, quantize: bool = False) -> None:
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize

    @classmethod
    def from_scheduler(cls, scheduler, quantize: bool = False) -> "DiscreteModelSchedule":
        """Build from a diffusers scheduler (anything with ``alphas_cumprod``)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(
                f"scheduler must have `alphas_cumprod` (a DDPM-family diffusers scheduler), got {type(scheduler).__name__}"
            )
        return cls(scheduler.alphas_cumprod, quantize=quantize)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional (or, with ``quantize``, nearest) training timestep of each sigma."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().log()
        if self.quantize:
            return (log_sigma[..., None] - log_sigmas).abs().argmin(dim=-1).float()
        high = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        weight = ((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0, 1)
        return low.float() + weight

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at a (fractional) timestep, interpolated in log-sigma."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.float().clamp(0, len(log_sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        weight = t - low
        return (torch.lerp(log_sigmas[low], log_sigmas[high], weight)).exp()
