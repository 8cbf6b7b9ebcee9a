"""Chroma: diffusers' ``ChromaTransformer2DModel``, Flux.1's blocks (ids j0-jN over the double-stream
``transformer_blocks``, s0-sM over the single-stream ``single_transformer_blocks``; Chroma1: j0-j18, s0-s37) with
T5's attention mask and without CLIP's pooled embeds or a guidance embedding (every block's modulation comes from
the timestep alone). ``FluxFamily`` does the rest: packing, rotary ids, TPG / PAG / NAG sites and semantics.

What differs from Flux:

* Rows carry prompt embeds and T5's mask (``Conditioning.attention_mask``, from ``conditioning.encode_chroma``).
  Each call extends the mask by ones over the image tokens, text first, as ``ChromaPipeline._prepare_attention_mask``
  does; the blocks square it into ``[rows, 1, S, S]`` and attention adds a float mask to the scores (see
  ``conditioning.chroma``), in the guided attentions too (``flux_joint``).
* The transformer joins the text and image streams itself, after the last double block, so a single block's
  input is ``[text, image]``. The single stream's preparation (``flux_joint.single_block_inputs``) is split in two:
  NAG's widened image stream on the last double block's output (``joined_streams``), the text length for PAG / NAG
  at each single block, read from the call (``single_stream_inputs``); TPG on a single block permutes only the
  image tokens after the text (``shuffle_joined_image_tokens``).
* NAG (the NAG authors have no Chroma pipeline; the official Flux semantics carried over): each guided row's
  negative text row comes with the negative's mask and the guided row's timestep. Chroma's modulation depends on
  the timestep only, so a negative row's equals its guided row's.

Default layers are Flux's (``defaults.DEFAULT_LAYERS["chroma"]``): Chroma keeps Flux.1's depth and block layout.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..callstate import current_call
from ..conditioning import Conditioning
from ..defaults import DEFAULT_LAYERS
from ..flux_joint import single_block_inputs
from ..perturb import shuffle_tokens
from .base import CallExtras
from .flux import FluxFamily

# The text tokens of the Chroma call running now: a single block's input joins them and the image tokens.
_TEXT_TOKENS: ContextVar[int] = ContextVar("dualguide_chroma_text_tokens", default=0)


def joined_streams(module: nn.Module, args: tuple, output: Tuple[Tensor, Tensor]):
    """Forward hook of Chroma's last double-stream block, whose output ``(text, image)`` the transformer joins into
    the single stream: with NAG's extra text rows, the image stream widened there (``single_block_inputs``)."""
    text, image = output
    prepared = single_block_inputs(module, (), {"hidden_states": image, "encoder_hidden_states": text})
    return None if prepared is None else (text, prepared[1]["hidden_states"])


