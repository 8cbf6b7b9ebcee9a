"""Pure guidance math: combine the branch predictions of one step.

Every function here is affine in its inputs with weights that sum to one, so it
gives the same result whether it is applied to x0 ("denoised"), eps or v
predictions of the same (x, sigma). The denoiser applies it to the model's own
prediction space so that ``guidance_rescale`` matches diffusers exactly.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor


def guided_prediction(
    cond: Tensor,
    uncond: Optional[Tensor] = None,
    guidance_scale: float = 1.0,
    perturbed: Iterable[Tuple[float, Tensor]] = (),
) -> Tensor:
    """Combine branch predictions with the CFG + perturbation-guidance formula.

    ``D = D_u + w (D_c - D_u) + sum_k s_k (D_c - D_pk)`` when ``uncond`` is given
    (CFG active), else ``D = D_c + sum_k s_k (D_c - D_pk)``. ``perturbed`` holds
    ``(scale, prediction)`` pairs, one per perturbed branch (TPG, PAG).
    """
    guided = cond if uncond is None else uncond + guidance_scale * (cond - uncond)
    for scale, prediction in perturbed:
        guided = guided + scale * (cond - prediction)
    return guided


def rescale_guidance(guided: Tensor, cond: Tensor, guidance_rescale: float) -> Tensor:
    """Rescale a guided prediction towards the cond prediction's std (Lin et al. 2023, sec. 3.4).

    ``guidance_rescale`` = 0 returns ``guided`` unchanged, 1 matches the std of ``cond`` per sample.
    """
    if guidance_rescale == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guidance_rescale * (guided * ratio) + (1.0 - guidance_rescale) * guided


def _token_norm(hidden_states: Tensor, use_l1: bool = True) -> Tensor:
    """Per-token L1 or L2 norm over the last dim, accumulated in float32 (or wider), keepdim.

    L1 is ``abs().sum()``: ``linalg.vector_norm(ord=1)`` is several times slower on CPU.
    """
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    if use_l1:
        return hidden_states.abs().sum(dim=-1, keepdim=True, dtype=dtype)
    return torch.linalg.vector_norm(hidden_states, dim=-1, keepdim=True, dtype=dtype)


def nag_extrapolate(
    positive: Tensor,
    negative: Tensor,
    scale: float,
    tau: float,
    alpha: float,
    use_l1: bool = True,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Normalized Attention Guidance on attention outputs (heads merged, before ``to_out``).

    ``Zt = s Z+ - (s-1) Z-``; the per-token norm ratio ``r = |Zt| / |Z+|`` (L1 or L2
    over the last dim, accumulated in at least float32) is clipped at ``tau``, i.e. ``Zt`` is
    multiplied by ``min(r, tau) / r = min(1, tau / r)``; the result is
    ``alpha Zt + (1-alpha) Z+``. Zero norms give finite results. Differentiable; for inference,
    ``out`` (which may be ``positive`` itself) receives the result instead of a new tensor.
    """
    if out is not None and out.shape != positive.shape:
        raise ValueError(f"out must have the shape of positive, {tuple(positive.shape)}, got {tuple(out.shape)}")
    extrapolated = torch.lerp(negative, positive, scale)  # s Z+ - (s-1) Z-
    norm_positive = _token_norm(positive, use_l1)
    norm_extrapolated = _token_norm(extrapolated, use_l1).clamp_min(torch.finfo(torch.float32).tiny)
    shrink = (norm_positive * tau / norm_extrapolated).clamp_(max=1.0)
    return torch.lerp(positive, extrapolated * shrink.to(extrapolated.dtype), alpha, out=out)


def nag_extrapolate_wan(positive: Tensor, negative: Tensor, scale: float, tau: float, alpha: float, use_l1: bool = True) -> Tensor:
    """NAG with the NAG authors' Wan clipping rule (their ``NAGWanAttnProcessor2_0``), beside ``nag_extrapolate``.

    ``Zt = s Z+ - (s-1) Z-``; with ``r = |Zt| / |Z+|`` per token (NaN, i.e. 0 / 0, read as 10), the tokens with
    ``r > tau`` get ``Zt / (|Zt| + 1e-7) |Z+| tau``; the result is ``alpha Zt + (1-alpha) Z+``. The authors use L1;
    ``use_l1=False`` takes L2 norms in the same rule. Norms accumulate in at least float32. It differs from
    ``nag_extrapolate`` by the ``1e-7`` in the denominator: more than rounding where ``|Zt|`` is small.
    """
    extrapolated = positive * scale - negative * (scale - 1)
    norm_positive = _token_norm(positive, use_l1)
    norm_extrapolated = _token_norm(extrapolated, use_l1)
    ratio = torch.nan_to_num(norm_extrapolated / norm_positive, nan=10.0)
    clipped = extrapolated / (norm_extrapolated + 1e-7) * norm_positive * tau
    extrapolated = torch.where(ratio > tau, clipped.to(extrapolated.dtype), extrapolated)
    return extrapolated * alpha + positive * (1 - alpha)
