"""Perturbations of the perturbed branch's rows, installed by context managers.

* ``token_shuffle`` (TPG): permute the image tokens entering each selected
  ``BasicTransformerBlock`` along the token axis, for the TPG rows only; no un-shuffle.
* ``perturbed_self_attention`` (PAG / SoftPAG): in the selected blocks' ``attn1``, the PAG
  rows use ``(1 - beta) softmax(QK^T) V + beta V`` on the selected heads; beta = 1 on all
  heads is PAG's identity attention, computed without the discarded attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import attention
from .batch import GuidanceState
from .hooks import forward_pre_hooks, replaced_processors

Blocks = Sequence[Tuple[str, nn.Module]]


@contextmanager
def token_shuffle(blocks: Blocks, state: GuidanceState) -> Iterator[None]:
    """Shuffle the tokens of the ``tpg`` rows entering each block, with ``state.permutations``."""
    block_index = {id(module): index for index, (_, module) in enumerate(blocks)}

    def shuffle(module: nn.Module, args: tuple, kwargs: dict):
        rows = state.rows.rows("tpg")
        if rows is None:
            return None
        positional = len(args) > 0
        hidden_states = args[0] if positional else kwargs["hidden_states"]
        permutation = state.permutations.get(block_index[id(module)], hidden_states.shape[1], hidden_states.device)
        shuffled = hidden_states[rows][:, permutation]
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            hidden_states = torch.cat([hidden_states[: rows.start], shuffled, hidden_states[rows.stop :]])
        else:
            hidden_states[rows] = shuffled
        if positional:
            return (hidden_states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden_states}

    with forward_pre_hooks([module for _, module in blocks], shuffle):
        yield


class PerturbedSelfAttnProcessor:
    """Self-attention whose ``pag`` rows attend with ``(1 - beta) A + beta I`` on the chosen heads.

    Other rows, and every row while no PAG branch is in the call, go to the processor
    that was installed before.
    """

    def __init__(self, previous, state: GuidanceState, beta: float, heads: Optional[List[int]]) -> None:
        self.previous = previous
        self.state = state
        self.beta = beta
        self.heads = heads

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        rows = self.state.rows.rows("pag")
        if rows is None or encoder_hidden_states is not None or attention_mask is not None:
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        prepared = attention.prepare(attn, hidden_states, temb)
        tokens = prepared.hidden_states
        merged = attn.to_v(tokens)  # PAG rows keep V (identity map); the others are overwritten
        # PAG rows are the trailing rows of a call (BRANCH_ORDER); the rows before them attend normally.
        blends = self.beta < 1.0 or self.heads is not None
        span = slice(0, rows.stop if blends else rows.start)
        if span.stop > 0:
            attended = attention.attend(attn, attn.to_q(tokens[span]), attn.to_k(tokens[span]), merged[span])
            if blends:
                attended[rows] = self._soft_identity(attn, attended[rows], merged[rows])
            merged[span] = attended
        return attention.finish(attn, merged, prepared)

    def _soft_identity(self, attn, attended: Tensor, value: Tensor) -> Tensor:
        """``(1 - beta) attention + beta V`` on the selected heads, attention elsewhere."""
        attended_heads = attention.split_heads(attn, attended)
        value_heads = attention.split_heads(attn, value)
        mixed = torch.lerp(attended_heads, value_heads, self.beta)
        if self.heads is not None:
            selected = torch.zeros(attn.heads, dtype=torch.bool, device=attended.device)
            selected[list(self.heads)] = True
            mixed = torch.where(selected[None, :, None, None], mixed, attended_heads)
        return attention.merge_heads(mixed)


@contextmanager
def perturbed_self_attention(
    blocks: Blocks, state: GuidanceState, beta: float = 1.0, heads: Optional[List[int]] = None
) -> Iterator[None]:
    """Install ``PerturbedSelfAttnProcessor`` on ``attn1`` of each block; restore the previous processors."""
    replacements = {
        module.attn1: (lambda previous: PerturbedSelfAttnProcessor(previous, state, beta, heads)) for _, module in blocks
    }
    with replaced_processors(replacements):
        yield