def single_stream_inputs(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a Chroma single-stream block: ``single_block_inputs`` on its ``[text, image]`` input split
    at the call's text length, which tells the block's guided attention that length (the rows are already wide)."""
    joined, text = kwargs["hidden_states"], _TEXT_TOKENS.get()
    single_block_inputs(module, args, {**kwargs, "hidden_states": joined[:, text:], "encoder_hidden_states": joined[:, :text]})


def shuffle_joined_image_tokens(module: nn.Module, args: tuple, kwargs: dict):
    """TPG's forward pre-hook on a Chroma single-stream block, whose ``[text, image]`` input ends in the image tokens
    (as many as the block's permutation): ``perturb.shuffle_tokens`` on those, the text as it is."""
    call = current_call()
    permutation = None if call is None or call.tpg is None else call.tpg.permutations.get(module)
    if permutation is None:
        return None
    joined = kwargs["hidden_states"]
    text = joined.shape[1] - permutation.shape[-1]
    shuffled = shuffle_tokens(module, args, {**kwargs, "hidden_states": joined[:, text:]})
    return args, {**kwargs, "hidden_states": torch.cat([joined[:, :text], shuffled[1]["hidden_states"]], dim=1)}


class ChromaFamily(FluxFamily):
    name = "chroma"
    title = "Chroma"
    default_tpg_layers = DEFAULT_LAYERS["chroma"]["tpg"]  # "j5-j18", as Flux
    default_pag_layers = DEFAULT_LAYERS["chroma"]["pag"]  # "j7-j9,s7-s9", as Flux
    pooled_nag_negative = False

    def backbone_type(self):
        from diffusers import ChromaTransformer2DModel

        return ChromaTransformer2DModel

    def check_conditioning(self, cond: Conditioning, name: str) -> None:
        if cond.pooled_embeds is not None or cond.time_ids is not None or cond.guidance is not None:
            raise ValueError(f"{name}: a Chroma transformer takes prompt embeds and T5's attention_mask in each row's Conditioning, no pooled embeds, time_ids or guidance")
        mask = cond.attention_mask
        if mask is None or mask.shape != cond.prompt_embeds.shape[:2]:
            got = "none" if mask is None else list(mask.shape)
            raise ValueError(f"{name}: a Chroma row needs T5's attention_mask [B, L] of its prompt embeds ({list(cond.prompt_embeds.shape[:2])}), got {got}")
        if not (mask.is_floating_point() or mask.dtype == torch.bool):
            raise ValueError(f"{name}: Chroma's attention_mask must be float (ChromaPipeline's 0/1 mask, added to the scores) or boolean, got {mask.dtype}")
        if cond.reference_latents is not None:
            raise ValueError(f"{name}: reference latents are not supported on Chroma yet")

    def run_order(self, model: nn.Module) -> List[str]:
        """The image and text projections, the time embedding and the approximator that makes every block's
        modulation from it, the double- then the single-stream blocks."""
        blocks = (name for name, _ in self.blocks(model).values())
        return ["x_embedder", "time_text_embed", "distilled_guidance_layer", "context_embedder", *blocks]

    def call(self, model: nn.Module, sample: Tensor, timesteps: Tensor, cond: Conditioning, extras: CallExtras) -> Tensor:
        """Flux's call, its text length known to the single blocks' hooks."""
        token = _TEXT_TOKENS.set(cond.prompt_embeds.shape[1])
        try:
            return super().call(model, sample, timesteps, cond, extras)
        finally:
            _TEXT_TOKENS.reset(token)

    def text_inputs(self, model: nn.Module, cond: Conditioning, timesteps: Tensor, image_tokens: int) -> Dict[str, object]:
        """Prompt embeds, timesteps and ``attention_mask`` ``[rows, L + image_tokens]`` (T5's mask, then ones, as
        ``ChromaPipeline`` builds it; a float mask in the embeds' dtype, 0 and 1 exact in any); with NAG, the guided
        rows' negative text, its mask and their timesteps appended."""
        text, mask = cond.prompt_embeds, cond.attention_mask
        call = current_call()
        if call is not None and call.nag is not None:
            negative = call.nag.negative
            text = torch.cat([text, negative.prompt_embeds.to(text.dtype)])
            mask = torch.cat([mask, negative.attention_mask.to(mask.dtype)])
            timesteps = torch.cat([timesteps, timesteps[call.rows.guided]])
        if mask.is_floating_point():
            mask = mask.to(text.dtype)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], image_tokens)], dim=1)
        return {"encoder_hidden_states": text, "attention_mask": mask, "timestep": timesteps}

    def stream_hooks(self, transformer: nn.Module, tpg_modules: List[nn.Module], single_guided: bool) -> Tuple[list, list]:
        """TPG's pre-hooks (on a single block, the image tokens after the text only); when PAG or NAG acts in a single
        block, the single stream's preparation: ``joined_streams`` on the last double block, ``single_stream_inputs``
        on each single block."""
        singles = list(transformer.single_transformer_blocks)
        joined = set(singles)
        pre_hooks = [(block, shuffle_joined_image_tokens if block in joined else shuffle_tokens) for block in tpg_modules]
        if not single_guided:
            return pre_hooks, []
        return pre_hooks + [(block, single_stream_inputs) for block in singles], [(transformer.transformer_blocks[-1], joined_streams)]


CHROMA = ChromaFamily()
