"""Seeded noise for ancestral and SDE samplers (k-diffusion's defaults use the global RNG)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from torch import Tensor


def seeded_gaussian(x: Tensor, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Independent Gaussian noise shaped like ``x`` at every call, from a generator seeded with ``seed``."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    return sample


def brownian(x: Tensor, sigmas: Tensor, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
    """k-diffusion's Brownian-tree noise (for SDE samplers) with a fixed seed."""
    from k_diffusion.sampling import BrownianTreeNoiseSampler

    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seed)


def noise_sampler_for(name: str, x: Tensor, sigmas: Tensor, seed: Optional[int]) -> Callable[[Tensor, Tensor], Tensor]:
    """The seeded noise sampler that sampler ``name`` gets (seed 0 when None, never the global RNG)."""
    seed = 0 if seed is None else int(seed)
    return brownian(x, sigmas, seed) if "sde" in name else seeded_gaussian(x, seed)
