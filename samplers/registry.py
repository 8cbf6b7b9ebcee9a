"""Every k-diffusion sampler by name, behind one calling convention.

``get(name)(model, x, sigmas, extra_args=None, callback=None, disable=None, seed=None)``
returns the final latents. ``seed`` seeds every random draw the sampler makes (ancestral
noise, SDE Brownian noise), so the same seed gives the same image for every sampler.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

if TYPE_CHECKING:
    from torch import Tensor

from .noise import noise_sampler_for

# The sample_* functions of k_diffusion.sampling, listed so that `names()` needs no heavy import
# (tests check this list against k-diffusion itself).
SAMPLER_NAMES: Tuple[str, ...] = (
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
)

Sampler = Callable[..., "Tensor"]


def names() -> Tuple[str, ...]:
    """Names accepted by ``get``."""
    return SAMPLER_NAMES


def _k_sampler(name: str) -> Callable:
    from k_diffusion import sampling

    return getattr(sampling, f"sample_{name}")


def get(name: str) -> Sampler:
    """The sampler ``name`` in the uniform calling convention; ``ValueError`` listing the names if unknown."""
    if name not in SAMPLER_NAMES:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLER_NAMES)}; got {name!r}")

    def run(
        model,
        x: Tensor,
        sigmas: Tensor,
        extra_args: Optional[dict] = None,
        callback: Optional[Callable] = None,
        disable: Optional[bool] = None,
        seed: Optional[int] = None,
    ) -> Tensor:
        sample = _k_sampler(name)
        parameters = inspect.signature(sample).parameters
        kwargs = {"extra_args": extra_args, "callback": callback, "disable": disable}
        if "noise_sampler" in parameters:
            kwargs["noise_sampler"] = noise_sampler_for(name, x, sigmas, seed)
        if "sigmas" in parameters:
            return sample(model, x, sigmas, **kwargs)
        # dpm_fast / dpm_adaptive take a sigma range instead of a schedule.
        positive = sigmas[sigmas > 0]
        sigma_min, sigma_max = float(positive.min()), float(sigmas.max())
        if "n" in parameters:
            return sample(model, x, sigma_min, sigma_max, len(sigmas) - 1, **kwargs)
        return sample(model, x, sigma_min, sigma_max, **kwargs)

    run.__name__ = f"sample_{name}"
    run.__doc__ = f"k-diffusion's sample_{name} with seeded noise."
    return run


# How the samplers that take a sigma range instead of a schedule use the step count (shown by
# `dualguide samplers`). Both get only the schedule's largest and smallest sigma: its spacing is unused.
SAMPLER_NOTES: Dict[str, str] = {
    "dpm_fast": (
        "--steps is the number of model evaluations (guided UNet calls), spread over DPM-Solver steps of "
        "order 3, the last one or two of order 2/1 (25 -> 9 solver steps), so fewer solver steps than evaluations"
    ),
    "dpm_adaptive": (
        "adaptive step size (DPM-Solver-2/3 pair, rtol 0.05, atol 0.0078): ignores --steps; the number of "
        "evaluations (3 per tried step) depends on the tolerance and the image"
    ),
}
