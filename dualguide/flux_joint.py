"""Guidance inside Flux's attentions (Flux.1 dev / schnell / Kontext, Chroma): PAG / SoftPAG and NAG on the rows a
call asks for, with the official NAG Flux semantics.

Flux runs two kinds of blocks. A double-stream block attends over ``[text, image]`` tokens with separate text and
image projections; a single-stream block (diffusers >= 0.35 concatenates the streams inside the block) attends
over the concatenated ``[text, image]`` tokens with one set of projections. Rotary position embeddings of the
text and image ids are applied to queries and keys in both.

* NAG (the NAG authors' ``NAGFluxAttnProcessor2_0`` and ``NAGFluxTransformer2DModel``): the text stream carries
  one extra row per guided row, the NAG negative text, with its own pooled embeds in ``temb`` (the family adapter
  appends them). In a double block each guided row's image tokens attend once with their own text and once, as
  the extra row, with the negative text; the image-token outputs are extrapolated (L2 there) before ``to_out``.
  At the first single block the image stream is widened by a copy of each guided row's image tokens
  (``single_block_inputs``), so the extra rows run the single blocks with their own ``temb`` as the official
  transformer's tiled rows do; in each single attention the guided rows' image-token outputs are extrapolated
  against their partners' and both take the result. ``output_rows`` drops the extra rows before ``norm_out``;
  the double blocks' image-stream norms take the image rows' own ``temb`` (``joint.image_stream_temb``).
* PAG (the joint semantics used for SD3): the PAG rows' image tokens attend to themselves only among the image
  tokens; image-text, text-image and text-text attention stay.
* Kontext's reference-image tokens follow the generated image tokens in the image stream (``reference_tokens``
  says how many for the call running now). They are never guided: TPG permutes the generated tokens only
  (``shuffle_generated_tokens``), PAG's identity covers the generated tokens' block of the map, NAG extrapolates
  the generated tokens' outputs only.

``FluxGuidanceProcessor`` wraps diffusers' ``FluxAttnProcessor``; calls without guidance for the module go to the
wrapped processor unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention
from .callstate import NAGCall, PAGCall, current_call
from .guidance import nag_extrapolate
from .joint import pag_rows, perturbed_heads
from .perturb import shuffle_token_span
from .rows import CallRows

# The text tokens of the single-stream block running now (its attention sees only the concatenated tokens).
_TEXT_TOKENS: ContextVar[int] = ContextVar("dualguide_flux_text_tokens", default=0)
# Kontext's reference-image tokens after the generated image tokens in the transformer call running now.
_REFERENCE_TOKENS: ContextVar[int] = ContextVar("dualguide_flux_reference_tokens", default=0)


@contextmanager
def reference_tokens(count: int) -> Iterator[None]:
    """The transformer call inside carries ``count`` reference-image tokens after its generated image tokens."""
    token = _REFERENCE_TOKENS.set(count)
    try:
        yield
    finally:
        _REFERENCE_TOKENS.reset(token)


def _generated(image_tokens: Tensor) -> Tensor:
    """The generated image tokens of ``[rows, tokens, C]`` image tokens (a view): all but the trailing reference ones."""
    return image_tokens[:, : image_tokens.shape[1] - _REFERENCE_TOKENS.get()]


def shuffle_generated_tokens(module: nn.Module, args: tuple, kwargs: dict):
    """TPG's forward pre-hook on a Flux block (``perturb.shuffle_tokens``) on the generated image tokens only;
    Kontext's reference tokens after them enter the block as they are."""
    return shuffle_token_span(module, args, kwargs, 0, kwargs["hidden_states"].shape[1] - _REFERENCE_TOKENS.get())


