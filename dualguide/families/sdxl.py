"""Stable Diffusion XL: a ``UNet2DConditionModel`` with ``text_time`` added conditioning (pooled text
embeds and six size / crop ids per row). Base: d0-d23, m0-m9, u0-u35."""

from __future__ import annotations

from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from ..conditioning import Conditioning
from ..defaults import DEFAULT_LAYERS
from .unet import UNetFamily


class SDXLFamily(UNetFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    # TPG paper / official code: the down blocks' 18 deepest transformer blocks; diffusers' PAG default "mid".
    default_tpg_layers = DEFAULT_LAYERS["sdxl"]["tpg"]  # "d6-d23"
    default_pag_layers = DEFAULT_LAYERS["sdxl"]["pag"]  # "m0-m9"

    def matches(self, model: nn.Module) -> bool:
        return self.is_unet(model) and unwrap_module(model).config.get("addition_embed_type") == "text_time"

    def check_conditioning(self, cond: Conditioning, name: str) -> None:
        if cond.pooled_embeds is None or cond.time_ids is None:
            raise ValueError(f"{name}: an SDXL UNet needs pooled_embeds and time_ids in each row's Conditioning")


SDXL = SDXLFamily()
