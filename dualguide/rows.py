"""Branch row layout of one guided step: which UNet rows belong to which branch, and to which images.

Branches are stacked along the batch in the fixed order of ``BRANCH_ORDER``, each with the same
number of rows (one per image). A step may be cut into several UNet calls (``max_batch_rows``);
each call knows the rows of every branch it holds and the images those rows belong to. The
hooks read this from the call's state; they never assume ``chunk(3)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

BRANCH_ORDER = ("uncond", "cond", "tpg", "pag")


@dataclass(frozen=True)
class CallRows:
    """Row slices of each branch within one UNet call, and the image indices of those rows."""

    slices: Dict[str, slice]
    images: Dict[str, slice] = field(default_factory=dict)
    # Rows that use the positive prompt (every branch but uncond), contiguous by layout; None when none.
    # Computed once here: NAG reads it in every cross-attention of the call.
    guided: Optional[slice] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "guided", _guided_rows(self.slices))

    def rows(self, branch: str) -> Optional[slice]:
        return self.slices.get(branch)

    def with_partners(self, branch: str, count: Optional[int] = None) -> List[slice]:
        """The rows of ``branch`` ([] when absent) and, for a joint attention whose NAG carries one extra text row per
        guided row after the call's ``count`` rows (None: no such rows), those extra partners, in guided-row order."""
        own = self.slices.get(branch)
        if own is None:
            return []
        if count is None:
            return [own]
        offset = count + own.start - self.guided.start
        return [own, slice(offset, offset + own.stop - own.start)]

    @property
    def count(self) -> int:
        """How many rows the call has."""
        return max(rows.stop for rows in self.slices.values())

    def images_of(self, branch: str) -> slice:
        """Image indices of ``branch``'s rows in this call (its rows when no split was planned)."""
        rows = self.slices[branch]
        return self.images.get(branch, slice(0, rows.stop - rows.start))


def _guided_rows(slices: Dict[str, slice]) -> Optional[slice]:
    spans = [s for name, s in slices.items() if name != "uncond"]
    if not spans:
        return None
    return slice(min(s.start for s in spans), max(s.stop for s in spans))


def plan_calls(branches: Sequence[str], rows_per_branch: int, max_rows: Optional[int]) -> List[Tuple[slice, CallRows]]:
    """Cut the step's rows into UNet calls of at most ``max_rows`` rows (all in one call when None).

    Returns, per call, its slice of the step batch and the branch rows and images within that call.
    """
    total = len(branches) * rows_per_branch
    size = total if max_rows is None else max_rows
    calls = []
    for start in range(0, total, size):
        stop = min(start + size, total)
        slices, images = {}, {}
        for index, name in enumerate(branches):
            first = index * rows_per_branch
            lo, hi = max(start, first), min(stop, first + rows_per_branch)
            if lo < hi:
                slices[name] = slice(lo - start, hi - start)
                images[name] = slice(lo - first, hi - first)
        calls.append((slice(start, stop), CallRows(slices, images)))
    return calls


Seeds = Union[int, Sequence[int]]


class TokenPermutations:
    """TPG's token permutations: one per block per step, from ``torch.randperm`` on seeded generators.

    ``seeds`` is one int, whose permutation every image's perturbed row shares (as the official
    code does), or one int per image, each image drawing from its own stream, so that an image
    of a batch equals the image generated alone with its seed. Generators live on the hidden
    states' device, so drawing needs no host-device synchronisation. Permutations are cached
    for the step, so a step split over several UNet calls uses the same ones.
    """

    def __init__(self, seeds: Seeds) -> None:
        self.per_image = not isinstance(seeds, int)
        self.seeds = tuple(int(s) for s in seeds) if self.per_image else (int(seeds),)
        self._generators: Dict[Tuple[int, str], torch.Generator] = {}
        self._step: Dict[Tuple[int, int, str, int], Tensor] = {}

    def new_step(self) -> None:
        self._step.clear()

    def _draw(self, stream: int, block: int, tokens: int, device: torch.device) -> Tensor:
        if torch.device(device).type == "meta":  # shapes only (FLOP counting on the meta device): no values to draw
            return torch.empty(tokens, dtype=torch.long, device=device)
        key = (block, tokens, str(device), stream)
        if key not in self._step:
            generator = self._generators.get((stream, key[2]))
            if generator is None:
                generator = torch.Generator(device=device).manual_seed(self.seeds[stream])
                self._generators[(stream, key[2])] = generator
            self._step[key] = torch.randperm(tokens, generator=generator, device=device)
        return self._step[key]

    def get(self, block: int, tokens: int, device: torch.device, images: slice) -> Tensor:
        """``[tokens]`` shared by all rows, or ``[rows, tokens]``: one permutation per image in ``images``."""
        if not self.per_image:
            return self._draw(0, block, tokens, device)
        if images.stop > len(self.seeds):
            raise ValueError(f"TPG has {len(self.seeds)} per-image seeds but the batch has image {images.stop - 1}")
        return torch.stack([self._draw(i, block, tokens, device) for i in range(images.start, images.stop)])