def single_block_inputs(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a single-stream block: records its text length for the attention and, with NAG's extra
    text rows, widens the image stream by a copy of each guided row (the official transformer's tiling)."""
    call = current_call()
    if call is None or (call.nag is None and call.pag is None):
        return None
    image, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    _TEXT_TOKENS.set(text.shape[1])
    if call.nag is None or image.shape[0] == text.shape[0]:
        return None
    return args, {**kwargs, "hidden_states": torch.cat([image, image[call.rows.guided]])}


def output_rows(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the output norm: only the call's own rows (and their ``temb``) leave the transformer."""
    call = current_call()
    if call is None or call.nag is None:
        return None
    count = call.rows.count
    hidden_states, temb = args if len(args) == 2 else (args[0], kwargs.pop("conditioning_embedding"))
    return (hidden_states[:count], temb[:count]), kwargs


class FluxGuidanceProcessor:
    """Wraps a Flux attention's processor; PAG / NAG on the rows of calls that select this module."""

    def __init__(self, previous) -> None:
        self.previous = previous
        self.call_previous = attention.ProcessorCall(previous)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):  # fmt: skip
        call = current_call()
        pag = None if call is None or call.pag is None or attn not in call.pag.attns else call.pag
        nag = None if call is None or call.nag is None or attn not in call.nag.attns else call.nag
        if pag is None and nag is None:
            return self.call_previous(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=image_rotary_emb, **kwargs)
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        if type(self.previous) is not FluxAttnProcessor or getattr(attn, "fused_projections", False):
            raise RuntimeError(
                f"PAG and NAG on Flux attention work with diffusers' FluxAttnProcessor and unfused projections, this "
                f"attention has {type(self.previous).__name__}; restore it with pipe.transformer.set_attn_processor(FluxAttnProcessor())"
            )
        if encoder_hidden_states is None:
            return guided_single_attention(attn, hidden_states, _TEXT_TOKENS.get(), image_rotary_emb, call.rows, pag, nag, attention_mask)
        return guided_double_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb, call.rows, pag, nag, attention_mask)


def _heads(attn, projected: Tensor, norm: Optional[nn.Module]) -> Tensor:
    """``[rows, tokens, heads, head_dim]`` (diffusers' Flux layout), normed per head."""
    heads = projected.unflatten(-1, (-1, attn.head_dim))
    return heads if norm is None else norm(heads)


def _attend(attn, query: Tensor, key: Tensor, value: Tensor, rotary, text_tokens: int, rows: CallRows, count: int,
            pag: Optional[PAGCall], with_nag: bool, mask: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """Rotary embeddings, attention over ``[text, image]`` tokens (PAG on the PAG rows and their NAG partners), heads
    merged: ``[rows, tokens, inner]``. ``mask`` (Chroma's ``[rows, 1, tokens, tokens]``) goes to the attention as the
    wrapped processor hands it: a float mask is added to the scores, a boolean one hides."""
    from diffusers.models.embeddings import apply_rotary_emb

    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    heads = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if pag is not None:
        image = slice(text_tokens, query.shape[2] - _REFERENCE_TOKENS.get())  # the generated tokens
        for perturbed in pag_rows(rows, count, with_nag):
            row_mask = None if mask is None else mask[perturbed]
            heads[perturbed] = perturbed_heads(query[perturbed], key[perturbed], value[perturbed], heads[perturbed], image, pag, row_mask)
    return heads.transpose(1, 2).flatten(2, 3).to(query.dtype)


def _guide(image_out: Tensor, rows: CallRows, count: int, nag: NAGCall) -> None:
    """NAG on the guided rows' generated image-token outputs against their partners' (after ``count``), in place (L2 or
    L1 as set); Kontext's reference tokens keep their outputs."""
    generated = _generated(image_out)
    positive = generated[rows.guided]
    nag_extrapolate(positive, generated[count:], nag.scale, nag.tau, nag.alpha, nag.use_l1, out=positive)


def guided_double_attention(attn, image: Tensor, text: Tensor, rotary, rows: CallRows, pag: Optional[PAGCall],
                            nag: Optional[NAGCall], mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """``FluxAttnProcessor``'s double-stream arithmetic with PAG and NAG. ``image``: ``[R, N, C]``; ``text``:
    ``[R, L, C]``, or ``[R + G, L, C]`` with NAG (the negative text of the ``G`` guided rows last). Returns
    ``(image output [R], text output [R (+ G)])``."""
    count = image.shape[0]
    if nag is not None and (rows.guided is None or text.shape[0] != count + rows.guided.stop - rows.guided.start):
        raise RuntimeError(f"NAG: the text stream has {text.shape[0]} rows for {count} image rows; expected one negative row per guided row")

    def image_heads(projection: nn.Module, norm: Optional[nn.Module]) -> Tensor:
        """The image tokens' heads, projected once; with NAG the guided rows' again for their negative partners."""
        heads = _heads(attn, projection(image), norm)
        return heads if nag is None else torch.cat([heads, heads[rows.guided]])

    query = torch.cat([_heads(attn, attn.add_q_proj(text), attn.norm_added_q), image_heads(attn.to_q, attn.norm_q)], dim=1)
    key = torch.cat([_heads(attn, attn.add_k_proj(text), attn.norm_added_k), image_heads(attn.to_k, attn.norm_k)], dim=1)
    value = torch.cat([_heads(attn, attn.add_v_proj(text), None), image_heads(attn.to_v, None)], dim=1)
    merged = _attend(attn, query, key, value, rotary, text.shape[1], rows, count, pag, nag is not None, mask)
    text_out, image_out = merged[:, : text.shape[1]], merged[:, text.shape[1] :]
    if nag is not None:
        _guide(image_out, rows, count, nag)
        image_out = image_out[:count]
    return attn.to_out[1](attn.to_out[0](image_out.contiguous())), attn.to_add_out(text_out.contiguous())


def guided_single_attention(attn, tokens: Tensor, text_tokens: int, rotary, rows: CallRows, pag: Optional[PAGCall],
                            nag: Optional[NAGCall], mask: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """``FluxAttnProcessor``'s single-stream arithmetic with PAG and NAG. ``tokens``: ``[R (+ G), L + N, C]``, the
    text tokens first; with NAG the ``G`` partner rows last, whose image-token outputs become their guided row's."""
    count = rows.count
    with_nag = nag is not None
    if with_nag and tokens.shape[0] != count + rows.guided.stop - rows.guided.start:
        raise RuntimeError(f"NAG: a single-stream block has {tokens.shape[0]} rows for {count} rows; expected one negative row per guided row")
    query, key, value = _heads(attn, attn.to_q(tokens), attn.norm_q), _heads(attn, attn.to_k(tokens), attn.norm_k), _heads(attn, attn.to_v(tokens), None)
    merged = _attend(attn, query, key, value, rotary, text_tokens, rows, count, pag, with_nag, mask)
    if with_nag:
        image_out = merged[:, text_tokens:]
        _guide(image_out, rows, count, nag)
        image_out[count:] = image_out[rows.guided]
    return merged
