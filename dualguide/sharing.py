"""Shared prefix rows: a perturbed row runs as its cond row until its term's first perturbed module.

A perturbed branch's rows (TPG, PAG) equal the cond rows, bit for bit, in every module that runs before the
first block its term perturbs: the term's *prefix* (the family names its modules, ``ModelFamily.prefix_modules``).
The backbone is still called with every row. ``narrow_rows``, a forward pre-hook of each prefix module, drops the
rows that equal cond there and makes the narrowed call current (its ``CallRows``, NAG's negative for fewer guided
rows); ``widen_rows``, its forward hook, copies the cond rows' output into the dropped rows and makes the outer call
current again. What leaves a prefix module (skip connections included) is wide, so the model's forward, ControlNet's
residual adds and everything after run as before. Prefix modules nest (a down block drops the PAG rows, a resnet
inside it the TPG rows too): each narrowing is relative to the rows around it.

``PrefixSharing`` knows, per set of branches, where rows are dropped; ``call_template`` lays out the narrowed calls
of one backbone call (row maps, narrowed NAG state) once per run; ``shared_call`` dresses a step's call with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .callstate import GuidedCall, NAGCall, RowMap, current_call, switch_call
from .rows import CallRows

Named = Sequence[Tuple[str, nn.Module]]  # (module name, module)


def narrow_rows(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: inside a prefix module of the call in flight, only the rows that differ there."""
    call = current_call()
    inner = None if call is None else call.shared.get(module)
    if inner is None:
        return None
    switch_call(inner)
    row_map = inner.row_map
    return _select(args, row_map.outer_rows, row_map.keep), _select(kwargs, row_map.outer_rows, row_map.keep)


def widen_rows(module: nn.Module, args: tuple, output):
    """Forward hook: the narrowed output with the dropped rows back, copies of their cond rows."""
    call = current_call()
    outer = None if call is None else call.outer
    if outer is None or outer.shared.get(module) is not call:
        return None
    switch_call(outer)
    return _select(output, call.row_map.inner_rows, call.row_map.widen)


def _select(value, rows: int, index: Tensor):
    """``value`` with ``index`` taken along the rows of every tensor of ``rows`` rows in it (tuples, lists, dicts)."""
    if isinstance(value, Tensor):
        return value.index_select(0, index) if value.ndim and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_select(item, rows, index) for item in value)
    if isinstance(value, dict):
        return {key: _select(item, rows, index) for key, item in value.items()}
    return value


def _enclosing(name: str, names) -> Optional[str]:
    """The longest of ``names`` that names a module enclosing the module ``name``, or None."""
    parts = name.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in names), None)


# One narrowing point: (module, enclosing point's module or None for the call itself, branches dropped inside it).
Point = Tuple[nn.Module, Optional[nn.Module], FrozenSet[str]]


class PrefixSharing:
    """Where rows are dropped for a run's terms. ``prefixes``: branch -> its prefix modules ``(name, module)``, the
    coarsest modules that run entirely before the term's first perturbed block."""

    def __init__(self, prefixes: Mapping[str, Named]) -> None:
        self._modules = {name: module for named in prefixes.values() for name, module in named}
        self._drops = {
            name: frozenset(b for b, named in prefixes.items() for outer, _ in named if name == outer or name.startswith(outer + "."))
            for name in self._modules
        }
        self._points: Dict[Tuple[str, ...], List[Point]] = {}

    @property
    def modules(self) -> Tuple[nn.Module, ...]:
        """Every module that may narrow the rows: the hooks go there."""
        return tuple(self._modules.values())

    def points(self, branches: Tuple[str, ...]) -> List[Point]:
        """The modules that narrow a call of ``branches``, enclosing ones first, each with its enclosing point."""
        if branches not in self._points:
            self._points[branches] = self._find_points(frozenset(branches))
        return self._points[branches]

    def _find_points(self, branches: FrozenSet[str]) -> List[Point]:
        dropped: Dict[str, FrozenSet[str]] = {}
        points = []
        for name in sorted(self._modules):  # an enclosing module's name sorts before the names inside it
            parent = _enclosing(name, dropped)
            drop = self._drops[name] & branches
            if drop and drop != dropped.get(parent, frozenset()):
                dropped[name] = drop
                points.append((self._modules[name], None if parent is None else self._modules[parent], drop))
        return points


