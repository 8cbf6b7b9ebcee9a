"""Wan (2.1 / 2.2): diffusers' ``WanTransformer3DModel``, a flow-matching video transformer of one stack of blocks
(``transformer.blocks``: ids b0-bN; Wan2.1 1.3B: b0-b29, 14B: b0-b39), each with a self-attention over the video
tokens (``attn1``, RoPE positions), a cross-attention to the text (``attn2``) and a feed-forward. A guider-only
layout: diffusers' modular Wan loops make the calls.

TPG (experimental: no published reference for Wan) permutes the video tokens entering each selected block: the
flattened ``F * H * W`` sequence after patch embedding, so across frames too (TPG's definition on a flattened
sequence); the text is untouched. Positions live in RoPE, so permuted tokens carry their content to other places and
times. Default ``b4-b10``: SDXL's TPG layers are the transformer blocks at 9-34% of its depth (SD3: j2-j8 of 24); that
span is b3-b10 on the 30 blocks of Wan2.1 1.3B and b4-b13 on the 40 of 14B; ``b4-b10`` is the part of it both depths
share, one fixed string valid on both (13-34% of 1.3B, 10-26% of 14B).

NAG: every block's ``attn2``, with the NAG authors' Wan semantics (``dualguide.wan_nag``): the negative goes through
the transformer's text embedding as theirs does, its K/V computed once per run.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, Tuple

from diffusers.utils.torch_utils import unwrap_module
from torch import Tensor, nn

from ..hooks import HookSites
from ..perturb import shuffle_tokens
from ..wan_nag import WanNAGProcessor, wan_key_value
from .base import BlockLayout, Blocks, backbone_sample


class WanLayout(BlockLayout):
    name = "wan"
    title = "Wan (WanTransformer3DModel)"
    default_tpg_layers = "b4-b10"

    def matches(self, model: nn.Module) -> bool:
        from diffusers import WanTransformer3DModel

        return isinstance(unwrap_module(model), WanTransformer3DModel)

    def blocks(self, model: nn.Module) -> Blocks:
        return {f"b{index}": (f"blocks.{index}", block) for index, block in enumerate(unwrap_module(model).blocks)}

    def tpg_module(self, block: nn.Module) -> nn.Module:
        return block

    def branch_tokens(self, model: nn.Module, args: tuple, kwargs: dict) -> Tuple[int, Dict[nn.Module, int]]:
        """Rows and video tokens of a call on ``hidden_states`` ``[B, C, F, H, W]``: ``F/p_t * H/p_h * W/p_w`` in every block."""
        sample = backbone_sample(args, kwargs)
        transformer = unwrap_module(model)
        if sample.ndim != 5:
            raise ValueError(f"a Wan transformer call takes hidden_states [batch, channels, frames, height, width], got shape {tuple(sample.shape)}")
        tokens = 1
        for size, patch in zip(sample.shape[2:], transformer.config.patch_size):
            tokens *= size // patch
        return sample.shape[0], {block: tokens for block in transformer.blocks}

    def hook_plan(
        self, model: nn.Module, tpg_modules: Iterable[nn.Module], pag_attns: Iterable[nn.Module], nag_attns: Iterable[nn.Module]
    ) -> HookSites:
        """TPG's pre-hook on each selected block, NAG's wrapper on every ``attn2`` (no PAG: the guiders ask for none)."""
        return HookSites(tuple((block, shuffle_tokens) for block in tpg_modules), tuple((attn, WanNAGProcessor) for attn in nag_attns))

    def nag_attentions(self, model: nn.Module) -> FrozenSet[nn.Module]:
        return frozenset(block.attn2 for block in unwrap_module(model).blocks)

    def nag_negative(self, model: nn.Module, attns: FrozenSet[nn.Module], negative: Tensor) -> Tuple[Tensor, Dict[nn.Module, Tuple[Tensor, Tensor]]]:
        """The negative after the transformer's text embedding (``condition_embedder.text_embedder``, as the positive
        gets it in the call), and its K/V heads in every ``attn2``; ``ValueError`` unless it is ``text_dim`` wide."""
        transformer = unwrap_module(model)
        width = transformer.config.text_dim
        if negative.shape[-1] != width:
            raise ValueError(f"nag_negative_prompt_embeds has width {negative.shape[-1]}, the Wan transformer's text embedding takes {width} (text_dim)")
        embedded = transformer.condition_embedder.text_embedder(negative)
        return embedded, {attn: wan_key_value(attn, embedded) for attn in attns}


WAN = WanLayout()
