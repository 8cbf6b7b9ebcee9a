"""Stable Diffusion 3 / 3.5: diffusers' ``SD3Transformer2DModel`` (MMDiT), a flow-matching transformer whose joint
blocks attend over image and text tokens together. Ids j0-jN over ``transformer_blocks`` (SD3 medium and SD3.5
medium: j0-j23; SD3.5 large: j0-j37).

TPG (experimental: no published reference for MMDiT) permutes the image tokens entering each selected joint
block, text tokens untouched; SD3 adds its position embedding before the first block, so a permutation there
breaks the spatial order as it does in a UNet block. Default ``j2-j8``: SDXL's TPG layers (d6-d23) are the
transformer blocks at 9-34% of its depth, past the first few that turn patches into features; j2-j8 is that
span of SD3 medium's 24 blocks, and holds the early-middle blocks whose skipping SD3.5's skip-layer guidance
uses to act on structure (7-9). PAG: diffusers' ``blocks.1`` default (j1), on the joint attention and, in
SD3.5's dual-attention blocks, on the image self-attention ``attn2`` too. NAG: every joint attention, with the
negative text as extra text-stream rows (``dualguide.joint``).
"""

from __future__ import annotations

import weakref
from typing import Dict, FrozenSet, Iterable, List

import torch
from diffusers.utils.torch_utils import unwrap_module
from torch import Tensor, nn

from ..callstate import current_call
from ..conditioning import Conditioning
from ..defaults import DEFAULT_LAYERS
from ..hooks import HookSites
from ..joint import JointGuidanceProcessor, image_stream_temb, is_joint_attention
from ..perturb import PerturbedSelfAttnProcessor, shuffle_tokens
from .base import Blocks, CallExtras, ModelFamily

_blocks: "weakref.WeakKeyDictionary[nn.Module, Blocks]" = weakref.WeakKeyDictionary()


def _joint_blocks(model: nn.Module) -> Blocks:
    transformer = unwrap_module(model)
    blocks = _blocks.get(transformer)
    if blocks is None:
        blocks = _blocks[transformer] = {
            f"j{index}": (f"transformer_blocks.{index}", block) for index, block in enumerate(transformer.transformer_blocks)
        }
    return blocks


class MMDiTFamily(ModelFamily):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5"
    default_tpg_layers = DEFAULT_LAYERS["sd3"]["tpg"]  # "j2-j8"
    default_pag_layers = DEFAULT_LAYERS["sd3"]["pag"]  # "j1"
    nag_negative_rows = True

    def matches(self, model: nn.Module) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(unwrap_module(model), SD3Transformer2DModel)

    def blocks(self, model: nn.Module) -> Blocks:
        return dict(_joint_blocks(model))

    def run_order(self, model: nn.Module) -> List[str]:
        """The patch and position embedding, the time / pooled text embedding, the text projection, the joint blocks."""
        return ["pos_embed", "time_text_embed", "context_embedder", *(name for name, _ in _joint_blocks(model).values())]

    def tpg_module(self, block: nn.Module) -> nn.Module:
        return block

    def pag_attentions(self, block: nn.Module) -> List[nn.Module]:
        return [block.attn] + ([block.attn2] if getattr(block, "attn2", None) is not None else [])

    def nag_attentions(self, model: nn.Module) -> FrozenSet[nn.Module]:
        return frozenset(block.attn for _, block in _joint_blocks(model).values())

    def token_counts(self, model: nn.Module, height: int, width: int) -> Dict[nn.Module, int]:
        patch = unwrap_module(model).config.patch_size
        tokens = (height // patch) * (width // patch)
        return {block: tokens for _, block in _joint_blocks(model).values()}

    def check_conditioning(self, cond: Conditioning, name: str) -> None:
        if cond.pooled_embeds is None or cond.time_ids is not None:
            raise ValueError(f"{name}: an SD3 transformer takes prompt embeds and pooled_embeds in each row's Conditioning, no time_ids")
        if cond.image_embeds is not None or cond.attention_mask is not None:
            raise ValueError(f"{name}: IP-Adapter image embeds and attention masks are not supported on SD3 yet")

    def call(self, model: nn.Module, sample: Tensor, timesteps: Tensor, cond: Conditioning, extras: CallExtras) -> Tensor:
        """One transformer call; with NAG, the guided rows' negative text, pooled embeds and timesteps are appended
        to the text stream (the image rows' pooled embeds, so the extra rows' ``temb`` is their own row's)."""
        if extras.residuals is not None:
            raise ValueError("ControlNet residuals are not supported on SD3 yet")
        text, pooled, timesteps = cond.prompt_embeds, cond.pooled_embeds, timesteps
        call = current_call()
        if call is not None and call.nag is not None:
            guided = call.rows.guided
            text = torch.cat([text, call.nag.negative.to(text.dtype)])
            pooled = torch.cat([pooled, pooled[guided]])
            timesteps = torch.cat([timesteps, timesteps[guided]])
        return model(
            hidden_states=sample,
            timestep=timesteps,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            joint_attention_kwargs=None if extras.attention_kwargs is None else dict(extras.attention_kwargs),
            return_dict=False,
        )[0]

    def hook_plan(
        self, model: nn.Module, tpg_modules: Iterable[nn.Module], pag_attns: Iterable[nn.Module], nag_attns: Iterable[nn.Module]
    ) -> HookSites:
        """TPG's pre-hook on each block; PAG and NAG in the joint attentions' wrapper (PAG on a dual block's image
        self-attention: the UNet one's); with NAG, the image-stream norms' ``temb`` pre-hook."""
        nag_attns = list(nag_attns)
        transformer = unwrap_module(model)
        norms = [block.norm1 for _, block in _joint_blocks(model).values()] + [transformer.norm_out] if nag_attns else []
        pag_wrappers = tuple((attn, JointGuidanceProcessor if is_joint_attention(attn) else PerturbedSelfAttnProcessor) for attn in pag_attns)
        return HookSites(
            tuple((block, shuffle_tokens) for block in tpg_modules) + tuple((norm, image_stream_temb) for norm in norms),
            pag_wrappers + tuple((attn, JointGuidanceProcessor) for attn in nag_attns),
        )

    def hook_sites(self, model: nn.Module) -> HookSites:
        blocks = [block for _, block in _joint_blocks(model).values()]
        return self.hook_plan(model, blocks, [attn for block in blocks for attn in self.pag_attentions(block)], self.nag_attentions(model))


SD3 = MMDiTFamily()
