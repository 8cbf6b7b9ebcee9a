"""Batch layout of one guided step: which UNet rows belong to which branch.

Branches are stacked along the batch in the fixed order of ``BRANCH_ORDER``, each
with the same number of rows (one per image). The hooks read the layout of the
UNet call in flight from a shared ``GuidanceState``; they never assume ``chunk(3)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

BRANCH_ORDER = ("uncond", "cond", "tpg", "pag")


@dataclass(frozen=True)
class CallRows:
    """Row slices, relative to one UNet call's batch, of each branch present in it."""

    slices: Dict[str, slice]

    def rows(self, branch: str) -> Optional[slice]:
        return self.slices.get(branch)

    @property
    def guided(self) -> Optional[slice]:
        """Rows that use the positive prompt (every branch but uncond): contiguous by layout."""
        spans = [s for name, s in self.slices.items() if name != "uncond"]
        if not spans:
            return None
        return slice(min(s.start for s in spans), max(s.stop for s in spans))


def plan_calls(branches: Sequence[str], rows_per_branch: int, max_rows: Optional[int]) -> List[Tuple[slice, CallRows]]:
    """Cut the step's rows into UNet calls of at most ``max_rows`` rows (all in one call when None).

    Returns, per call, its slice of the step batch and the branch slices within that call.
    """
    total = len(branches) * rows_per_branch
    size = total if max_rows is None else max_rows
    calls = []
    for start in range(0, total, size):
        stop = min(start + size, total)
        slices = {}
        for index, name in enumerate(branches):
            lo = max(start, index * rows_per_branch)
            hi = min(stop, (index + 1) * rows_per_branch)
            if lo < hi:
                slices[name] = slice(lo - start, hi - start)
        calls.append((slice(start, stop), CallRows(slices)))
    return calls


@dataclass
class TokenPermutations:
    """One token permutation per TPG block per step, drawn with ``torch.randperm`` from a seeded generator.

    The generator lives on the hidden states' device (seeded with ``seed``), so drawing needs
    no host-device transfer or synchronisation; the same seed on the same device gives the
    same permutations. Cached for the step, so a step split over several UNet calls uses the same ones.
    """

    seed: int
    _generators: Dict[str, torch.Generator] = field(init=False, default_factory=dict)
    _step: Dict[Tuple[int, int, str], Tensor] = field(init=False, default_factory=dict)

    def new_step(self) -> None:
        self._step.clear()

    def get(self, block: int, tokens: int, device: torch.device) -> Tensor:
        key = (block, tokens, str(device))
        if key not in self._step:
            if key[2] not in self._generators:
                self._generators[key[2]] = torch.Generator(device=device).manual_seed(self.seed)
            self._step[key] = torch.randperm(tokens, generator=self._generators[key[2]], device=device)
        return self._step[key]


@dataclass
class GuidanceState:
    """What the installed hooks need to know about the UNet call in flight."""

    rows: CallRows = field(default_factory=lambda: CallRows({}))
    nag_negative: Optional[Tensor] = None
    permutations: Optional[TokenPermutations] = None
