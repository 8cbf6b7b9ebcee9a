"""Normalized Attention Guidance on Wan's cross-attentions (diffusers ``WanAttention`` ``attn2``), with the NAG
authors' Wan semantics (their ``NAGWanAttnProcessor2_0``).

For the guided rows of a call that asks for NAG, ``Z+`` attends to the call's text and ``Z-`` to the NAG negative
from the same queries; ``Z+`` becomes ``nag_extrapolate_wan(Z+, Z-)`` (their clipping rule), and only then is an
I2V model's image attention (``add_k_proj``: keys of the call's own image embeds, the positive rows') added, before
``to_out``. The negative's K/V heads are fixed for a run: ``wan_key_value`` of the negative after the
transformer's text embedding (``condition_embedder.text_embedder``, row-wise and independent of the timestep), as
their pipeline's extra encoder rows reach ``attn2``. Every other row and call goes to the wrapped processor.
"""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from .attention import attend_heads, split_heads
from .callstate import NAGCall, current_call
from .guidance import nag_extrapolate_wan

TEXT_TOKENS = 512  # an I2V cross-attention's context: image tokens, then the last 512 (text), as diffusers splits it


class WanNAGProcessor:
    """Wraps a ``WanAttention`` cross-attention's processor; applies NAG to the guided rows of calls that ask for it."""

    def __init__(self, previous) -> None:
        self.previous = previous

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs) -> Tensor:
        call = current_call()
        nag = None if call is None else call.nag
        guided = None if nag is None or attn not in nag.attns else call.rows.guided
        if guided is None or encoder_hidden_states is None or attention_mask is not None or kwargs:
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        return _wan_nag(attn, hidden_states, encoder_hidden_states, guided, nag)


def _wan_nag(attn, hidden_states: Tensor, context: Tensor, guided: slice, nag: NAGCall) -> Tensor:
    """The cross-attention with NAG on the ``guided`` rows, the queries shared by ``Z+`` and ``Z-``."""
    image = None
    if attn.add_k_proj is not None:
        image, context = context[:, : context.shape[1] - TEXT_TOKENS], context[:, context.shape[1] - TEXT_TOKENS :]
    query = split_heads(attn, attn.norm_q(attn.to_q(hidden_states)))
    merged = attend_heads(query, *wan_key_value(attn, context))
    cached = nag.cache.get(attn)
    z_negative = attend_heads(query[guided], *(cached if cached is not None else wan_key_value(attn, nag.negative.to(query.dtype))))
    merged[guided] = nag_extrapolate_wan(merged[guided], z_negative, nag.scale, nag.tau, nag.alpha, nag.use_l1)
    if image is not None:
        key_image = split_heads(attn, attn.norm_added_k(attn.add_k_proj(image)))
        merged = merged + attend_heads(query, key_image, split_heads(attn, attn.add_v_proj(image)))
    return attn.to_out[1](attn.to_out[0](merged))


def wan_key_value(attn, context: Tensor) -> Tuple[Tensor, Tensor]:
    """K/V heads of a text context (after the transformer's text embedding) in the cross-attention ``attn``. The NAG
    negative's are the same at every step of a run: a guider computes them once per run (``NAGCall.cache``)."""
    return split_heads(attn, attn.norm_k(attn.to_k(context))), split_heads(attn, attn.to_v(context))
