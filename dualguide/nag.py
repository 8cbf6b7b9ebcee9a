"""Normalized Attention Guidance (arXiv 2505.21179) as a cross-attention processor.

For the guided rows (those that use the positive prompt) every ``attn2`` computes
``Z+`` with the positive context and ``Z-`` with the NAG negative context from the
same queries, and replaces ``Z+`` by ``nag_extrapolate(Z+, Z-)`` before ``to_out``.
Uncond rows get the standard attention. NAG adds no UNet rows, only K/V.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import Tensor, nn

from . import attention
from .batch import GuidanceState
from .guidance import nag_extrapolate
from .hooks import replaced_processors


class NAGCrossAttnProcessor:
    """Cross-attention with NAG on the guided rows of the call in flight.

    While the state holds no NAG negative (NAG outside its interval) every call goes
    to the processor that was installed before.
    """

    def __init__(self, previous, state: GuidanceState, scale: float, tau: float, alpha: float, use_l1: bool) -> None:
        self.previous = previous
        self.state = state
        self.scale = scale
        self.tau = tau
        self.alpha = alpha
        self.use_l1 = use_l1
        self._cached_for: Optional[Tensor] = None
        self._cached_key_value: Optional[Tuple[Tensor, Tensor]] = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        guided = self.state.rows.guided
        negative = self.state.nag_negative
        if negative is None or guided is None or encoder_hidden_states is None or attention_mask is not None:
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        prepared = attention.prepare(attn, hidden_states, temb)
        query = attn.to_q(prepared.hidden_states)
        positive_context = attention.context(attn, prepared.hidden_states, encoder_hidden_states)
        merged = attention.attend(attn, query, attn.to_k(positive_context), attn.to_v(positive_context))
        negative_key, negative_value = self._negative_key_value(attn, negative, query.dtype)
        z_negative = attention.attend_heads(attention.query_heads(attn, query[guided]), negative_key, negative_value)
        positive = merged[guided]  # a view: the result is written into ``merged`` in place
        nag_extrapolate(positive, z_negative, self.scale, self.tau, self.alpha, self.use_l1, out=positive)
        return attention.finish(attn, merged, prepared)

    def _negative_key_value(self, attn, negative: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """K/V heads of the NAG negative: the same at every step of a run, so computed once per negative tensor."""
        if self._cached_key_value is None or self._cached_for is not negative:
            negative_context = negative.to(dtype)
            context = attention.context(attn, negative_context, negative_context)
            key_value = attention.key_heads(attn, attn.to_k(context)), attention.split_heads(attn, attn.to_v(context))
            self._cached_for, self._cached_key_value = negative, key_value
        return self._cached_key_value


@contextmanager
def normalized_attention_guidance(
    unet: nn.Module, state: GuidanceState, scale: float, tau: float, alpha: float, use_l1: bool = True
) -> Iterator[None]:
    """Install ``NAGCrossAttnProcessor`` on every ``attn2`` of ``unet``; restore the previous processors."""
    replacements = {
        module.attn2: (lambda previous: NAGCrossAttnProcessor(previous, state, scale, tau, alpha, use_l1))
        for module in unet.modules()
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None
    }
    with replaced_processors(replacements):
        yield
