"""What the guiders share: one modular branch's backbone call made a guided call, and the step windows.

diffusers' modular loops run the backbone once per guider branch, calling ``guider.prepare_models(model)`` before
and ``guider.cleanup_models(model)`` after. A ``BranchCall`` opened in ``prepare_models`` installs the family's hooks
(``dualguide.hooks.guidance_hooks`` of the family's ``hook_plan``) and, around the branch's backbone call only, sets
that call's state (``dualguide.callstate.guided_call``): a ``GuidedCall`` whose rows mark the whole call as one
branch, so the hooks act on its rows as they do on that branch's rows of the denoiser's one call. The state is built
from the call's arguments by a forward pre-hook on the backbone (TPG needs the tokens, the layout reads them) and reset by a forward hook
that runs when the call raises too; the hooks go in the same hook, or at ``close``.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Callable, List, Optional, Sequence, Tuple, Union

from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from torch import Tensor, nn

from ..callstate import GuidedCall, guided_call
from ..checks import check_number
from ..config import CFG
from ..guidance import guided_prediction, rescale_guidance
from ..hooks import HookSites, guidance_hooks

Seed = Union[int, Sequence[int]]
MakeCall = Callable[[tuple, dict], GuidedCall]  # a branch's call state from its backbone call's (args, kwargs)


class BranchCall:
    """The guidance of one branch's backbone call: ``sites`` installed on ``model`` until ``close``, and the state
    ``make_call(args, kwargs)`` (the call's arguments) in force during the next call of ``model`` in this thread, reset after it whether it returns
    or raises. Calls of ``model`` from other threads pass through untouched.

    It guides one call. A forward stopped by a ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``)
    never reaches torch's ``always_call`` hook, so its state would outlive it: the next call of ``model`` in this
    thread then resets that state, removes every hook and runs unguided."""

    def __init__(self, model: nn.Module, sites: HookSites, make_call: MakeCall) -> None:
        self._make_call = make_call
        self._thread = threading.get_ident()
        self._entered = False
        self._stack = ExitStack()
        try:
            self._stack.enter_context(guidance_hooks(sites))
            self._stack.callback(model.register_forward_pre_hook(self._enter, with_kwargs=True).remove)
            # ``always_call``: runs when the forward raises too. It cannot remove itself then (torch iterates the
            # module's hook dict at that point): ``close`` does, the guider's ``cleanup_models`` or its next branch.
            self._exit_handle = model.register_forward_hook(self._exit, always_call=True)
        except BaseException:
            self._stack.close()
            raise

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != self._thread:
            return
        if self._entered:  # the guided call never reached ``_exit`` (interrupted): this one runs plain
            self.close()
            return
        self._entered = True
        try:
            call = self._make_call(args, kwargs)
        except BaseException:  # a call refused before the forward: every hook goes now, ``_exit``'s too
            self.close()
            raise
        self._stack.enter_context(guided_call(call))

    def _exit(self, module: nn.Module, args: tuple, output) -> None:
        if threading.get_ident() == self._thread:
            self._stack.close()

    def close(self) -> None:
        """Reset the call state and remove every hook (idempotent)."""
        self._stack.close()
        self._exit_handle.remove()


def in_window(start: float, stop: float, step: Optional[int], steps: Optional[int]) -> bool:
    """Whether step ``step`` of ``steps`` lies in the fractions ``[start, stop)`` of the run, as diffusers' guiders
    count (``int(start * steps) <= step < int(stop * steps)``); always outside a loop (no state set)."""
    if steps is None:
        return True
    return int(start * steps) <= step < int(stop * steps)


def check_window(start: float, stop: float, start_name: str, stop_name: str) -> Tuple[float, float]:
    """Fractions of the run in [0, 1] with ``start <= stop``, as floats; ``ValueError`` naming the parameter otherwise."""
    start, stop = check_number(start, start_name, 0.0, 1.0), check_number(stop, stop_name, 0.0, 1.0)
    if start > stop:
        raise ValueError(f"{start_name} ({start:g}) must not be after {stop_name} ({stop:g}): fractions of the run, {start_name} <= {stop_name}")
    return start, stop


def check_seed(seed: Seed) -> Seed:
    """One int, or one int per image; ``TypeError`` naming ``seed`` otherwise."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if is_int(seed) or (isinstance(seed, (list, tuple)) and seed and all(is_int(s) for s in seed)):
        return seed if is_int(seed) else [int(s) for s in seed]
    raise TypeError(f"seed must be an int or a non-empty list of ints (one per image), got {seed!r}")