@dataclass(frozen=True)
class NarrowedCall:
    """One narrowed call of a template: inside the modules ``modules``, entered from the narrowed call ``parent``
    (an index into the template, None for the backbone call), with rows ``rows`` placed by ``row_map``."""

    modules: Tuple[nn.Module, ...]
    parent: Optional[int]
    rows: CallRows
    row_map: RowMap
    nag: Optional[NAGCall]


def call_template(points: List[Point], rows: CallRows, nag: Optional[NAGCall], device: torch.device) -> List[NarrowedCall]:
    """The narrowed calls of one backbone call with ``rows`` (one call holding every row of the step): fixed for the
    run, built once per set of branches. Modules with the same enclosing call and dropped branches share one."""
    index: Dict[Tuple[Optional[int], FrozenSet[str]], int] = {}
    of_module: Dict[nn.Module, Optional[int]] = {}
    modules: List[List[nn.Module]] = []
    parts: List[tuple] = []  # per narrowed call: parent, rows, row map, NAG state
    for module, enclosing, drop in points:
        parent = None if enclosing is None else of_module[enclosing]
        if (parent, drop) not in index:
            index[(parent, drop)] = len(parts)
            outer = rows if parent is None else parts[parent][1]
            inner = _narrowed_rows(outer, drop)
            parts.append((parent, inner, _row_map(outer, inner, device), _narrowed_nag(nag, inner)))
            modules.append([])
        of_module[module] = index[(parent, drop)]
        modules[of_module[module]].append(module)
    return [NarrowedCall(tuple(group), *part) for group, part in zip(modules, parts)]


def _narrowed_rows(outer: CallRows, drop: FrozenSet[str]) -> CallRows:
    """The rows of ``outer``'s branches but ``drop``, stacked in the same order."""
    kept = [name for name in _in_order(outer) if name not in drop]
    size = outer.slices["cond"].stop - outer.slices["cond"].start
    return CallRows({name: slice(i * size, (i + 1) * size) for i, name in enumerate(kept)}, {name: outer.images_of(name) for name in kept})


def _in_order(rows: CallRows) -> List[str]:
    return sorted(rows.slices, key=lambda name: rows.slices[name].start)


def _row_map(outer: CallRows, inner: CallRows, device: torch.device) -> RowMap:
    keep = [row for name in _in_order(inner) for row in range(outer.slices[name].start, outer.slices[name].stop)]
    source = [inner.slices.get(name, inner.slices["cond"]) for name in _in_order(outer)]
    widen = [row for rows in source for row in range(rows.start, rows.stop)]
    as_index = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
    return RowMap(as_index(keep), as_index(widen), len(widen), len(keep))


def _narrowed_nag(nag: Optional[NAGCall], inner: CallRows) -> Optional[NAGCall]:
    """NAG's state for the guided rows of ``inner``: the negative's first rows (it repeats per branch) and their K/V."""
    if nag is None or inner.guided is None:
        return None
    count = inner.guided.stop - inner.guided.start
    cache = {attn: (key[:count], value[:count]) for attn, (key, value) in nag.cache.items()}
    return NAGCall(nag.attns, nag.scale, nag.tau, nag.alpha, nag.use_l1, nag.negative[:count], cache)


def shared_call(call: GuidedCall, template: List[NarrowedCall]) -> GuidedCall:
    """``call`` (a step's backbone call) with the narrowed calls of ``template`` in its ``shared`` map."""
    made: List[GuidedCall] = []
    for narrowed in template:
        outer = call if narrowed.parent is None else made[narrowed.parent]
        names = narrowed.rows.slices
        inner = GuidedCall(narrowed.rows, outer.tpg if "tpg" in names else None, outer.pag if "pag" in names else None, narrowed.nag,
                           {}, outer, narrowed.row_map)  # fmt: skip
        made.append(inner)
        for module in narrowed.modules:
            outer.shared[module] = inner
    return call
