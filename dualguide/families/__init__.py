"""Model family adapters (``ModelFamily``): SDXL, Stable Diffusion 1.x / 2.x, SD3 / SD3.5, Chroma and Flux.1, and how to pick one."""

from __future__ import annotations

from typing import Tuple

from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from .base import BlockLayout, CallExtras, ModelFamily
from .chroma import CHROMA
from .flux import FLUX
from .generic import GENERIC
from .mmdit import SD3
from .sd import SD
from .sdxl import SDXL
from .wan import WAN

# The more specific adapter first: Chroma's subclasses Flux's.
FAMILIES: Tuple[ModelFamily, ...] = (SDXL, SD, SD3, CHROMA, FLUX)


def supported_families() -> str:
    """The supported families, for messages: ``"Stable Diffusion XL, Stable Diffusion 1.x / 2.x, Stable Diffusion 3 / 3.5"``."""
    return ", ".join(family.title for family in FAMILIES)


def family_of(model: nn.Module) -> ModelFamily:
    """The adapter of ``model``'s family (a ``torch.compile``d model is unwrapped); ``TypeError`` when none fits."""
    inner = unwrap_module(model)
    for family in FAMILIES:
        if family.matches(inner):
            return family
    raise TypeError(f"no guidance adapter for a {type(inner).__name__}; supported families: {supported_families()}")


# What the Modular Diffusers guiders run on: every family, then the guider-only layouts (most specific first).
LAYOUTS: Tuple[BlockLayout, ...] = (*FAMILIES, WAN, *GENERIC)


def layout_of(model: nn.Module) -> BlockLayout:
    """The guiders' layout of ``model`` (a family adapter, else a guider-only layout); ``TypeError`` naming the
    backbone and the supported ones when none fits."""
    inner = unwrap_module(model)
    for layout in LAYOUTS:
        if layout.matches(inner):
            return layout
    titles = ", ".join(layout.title for layout in LAYOUTS)
    raise TypeError(f"no guider layout for a {type(inner).__name__}; the guiders run on: {titles}")


def family_named(name: str) -> ModelFamily:
    """The adapter called ``name`` (``"sdxl"``, ``"sd"``, ``"sd3"``, ``"chroma"``, ``"flux"``); ``ValueError`` listing the names otherwise."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(f.name for f in FAMILIES)}")


__all__ = ["CHROMA", "FAMILIES", "FLUX", "LAYOUTS", "BlockLayout", "CallExtras", "ModelFamily", "SD", "SD3", "SDXL", "WAN", "family_named", "family_of", "layout_of", "supported_families"]
