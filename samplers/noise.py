"""Seeded noise for ancestral and SDE samplers (k-diffusion's defaults use the global RNG).

A seed is one int (one stream for the whole batch) or one int per image (each image its own
stream, so that an image of a batch equals the image sampled alone with its seed).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

if TYPE_CHECKING:
    from torch import Tensor

Seeds = Union[int, Sequence[int]]
NoiseSampler = Callable[["Tensor", "Tensor"], "Tensor"]


def seeded_gaussian(x: Tensor, seed: int) -> NoiseSampler:
    """Independent Gaussian noise shaped like ``x`` at every call, from a generator seeded with ``seed``."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    return sample


def brownian(x: Tensor, sigmas: Tensor, seed: int) -> NoiseSampler:
    """k-diffusion's Brownian-tree noise (for SDE samplers) with a fixed seed."""
    from k_diffusion.sampling import BrownianTreeNoiseSampler

    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seed)


def per_image(make: Callable[[Tensor, int], NoiseSampler], x: Tensor, seeds: Sequence[int]) -> NoiseSampler:
    """One noise sampler per image (``make(x[i:i+1], seeds[i])``), their draws stacked along the batch."""
    import torch

    if len(seeds) != x.shape[0]:
        raise ValueError(f"got {len(seeds)} per-image seeds for a batch of {x.shape[0]} images")
    samplers = [make(x[i : i + 1], int(seed)) for i, seed in enumerate(seeds)]

    def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.cat([draw(sigma, sigma_next) for draw in samplers])

    return sample


def noise_sampler_for(name: str, x: Tensor, sigmas: Tensor, seed: Optional[Seeds]) -> NoiseSampler:
    """The seeded noise sampler that sampler ``name`` gets (seed 0 when None, never the global RNG)."""
    if "sde" in name:
        def make(rows: Tensor, one_seed: int) -> NoiseSampler:
            return brownian(rows, sigmas, one_seed)
    else:
        make = seeded_gaussian
    if seed is None or isinstance(seed, numbers.Integral):
        return make(x, 0 if seed is None else int(seed))
    return per_image(make, x, seed)
