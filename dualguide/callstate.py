"""The guided UNet call in flight, held in a ``ContextVar``.

A denoiser sets its call's state around its own UNet call only. The hooks and processors
installed on a UNet read it and pass straight through when no state is set, or when the
state does not name their module: calls made by other threads (each thread has its own
context), by a pipeline nested in another's run, or by anyone else are left untouched.

The state is ready-made for ``torch.compile``: tensors drawn or computed before the call
(permutations, the NAG negative's K/V), settings as constants, modules as keys. Dynamo reads
the ``ContextVar`` inside the compiled UNet and guards on what the hooks read, so the compiled
code is specialised per branch set and settings, never per call.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, Mapping, Optional, Tuple

from torch import Tensor, nn

from .rows import CallRows


@dataclass(frozen=True)
class TPGCall:
    """Token shuffling: block to perturb -> the permutation of its tokens for this call's TPG rows,
    ``[tokens]`` shared by all rows or ``[rows, tokens]`` (one per image)."""

    permutations: Mapping[nn.Module, Tensor]


@dataclass(frozen=True)
class PAGCall:
    """Perturbed self-attention on ``attns``: ``(1 - beta) A + beta I`` on ``heads`` (all when None)."""

    attns: FrozenSet[nn.Module]
    beta: float
    heads: Optional[Tuple[int, ...]]


@dataclass(frozen=True)
class NAGCall:
    """NAG on the cross-attentions ``attns`` with the negative context of the call's guided rows.

    ``cache``: attention -> the K/V heads of ``negative``, computed before the call (once per run,
    by the denoiser); an attention missing from it computes them itself.
    """

    attns: FrozenSet[nn.Module]
    scale: float
    tau: float
    alpha: float
    use_l1: bool
    negative: Tensor
    cache: Mapping[nn.Module, Tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class RowMap:
    """Where a narrowed call's rows sit in its outer call's: ``keep``, the outer rows computed inside the narrowed
    module; ``widen``, for each outer row, the inner row whose output it takes (a dropped row takes its cond row)."""

    keep: Tensor
    widen: Tensor
    outer_rows: int
    inner_rows: int


@dataclass(frozen=True)
class GuidedCall:
    """What the hooks need to know about one guided UNet call.

    ``shared``: prefix module -> the narrowed call in force inside it (rows that still equal the cond row dropped,
    see ``sharing``); a narrowed call has its ``outer`` call and ``row_map``."""

    rows: CallRows
    tpg: Optional[TPGCall] = None
    pag: Optional[PAGCall] = None
    nag: Optional[NAGCall] = None
    shared: Dict[nn.Module, "GuidedCall"] = field(default_factory=dict, compare=False, repr=False)
    outer: Optional["GuidedCall"] = field(default=None, compare=False, repr=False)
    row_map: Optional[RowMap] = field(default=None, compare=False, repr=False)


_CURRENT: ContextVar[Optional[GuidedCall]] = ContextVar("dualguide_guided_call", default=None)


def current_call() -> Optional[GuidedCall]:
    """The guided call in flight in this thread / context, or None."""
    return _CURRENT.get()


def switch_call(call: GuidedCall) -> None:
    """Make ``call`` the call in flight in place of the current one (into a narrowed call and back out, by the
    hooks of ``sharing``); the enclosing ``guided_call`` block resets the state on exit, exceptions included."""
    _CURRENT.set(call)


@contextmanager
def guided_call(call: GuidedCall) -> Iterator[GuidedCall]:
    """Make ``call`` the call in flight for the duration of the block (this context only)."""
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)
