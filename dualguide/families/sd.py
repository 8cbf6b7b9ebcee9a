"""Stable Diffusion 1.x / 2.x: a ``UNet2DConditionModel`` conditioned on one CLIP text encoder's hidden
states only (epsilon or v-prediction; SD 2.x with ``use_linear_projection``). SD 1.5 / 2.1: d0-d5, m0, u0-u8."""

from __future__ import annotations

from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from ..conditioning import Conditioning
from ..defaults import DEFAULT_LAYERS
from .unet import UNetFamily


class SDFamily(UNetFamily):
    name = "sd"
    title = "Stable Diffusion 1.x / 2.x"
    # TPG: the paper reports SD 2.1 but neither it nor the official (SDXL-only) code lists its layers.
    # SDXL's d6-d23 lie in its deepest down level (1/4 of the latent side: 32x32 of a 1024 px image);
    # SD's down level at that scale is down_blocks.2 (16x16 for 512 px, 24x24 for 768 px): d4-d5.
    # PAG: diffusers' default "mid".
    default_tpg_layers = DEFAULT_LAYERS["sd"]["tpg"]  # "d4-d5"
    default_pag_layers = DEFAULT_LAYERS["sd"]["pag"]  # "m0"

    def matches(self, model: nn.Module) -> bool:
        return self.is_unet(model) and unwrap_module(model).config.get("addition_embed_type") != "text_time"

    def check_conditioning(self, cond: Conditioning, name: str) -> None:
        if cond.pooled_embeds is not None or cond.time_ids is not None:
            raise ValueError(f"{name}: a Stable Diffusion 1.x/2.x UNet takes prompt embeds only, no pooled_embeds or time_ids")


SD = SDFamily()
