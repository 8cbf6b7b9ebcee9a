"""Perturbations of the perturbed branch's rows: thin hooks whose settings come from the call in flight.

* ``shuffle_tokens`` (TPG), a forward pre-hook of each selected TPG module (a transformer block): the
  image tokens of the TPG rows are permuted along the token axis by the call's permutation for
  the block (drawn before the call; the family adapter's ``token_counts`` tells its length); no un-shuffle.
* ``PerturbedSelfAttnProcessor`` (PAG / SoftPAG), a wrapper of ``attn1``'s processor: the PAG rows
  use ``(1 - beta) softmax(QK^T) V + beta V`` on the selected heads (beta = 1 on all heads is
  PAG's identity attention, computed without the discarded attention); every other row goes to
  the wrapped processor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import attention
from .callstate import PAGCall, current_call


def shuffle_tokens(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: permute the tokens of the TPG rows entering ``module`` when the call asks for it."""
    call = current_call()
    tpg = None if call is None else call.tpg
    permutation = None if tpg is None else tpg.permutations.get(module)
    if permutation is None:
        return None
    positional = bool(args)
    hidden_states = args[0] if positional else kwargs["hidden_states"]
    if permutation.shape[-1] != hidden_states.shape[1]:
        raise RuntimeError(f"TPG: a block got {hidden_states.shape[1]} tokens, its permutation has {permutation.shape[-1]}")
    # A Flux single-stream block's image rows carry NAG's negative partners after the call's rows: they are shuffled too.
    count = call.rows.count
    for rows in call.rows.with_partners("tpg", count if hidden_states.shape[0] > count else None):
        hidden_states = _shuffled(hidden_states, rows, permutation)
    if positional:
        return (hidden_states, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden_states}


def shuffle_token_span(module: nn.Module, args: tuple, kwargs: dict, start: int, stop: int):
    """``shuffle_tokens`` on the block input's tokens ``start`` to ``stop`` only (a block whose sequence holds other
    tokens beside the generated image tokens: text before them, reference images or padding after them); the tokens
    outside the span enter the block as they are."""
    hidden_states = args[0] if args else kwargs["hidden_states"]
    if start == 0 and stop == hidden_states.shape[1]:
        return shuffle_tokens(module, args, kwargs)
    shuffled = shuffle_tokens(module, (), {"hidden_states": hidden_states[:, start:stop]})
    if shuffled is None:
        return None
    tokens = torch.cat([hidden_states[:, :start], shuffled[1]["hidden_states"], hidden_states[:, stop:]], dim=1)
    return ((tokens, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": tokens})


def _shuffled(hidden_states: Tensor, rows: slice, permutation: Tensor) -> Tensor:
    """``hidden_states`` with the tokens of ``rows`` permuted (in place at inference)."""
    selected = hidden_states[rows]
    if permutation.ndim == 1:
        shuffled = selected[:, permutation]
    else:
        shuffled = torch.gather(selected, 1, permutation[:, :, None].expand(-1, -1, selected.shape[-1]))
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        return torch.cat([hidden_states[: rows.start], shuffled, hidden_states[rows.stop :]])
    hidden_states[rows] = shuffled
    return hidden_states


class PerturbedSelfAttnProcessor:
    """Wraps a self-attention processor; the PAG rows of a call that selects this module attend with
    ``(1 - beta) A + beta I``, all other rows (and all other calls) go to the wrapped processor."""

    def __init__(self, previous) -> None:
        self.previous = previous
        self.call_previous = attention.ProcessorCall(previous)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, ip_adapter_masks=None,
                 **kwargs):  # fmt: skip
        extra = dict(kwargs, temb=temb, ip_adapter_masks=ip_adapter_masks)
        call = current_call()
        pag = None if call is None else call.pag
        rows = None if pag is None or attn not in pag.attns else call.rows.rows("pag")
        if rows is None or encoder_hidden_states is not None or attention_mask is not None:
            return self.call_previous(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        # PAG rows are the trailing rows of a call (BRANCH_ORDER); the rows before them attend normally.
        perturbed = _perturbed_attention(attn, hidden_states[rows], temb, pag)
        if rows.start == 0:
            return perturbed
        plain = self.call_previous(attn, hidden_states[: rows.start], None, None, **extra)
        return torch.cat([plain, perturbed])


def _perturbed_attention(attn, hidden_states: Tensor, temb, pag: PAGCall) -> Tensor:
    """Self-attention output of the PAG rows: identity map (PAG) or its blend with the attention (SoftPAG)."""
    prepared = attention.prepare(attn, hidden_states, temb)
    tokens = prepared.hidden_states
    value = attn.to_v(tokens)
    if pag.beta < 1.0 or pag.heads is not None:
        attended = attention.attend(attn, attn.to_q(tokens), attn.to_k(tokens), value)
        value = _soft_identity(attn, attended, value, pag)
    return attention.finish(attn, value, prepared)


def _soft_identity(attn, attended: Tensor, value: Tensor, pag: PAGCall) -> Tensor:
    """``(1 - beta) attention + beta V`` on the selected heads, attention elsewhere."""
    attended_heads = attention.split_heads(attn, attended)
    value_heads = attention.split_heads(attn, value)
    mixed = torch.lerp(attended_heads, value_heads, pag.beta)
    if pag.heads is not None:
        selected = torch.zeros(attn.heads, dtype=torch.bool, device=attended.device)
        selected[list(pag.heads)] = True
        mixed = torch.where(selected[None, :, None, None], mixed, attended_heads)
    return attention.merge_heads(mixed)
