"""Normalized Attention Guidance (arXiv 2505.21179) as a wrapper of each cross-attention's processor.

For the guided rows (those that use the positive prompt) of a call that asks for NAG, every
``attn2`` computes ``Z+`` with the positive context and ``Z-`` with the NAG negative context from
the same queries, and replaces ``Z+`` by ``nag_extrapolate(Z+, Z-)`` before ``to_out``. Uncond
rows, and every call without NAG, get the wrapped processor's output unchanged. NAG adds no
UNet rows, only K/V.

The wrapper keeps whatever processor it wraps: for diffusers' standard processor it follows the
same arithmetic sharing the queries (fast path); for any other (IP-Adapter, xformers, custom) it
asks that processor for ``Z`` itself, through a view of the module without ``to_out``, so the
processor's own extras (an IP-Adapter's image attention) stay in ``Z+`` and ``Z-``.
"""

from __future__ import annotations

from typing import Tuple

from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor, nn

from . import attention
from .callstate import NAGCall, current_call
from .guidance import nag_extrapolate


class NAGCrossAttnProcessor:
    """Wraps a cross-attention processor; applies NAG to the guided rows of calls that ask for it."""

    def __init__(self, previous) -> None:
        self.previous = previous
        self.call_previous = attention.ProcessorCall(previous)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, ip_adapter_masks=None,
                 **kwargs):  # fmt: skip
        extra = dict(kwargs, temb=temb, ip_adapter_masks=ip_adapter_masks)
        call = current_call()
        nag = None if call is None else call.nag
        guided = None if nag is None or attn not in nag.attns else call.rows.guided
        if guided is None or encoder_hidden_states is None:
            return self.call_previous(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        standard = type(self.previous) is AttnProcessor2_0 and ip_adapter_masks is None and not kwargs
        if standard and attention_mask is None and isinstance(encoder_hidden_states, Tensor):
            return _standard_nag(attn, hidden_states, encoder_hidden_states, temb, guided, nag)
        return self._wrapped_nag(attn, hidden_states, encoder_hidden_states, attention_mask, temb, guided, nag, extra)

    def _wrapped_nag(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, guided: slice, nag: NAGCall, extra):
        """NAG around any processor: ``Z`` of both contexts from the processor itself, then ``to_out``."""
        view = _PreOutputView(attn)
        prepared = attention.prepare(attn, hidden_states, temb)
        merged = _as_tokens(self.call_previous(view, hidden_states, encoder_hidden_states, attention_mask, **extra))
        negative_context = _negative_context(encoder_hidden_states, nag.negative, guided)
        z_negative = _as_tokens(self.call_previous(view, hidden_states[guided], negative_context, None, **extra))
        positive = merged[guided]
        nag_extrapolate(positive, z_negative, nag.scale, nag.tau, nag.alpha, nag.use_l1, out=positive)
        return attention.finish(attn, merged, prepared)


def _standard_nag(attn, hidden_states: Tensor, context: Tensor, temb, guided: slice, nag: NAGCall) -> Tensor:
    """NAG with diffusers' standard attention arithmetic, the queries shared by ``Z+`` and ``Z-``."""
    prepared = attention.prepare(attn, hidden_states, temb)
    query = attention.query_heads(attn, attn.to_q(prepared.hidden_states))
    positive_context = attention.context(attn, prepared.hidden_states, context)
    merged = attention.attend_heads(query, attention.key_heads(attn, attn.to_k(positive_context)),
                                    attention.split_heads(attn, attn.to_v(positive_context)))  # fmt: skip
    cached = nag.cache.get(attn)
    negative_key, negative_value = cached if cached is not None else negative_key_value(attn, nag.negative.to(query.dtype))
    z_negative = attention.attend_heads(query[guided], negative_key, negative_value)  # the guided rows' query heads
    positive = merged[guided]  # a view: the result is written into ``merged`` in place
    nag_extrapolate(positive, z_negative, nag.scale, nag.tau, nag.alpha, nag.use_l1, out=positive)
    return attention.finish(attn, merged, prepared)


def negative_key_value(attn, negative: Tensor) -> Tuple[Tensor, Tensor]:
    """K/V heads of the NAG negative context in ``attn``: the same at every step of a run, so a denoiser
    computes them once per run (``NAGCall.cache``), outside any compiled UNet."""
    context = attention.context(attn, negative, negative)
    return attention.key_heads(attn, attn.to_k(context)), attention.split_heads(attn, attn.to_v(context))


def _negative_context(encoder_hidden_states, negative: Tensor, guided: slice):
    """The guided rows' context with the text replaced by the NAG negative (IP-Adapter image embeds kept)."""
    if isinstance(encoder_hidden_states, tuple):
        text, image_embeds = encoder_hidden_states
        return negative.to(text.dtype), [embeds[guided] for embeds in image_embeds]
    return negative.to(encoder_hidden_states.dtype)


def _as_tokens(output: Tensor) -> Tensor:
    """A processor's ``Z`` as ``[B, N, C]`` (processors give 4D back for 4D inputs)."""
    if output.ndim == 4:
        batch, channels = output.shape[:2]
        return output.reshape(batch, channels, -1).transpose(1, 2)
    return output


class _PreOutputView:
    """An attention module as its processor sees it, minus ``to_out``, the residual and the output rescale:
    the processor then returns ``Z`` (heads merged, before ``to_out``). Everything else is the module's."""

    to_out = (nn.Identity(), nn.Identity())
    residual_connection = False
    rescale_output_factor = 1.0

    def __init__(self, attn) -> None:
        object.__setattr__(self, "_attn", attn)

    def __getattr__(self, name: str):
        return getattr(self._attn, name)
