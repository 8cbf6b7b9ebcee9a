"""The checkpoint's noise schedule as the denoiser sees it: sigma <-> the model's timestep, and the input scale.

* ``DiscreteModelSchedule``: DDPM-family models (SD, SDXL): sigmas from ``alphas_cumprod``, ``x = x0 + sigma eps``,
  the model input is ``x / sqrt(sigma^2 + 1)``.
* ``FlowMatchSchedule``: flow-matching models (SD3): sigma is the flow time ``t`` (after the scheduler's shift),
  ``x = (1 - t) x0 + t noise`` is the model input itself and its timestep is ``t * num_train_timesteps``.
  With ``x0 = x - t v``, k-diffusion's ODE ``dx/dsigma = (x - x0) / sigma`` is the flow ODE ``dx/dt = v``.

``model_schedule(scheduler)`` picks the one of a diffusers scheduler.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


class DiscreteModelSchedule:
    """Sigma <-> timestep conversion on a DDPM schedule (log-sigma interpolation).

    ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`` for the training timesteps;
    ``sigma_to_t`` interpolates linearly in log-sigma between neighbouring timesteps.
    """

    default_prediction = "epsilon"
    prediction_types = ("epsilon", "v_prediction", "sample")

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

    @staticmethod
    def input_scale(sigma: Tensor) -> Tensor:
        """``c_in``: the factor from ``x`` to the model input at ``sigma``."""
        return (sigma**2 + 1).rsqrt()

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


class FlowMatchSchedule:
    """A flow-matching model's schedule: sigma is the flow time, the timestep ``sigma * num_train_timesteps``."""

    default_prediction = "flow"
    prediction_types = ("flow",)

    def __init__(self, num_train_timesteps: int, sigma_min: float, sigma_max: float) -> None:
        self.num_train_timesteps = num_train_timesteps
        self._range = (float(sigma_min), float(sigma_max))

    @classmethod
    def from_scheduler(cls, scheduler) -> "FlowMatchSchedule":
        """Build from a diffusers flow-matching scheduler (its training range of shifted flow times)."""
        fresh = type(scheduler).from_config(scheduler.config)
        return cls(scheduler.config.num_train_timesteps, fresh.sigma_min, fresh.sigma_max)

    @staticmethod
    def input_scale(sigma: Tensor) -> Tensor:
        """A flow model takes ``x`` as it is."""
        return torch.ones_like(sigma)

    @property
    def sigma_min(self) -> float:
        return self._range[0]

    @property
    def sigma_max(self) -> float:
        return self._range[1]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return sigma.float() * self.num_train_timesteps

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return t.float() / self.num_train_timesteps


ModelSchedule = Union[DiscreteModelSchedule, FlowMatchSchedule]


def model_schedule(scheduler) -> ModelSchedule:
    """The schedule of a diffusers scheduler: flow matching for SD3's, the discrete DDPM one otherwise."""
    from samplers.schedules import is_flow_matching

    if is_flow_matching(scheduler):
        return FlowMatchSchedule.from_scheduler(scheduler)
    return DiscreteModelSchedule.from_scheduler(scheduler)