def rows_of(value) -> Optional[int]:
    """The rows of one guider input: a tensor's first dim, or the length of a list of per-image tensors (Z-Image's
    ``cap_feats``); None for anything else."""
    if isinstance(value, Tensor):
        return value.shape[0]
    if isinstance(value, list) and value and all(isinstance(item, Tensor) for item in value):
        return len(value)
    return None


def batch_of(data) -> Optional[int]:
    """The batch of a guider's inputs (``prepare_inputs``' dict of ``(cond, uncond)`` pairs): its first cond input's rows."""
    for value in data.values():
        rows = rows_of(value[0] if isinstance(value, tuple) else value)
        if rows is not None:
            return rows
    return None


class BranchGuidance(BaseGuidance):
    """A guider of branches ``pred_cond`` (first), ``pred_uncond`` (CFG) and perturbed or guided ones, each run as
    its own backbone call by diffusers' modular loop; CFG (with ``guidance_rescale``) and the start/stop window as
    dualguide's pipelines count them (CFG is on for ``guidance_scale > 1``).

    A subclass names its branches (``branch_names``), checks the inputs (``check_inputs``, before any backbone call),
    binds to the backbone (``bind``, at each branch's ``prepare_models``, before its call) and says what a branch's
    call carries (``branch_call``: the hooks and the call state, or None for a plain call)."""

    def _init_cfg(self, guidance_scale: float, guidance_rescale: float, start: float, stop: float, enabled: bool) -> None:
        start, stop = check_window(start, stop, "start", "stop")
        super().__init__(start, stop, enabled)
        cfg = CFG(scale=guidance_scale, rescale=guidance_rescale)  # validates, naming guidance_scale / guidance_rescale
        self.guidance_scale, self.guidance_rescale = cfg.scale, cfg.rescale
        self._branches: List[str] = []
        self._open: Optional[BranchCall] = None

    # -- what a subclass says ---------------------------------------------------------------------
    def branch_names(self) -> List[str]:
        raise NotImplementedError

    def check_inputs(self, batch: Optional[int]) -> None:
        """Refuse inputs the branches cannot run (``ValueError`` naming the parameter), before any backbone call."""

    def bind(self, model: nn.Module) -> None:
        """Resolve what the guidance needs of ``model`` (``ValueError`` / ``TypeError`` before any backbone call)."""

    def branch_call(self, name: str) -> Optional[Tuple[HookSites, MakeCall]]:
        return None

    # -- diffusers' guider contract ------------------------------------------------------------------
    def _cfg_enabled(self) -> bool:
        return self._enabled and self.guidance_scale > 1.0 and in_window(self._start, self._stop, self._step, self._num_inference_steps)

    @property
    def num_conditions(self) -> int:
        return len(self.branch_names())

    @property
    def is_conditional(self) -> bool:
        index = self._count_prepared - 1
        return not 0 <= index < len(self._branches) or self._branches[index] != "pred_uncond"

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        self._close()
        super().set_state(step, num_inference_steps, timestep)

    def _branch_inputs(self, batch: Optional[int]) -> List[Tuple[int, str]]:
        self._branches = self.branch_names()
        self.check_inputs(batch)
        return [(1 if name == "pred_uncond" else 0, name) for name in self._branches]

    def prepare_inputs(self, data) -> list:
        return [self._prepare_batch(data, index, name) for index, name in self._branch_inputs(batch_of(data))]

    def prepare_inputs_from_block_state(self, data, input_fields) -> list:
        cond = next((getattr(data, v if isinstance(v, str) else v[0], None) for v in input_fields.values()), None)
        branches = self._branch_inputs(rows_of(cond))
        return [self._prepare_batch_from_block_state(input_fields, data, index, name) for index, name in branches]

    def prepare_models(self, denoiser: nn.Module) -> None:
        self._count_prepared += 1
        self._close()
        self.bind(denoiser)
        index = self._count_prepared - 1
        call = self.branch_call(self._branches[index]) if index < len(self._branches) else None
        if call is not None:
            self._open = BranchCall(denoiser, *call)

    def cleanup_models(self, denoiser: nn.Module) -> None:
        self._close()

    def _close(self) -> None:
        if self._open is not None:
            self._open, open_call = None, self._open
            open_call.close()

    def combine(self, pred_cond: Tensor, pred_uncond: Optional[Tensor], perturbed: Sequence[Tuple[float, Tensor]] = ()) -> GuiderOutput:
        """``dualguide.guidance``'s CFG + perturbation formula in float32, rescaled as the pipelines do (with CFG on)."""
        cond = pred_cond.float()
        uncond = pred_uncond.float() if self._cfg_enabled() else None
        pred = guided_prediction(cond, uncond, self.guidance_scale, [(scale, p.float()) for scale, p in perturbed])
        if uncond is not None:
            pred = rescale_guidance(pred, cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
