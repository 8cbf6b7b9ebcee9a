"""Pieces of a diffusers ``Attention`` forward, shared by the guidance processors.

They follow the arithmetic of diffusers' ``AttnProcessor2_0`` step by step so that a
row that no guidance touches gets exactly the standard attention output.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor


class ProcessorCall:
    """Calls a diffusers attention processor with only the keywords its ``__call__`` accepts.

    Processors differ: ``SlicedAttnProcessor`` takes no ``temb``, IP-Adapter processors take ``scale`` and
    ``ip_adapter_masks``, ``AttnProcessor2_0`` and xFormers' take ``*args, **kwargs``. The signature is read here,
    not per call (a compiled UNet traces the call without a graph break), and once per processor class.
    """

    def __init__(self, processor: Callable[..., Any]) -> None:
        self.processor = processor
        self.takes_any, self.names = _accepted_keywords(processor.__call__)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, **extra: Any) -> Tensor:
        """``processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=..., **accepted extras)``;
        an extra left at ``None`` (``temb``, ``ip_adapter_masks``) is its default and is not passed."""
        given: Dict[str, Any] = {name: value for name, value in extra.items()
                                 if value is not None and (self.takes_any or name in self.names)}  # fmt: skip
        return self.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **given)


# The function behind a processor class's ``__call__`` -> what ``_accepted_keywords`` found for it.
_ACCEPTED: Dict[Callable[..., Any], Tuple[bool, FrozenSet[str]]] = {}


def _accepted_keywords(call: Callable[..., Any]) -> Tuple[bool, FrozenSet[str]]:
    """Whether ``call`` takes ``**kwargs``, and the names it takes; cached per class for bound methods."""
    function = getattr(call, "__func__", None)
    if function is not None and function in _ACCEPTED:
        return _ACCEPTED[function]
    parameters = inspect.signature(call).parameters.values()
    accepted = (any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters),
                frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL))  # fmt: skip
    if function is not None:
        _ACCEPTED[function] = accepted
    return accepted


@dataclass
class AttentionInput:
    """Hidden states flattened to ``[B, N, C]`` plus what ``finish`` needs to undo that."""

    hidden_states: Tensor
    residual: Tensor
    spatial_shape: Optional[Tuple[int, int, int, int]]


def prepare(attn, hidden_states: Tensor, temb: Optional[Tensor] = None) -> AttentionInput:
    """Spatial norm, 4D -> tokens, group norm: everything before the projections."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial_shape = None
    if hidden_states.ndim == 4:
        spatial_shape = tuple(hidden_states.shape)
        batch, channels, height, width = spatial_shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return AttentionInput(hidden_states, residual, spatial_shape)


def context(attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor]) -> Tensor:
    """The key/value source: the text context (normed if the module asks) or the tokens themselves."""
    if encoder_hidden_states is None:
        return hidden_states
    if attn.norm_cross:
        return attn.norm_encoder_hidden_states(encoder_hidden_states)
    return encoder_hidden_states


def split_heads(attn, projected: Tensor) -> Tensor:
    """``[B, N, H*d]`` -> ``[B, H, N, d]``."""
    batch = projected.shape[0]
    return projected.view(batch, -1, attn.heads, projected.shape[-1] // attn.heads).transpose(1, 2)


def merge_heads(heads: Tensor) -> Tensor:
    """``[B, H, N, d]`` -> ``[B, N, H*d]``."""
    batch, num_heads, tokens, head_dim = heads.shape
    return heads.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)


def query_heads(attn, query_states: Tensor) -> Tensor:
    """Projected queries ``[B, N, H*d]`` -> ``[B, H, N, d]``, with the module's query norm."""
    query = split_heads(attn, query_states)
    return query if attn.norm_q is None else attn.norm_q(query)


def key_heads(attn, key_states: Tensor) -> Tensor:
    """Projected keys ``[B, N, H*d]`` -> ``[B, H, N, d]``, with the module's key norm."""
    key = split_heads(attn, key_states)
    return key if attn.norm_k is None else attn.norm_k(key)


def attend_heads(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Attention of ``[B, H, N, d]`` heads; heads merged, before ``to_out``."""
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return merge_heads(out).to(query.dtype)


def attend(attn, query_states: Tensor, key_states: Tensor, value_states: Tensor) -> Tensor:
    """Multi-head attention of already projected ``[B, N, H*d]`` inputs; heads merged, before ``to_out``."""
    return attend_heads(query_heads(attn, query_states), key_heads(attn, key_states), split_heads(attn, value_states))


def finish(attn, merged: Tensor, prepared: AttentionInput) -> Tensor:
    """``to_out``, back to 4D if needed, residual connection and output rescale."""
    out = attn.to_out[1](attn.to_out[0](merged))
    if prepared.spatial_shape is not None:
        out = out.transpose(-1, -2).reshape(prepared.spatial_shape)
    if attn.residual_connection:
        out = out + prepared.residual
    return out / attn.rescale_output_factor
