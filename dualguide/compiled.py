"""``torch.compile`` of a UNet with the guidance hooks resident.

A compiled UNet bakes the hooks it saw when it was traced into its code, and dynamo does not
notice hooks added to a module that had none (``skip_nnmodule_hook_guards``), while hooks
re-registered at every run would fail its guards and recompile it. So a compiled UNet gets
every guidance hook and wrapper once, for good: TPG's pre-hook on every transformer block,
PAG's wrapper on every ``attn1``, NAG's on every ``attn2``. They pass through on calls that do
not ask for them, and each set of branches and settings gets its own compiled variant.

``compile_unet(unet)`` does both; ``pipe.unet = torch.compile(pipe.unet)`` works as well (the
denoiser installs the resident hooks on the inner UNet before its first guided call).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from .families import ModelFamily, family_of
from .hooks import hold_guidance_hooks

_resident: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def keep_hooks_installed(unet: nn.Module, family: Optional[ModelFamily] = None) -> None:
    """Install every guidance hook and wrapper on ``unet`` (or the UNet a compiled module holds) for
    the rest of its life; idempotent. Each call still acts only on what its own state asks for.
    ``family``: the backbone's adapter (by default ``family_of(unet)``)."""
    unet = unwrap_module(unet)
    if unet in _resident:
        return
    hold_guidance_hooks((family or family_of(unet)).hook_sites(unet))
    _resident.add(unet)


def compile_unet(unet: nn.Module, **options) -> nn.Module:
    """``torch.compile(unet, **options)`` with the guidance hooks resident, for guided sampling.

    Shapes are static unless ``dynamic`` says otherwise: one compiled variant per branch set, batch
    size and settings, up to ``recompile_limit`` (32) of them. Use it as diffusers users do:
    ``pipe.unet = compile_unet(pipe.unet)``.
    """
    keep_hooks_installed(unet)
    return torch.compile(unet, **{"dynamic": False, "recompile_limit": 32, **options})
