"""Guidance inside MMDiT joint attention (SD3 / SD3.5): PAG / SoftPAG and NAG on the rows a call asks for.

A joint attention attends over the image tokens and the text tokens of each row together.

* PAG (diffusers' ``PAGJointAttnProcessor2_0`` semantics): the PAG rows' image tokens attend to themselves
  only among the image tokens (the image-image block of the attention map is the identity; image-text,
  text-image and text-text attention stay), SoftPAG blending ``(1 - beta)`` of the plain attention with
  ``beta`` of it on the selected heads. Unlike diffusers' PAG processors, the module's query / key norms
  (SD3.5's ``qk_norm``) are applied, as in every other row.
* NAG (the official ``NAGJointAttnProcessor2_0`` semantics): the text stream carries one extra row per guided
  row, the NAG negative text (the family adapter appends them). Each guided row's image tokens attend once
  with their own text and once, as the extra row, with the negative text; the image-token outputs are
  extrapolated (``nag_extrapolate``) before ``to_out``; the extra rows' text outputs continue through the
  blocks. ``image_stream_temb`` gives the image stream's adaptive norms the image rows' own ``temb``.

Both act in ``JointGuidanceProcessor``, which wraps diffusers' ``JointAttnProcessor2_0``; calls without
guidance for the module go to the wrapped processor unchanged.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import Tensor, nn

from . import attention
from .callstate import NAGCall, PAGCall, current_call
from .guidance import nag_extrapolate
from .rows import CallRows


def is_joint_attention(attn: nn.Module) -> bool:
    """Whether ``attn`` is a joint text-image attention (it projects a second, text, stream)."""
    return getattr(attn, "add_q_proj", None) is not None


class JointGuidanceProcessor:
    """Wraps a joint attention's processor; PAG / NAG on the rows of calls that select this module."""

    def __init__(self, previous) -> None:
        self.previous = previous
        self.call_previous = attention.ProcessorCall(previous)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None, attention_mask=None, **kwargs):
        call = current_call()
        pag = None if call is None or call.pag is None or attn not in call.pag.attns else call.pag
        nag = None if call is None or call.nag is None or attn not in call.nag.attns else call.nag
        if (pag is None and nag is None) or encoder_hidden_states is None:
            return self.call_previous(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if type(self.previous) is not JointAttnProcessor2_0 or attention_mask is not None:
            raise RuntimeError(
                f"PAG and NAG on SD3 joint attention work with diffusers' JointAttnProcessor2_0, this attention has "
                f"{type(self.previous).__name__}; restore it with pipe.transformer.set_attn_processor(JointAttnProcessor2_0())"
            )
        return guided_joint_attention(attn, hidden_states, encoder_hidden_states, call.rows, pag, nag)


def guided_joint_attention(attn, image: Tensor, text: Tensor, rows: CallRows, pag: Optional[PAGCall], nag: Optional[NAGCall]):
    """``JointAttnProcessor2_0``'s arithmetic with PAG on the PAG rows and NAG on the guided rows.

    ``image``: ``[R, N, C]``; ``text``: ``[R, M, C]``, or ``[R + G, M, C]`` with NAG (the negative text of the
    ``G`` guided rows last). Returns ``(image output [R], text output [R (+ G)])``."""
    count = image.shape[0]
    guided = rows.guided
    if nag is not None:
        if guided is None or text.shape[0] != count + guided.stop - guided.start:
            raise RuntimeError(f"NAG: the text stream has {text.shape[0]} rows for {count} image rows; expected one negative row per guided row")
        image = torch.cat([image, image[guided]])
    query = torch.cat([attention.query_heads(attn, attn.to_q(image)), _added_heads(attn, attn.add_q_proj(text), attn.norm_added_q)], dim=2)
    key = torch.cat([attention.key_heads(attn, attn.to_k(image)), _added_heads(attn, attn.add_k_proj(text), attn.norm_added_k)], dim=2)
    value = torch.cat([attention.split_heads(attn, attn.to_v(image)), attention.split_heads(attn, attn.add_v_proj(text))], dim=2)
    heads = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    if pag is not None:
        for perturbed in pag_rows(rows, count, nag is not None):
            heads[perturbed] = perturbed_heads(query[perturbed], key[perturbed], value[perturbed], heads[perturbed], slice(0, image.shape[1]), pag)
    merged = attention.merge_heads(heads).to(query.dtype)
    tokens = image.shape[1]
    image_out, text_out = merged[:, :tokens], merged[:, tokens:]
    if nag is not None:
        positive = image_out[guided]  # a view: the result is written into ``image_out``
        nag_extrapolate(positive, image_out[count:], nag.scale, nag.tau, nag.alpha, nag.use_l1, out=positive)
        image_out = image_out[:count]
    image_out = attn.to_out[1](attn.to_out[0](image_out))
    if not attn.context_pre_only:
        text_out = attn.to_add_out(text_out)
    return image_out, text_out


def _added_heads(attn, projected: Tensor, norm: Optional[nn.Module]) -> Tensor:
    heads = attention.split_heads(attn, projected)
    return heads if norm is None else norm(heads)


def pag_rows(rows: CallRows, count: int, with_nag: bool) -> List[slice]:
    """The PAG rows, and with NAG their negative partners (``CallRows.with_partners``)."""
    return rows.with_partners("pag", count if with_nag else None)


def perturbed_heads(query: Tensor, key: Tensor, value: Tensor, plain: Tensor, image: slice, pag: PAGCall,
                    attention_mask: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """Attention heads ``[rows, heads, tokens, dim]`` with the image-image block of the map (the tokens ``image``)
    replaced by the identity (PAG), blended with the ``plain`` heads by ``beta`` on the selected heads (SoftPAG).
    ``attention_mask`` (``[rows, 1, tokens, tokens]``, Chroma's) applies as in the plain attention: a float mask is
    added to the scores, a boolean one hides."""
    total = query.shape[2]
    mask = torch.zeros(total, total, dtype=query.dtype, device=query.device)
    mask[image, image] = float("-inf")
    mask[image, image].fill_diagonal_(0)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(~attention_mask, float("-inf"))
        mask = mask + attention_mask
    perturbed = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if pag.beta < 1.0:
        perturbed = torch.lerp(plain, perturbed, pag.beta)
    if pag.heads is not None:
        selected = torch.zeros(query.shape[1], dtype=torch.bool, device=query.device)
        selected[list(pag.heads)] = True
        perturbed = torch.where(selected[None, :, None, None], perturbed, plain)
    return perturbed


def image_stream_temb(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of an image-stream adaptive norm: with NAG's extra text rows, ``temb`` has more rows than
    the image stream; each image row's own ``temb`` comes first (the official pipeline's truncated norms)."""
    call = current_call()
    if call is None or call.nag is None:
        return None
    rows = (args[0] if args else kwargs["hidden_states"]).shape[0]
    if "emb" in kwargs and kwargs["emb"] is not None and kwargs["emb"].shape[0] > rows:
        return args, {**kwargs, "emb": kwargs["emb"][:rows]}
    if len(args) > 1 and args[1].shape[0] > rows:
        return (args[0], args[1][:rows], *args[2:]), kwargs
    return None
