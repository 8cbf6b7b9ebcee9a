"""GuidedDenoiser: a k-diffusion model wrapper with CFG, TPG, PAG/SoftPAG and NAG in one UNet call.

``denoised = model(x, sigma, cond=..., uncond=..., nag_negative=...)`` with ``x`` ``[B,C,H,W]``
float32 and ``sigma`` ``[B]``: the x0 prediction in float32, usable by any k-diffusion
sampler through ``extra_args``. ``model.predict(...)`` gives the guided UNet output itself, for
loops that follow a diffusers scheduler.
"""

from __future__ import annotations

import logging
import math
import threading
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from diffusers.utils.torch_utils import is_compiled_module
from torch import Tensor, nn

from .callstate import GuidedCall, NAGCall, PAGCall, TPGCall, guided_call
from .compiled import keep_hooks_installed
from .conditioning import Conditioning
from .config import CFG, NAG, PAG, TPG
from .control import ControlNetInput, control_residuals
from .families import CallExtras, ModelFamily, family_of
from .guidance import guided_prediction, rescale_guidance
from .hooks import HookSites, Installation, guidance_hooks
from .memory import add_line, halved_rows, is_out_of_memory
from .nag import negative_key_value
from .rows import BRANCH_ORDER, CallRows, Seeds, TokenPermutations, plan_calls
from .schedule import DiscreteModelSchedule, FlowMatchSchedule, model_schedule
from .sharing import PrefixSharing, call_template, narrow_rows, shared_call, widen_rows

logger = logging.getLogger(__name__)


def _check_heads(attns, heads) -> None:
    if heads is None:
        return
    available = min(attn.heads for attn in attns)
    bad = [h for h in heads if h >= available]
    if bad:
        raise ValueError(f"selected_heads {bad} out of range: the selected PAG layers have heads 0-{available - 1}")


def _repeated(negative, times: int):
    """NAG's negative (prompt embeds, or a family's whole negative Conditioning) repeated for ``times`` branches."""
    return Conditioning.cat([negative] * times) if isinstance(negative, Conditioning) else negative.repeat(times, 1, 1)


def _rows(negative, rows: slice):
    """The rows ``rows`` of NAG's negative (prompt embeds or a Conditioning)."""
    return negative.select(rows) if isinstance(negative, Conditioning) else negative[rows]


def to_denoised(x: Tensor, sigma: Tensor, output: Tensor, prediction_type: str) -> Tensor:
    """The x0 prediction of a backbone ``output`` at ``(x, sigma)``: k-diffusion's scaling ``x = x0 + sigma * eps``
    for epsilon / v / sample models; for flow models (``"flow"``, velocity ``v``) ``x = (1 - sigma) x0 + sigma noise``."""
    sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    if prediction_type in ("epsilon", "flow"):
        return x - sigma * output
    if prediction_type == "v_prediction":
        return x / (sigma**2 + 1) - sigma / (sigma**2 + 1).sqrt() * output
    return output


class GuidedDenoiser:
    """k-diffusion denoiser around a backbone of any supported family (``dualguide.families``) with dual guidance.

    Per call it stacks the active branches ``[uncond, cond, tpg, pag]`` along the batch,
    runs the UNet once (or in chunks of ``max_batch_rows``), and combines the branch
    predictions with the CFG + perturbation-guidance formula. NAG acts inside the
    cross-attention of the positive rows. ``last_predictions`` holds the last call's x0
    prediction of each branch and of the guided result, for callbacks and custom samplers.

    A denoiser holds one sampling run's state (permutation streams, NAG K/V): use one per
    thread. Any number of denoisers, in any threads, may share one UNet: each call's
    guidance acts on that call only. A ``torch.compile``d UNet (see ``compiled``) gets the
    guidance hooks installed for good on first use; the per-call state stays the same.

    ``family``: the backbone's adapter (SDXL, SD 1.x/2.x, ...); by default the one whose backbone
    ``unet`` is (``dualguide.families.family_of``).

    ``share_prefix``: the TPG and PAG rows run as the cond row until their term's first perturbed block
    (``dualguide.sharing``; the same output, fewer FLOPs) where the family can (UNets; SD3 and Flux without NAG's
    extra text rows) and the step's rows are in one backbone call; False runs every row through the whole backbone.
    A compiled UNet never shares.
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule,
        *,
        prediction_type: Optional[str] = None,
        cfg: Optional[CFG] = None,
        tpg: Optional[TPG] = None,
        pag: Optional[PAG] = None,
        nag: Optional[NAG] = None,
        seed: Seeds = 0,
        max_batch_rows: Optional[int] = None,
        sigmas: Optional[Tensor] = None,
        cross_attention_kwargs: Optional[dict] = None,
        timestep_cond: Optional[Tensor] = None,
        family: Optional[ModelFamily] = None,
        share_prefix: bool = True,
    ) -> None:
        family = family_of(unet) if family is None else family
        if not isinstance(schedule, (DiscreteModelSchedule, FlowMatchSchedule)):
            prediction_type = prediction_type or getattr(getattr(schedule, "config", None), "prediction_type", None)
            schedule = model_schedule(schedule)
        prediction_type = prediction_type or schedule.default_prediction
        if prediction_type not in schedule.prediction_types:
            kind = "a flow-matching" if isinstance(schedule, FlowMatchSchedule) else "a discrete (DDPM-family)"
            raise ValueError(f"prediction_type for {kind} schedule must be one of {schedule.prediction_types}, got {prediction_type!r}")
        for name, term, kind in (("cfg", cfg, CFG), ("tpg", tpg, TPG), ("pag", pag, PAG), ("nag", nag, NAG)):
            if term is not None and not isinstance(term, kind):
                raise TypeError(f"{name} must be a dualguide.{kind.__name__} or None, got {type(term).__name__}")
        if max_batch_rows is not None and (isinstance(max_batch_rows, bool) or not isinstance(max_batch_rows, int) or max_batch_rows < 1):
            raise ValueError(f"max_batch_rows must be a positive integer or None, got {max_batch_rows!r}")
        self.unet = unet
        self.family = family
        # ModelMixin.dtype walks every module (~15 ms on SDXL-sized UNets): read it once, not per step.
        self.model_dtype = unet.dtype
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.cfg = cfg or CFG(scale=1.0)
        self.tpg = tpg if tpg is not None and tpg.enabled else None
        self.pag = pag if pag is not None and pag.enabled else None
        self.nag = nag if nag is not None and nag.enabled else None
        self.max_batch_rows = max_batch_rows
        self.cross_attention_kwargs = cross_attention_kwargs
        self.timestep_cond = timestep_cond
        tpg_layers = family.default_tpg_layers if self.tpg is None or self.tpg.layers is None else self.tpg.layers
        pag_layers = family.default_pag_layers if self.pag is None or self.pag.layers is None else self.pag.layers
        tpg_blocks = family.resolve(unet, tpg_layers, "tpg_applied_layers_index") if self.tpg else []
        pag_blocks = family.resolve(unet, pag_layers, "pag_applied_layers_index") if self.pag else []
        self._tpg_blocks = {family.tpg_module(block): index for index, (_, block) in enumerate(tpg_blocks)}
        self._pag_attns = frozenset(attn for _, block in pag_blocks for attn in family.pag_attentions(block))
        if self.pag:
            _check_heads(self._pag_attns, self.pag.heads)
        self._nag_attns = family.nag_attentions(unet) if self.nag else frozenset()
        self._compiled = is_compiled_module(unet)
        # A compiled UNet keeps only its resident hooks (``compiled``): it runs every row from the start.
        prefixes = {"tpg": tpg_blocks, "pag": pag_blocks} if share_prefix and not self._compiled else {}
        self._sharing = PrefixSharing({name: family.prefix_modules(unet, [n for n, _ in blocks]) for name, blocks in prefixes.items()})
        self._hook_sites = self._with_sharing_hooks(family.hook_plan(unet, self._tpg_blocks, self._pag_attns, self._nag_attns))
        self.permutations = TokenPermutations(seed)
        self._running = threading.Lock()
        self._held: List[Installation] = []  # the installations of the ``hooks()`` blocks now open
        self._batch_cache: Dict[tuple, object] = {}
        self._cached_inputs: Optional[tuple] = None
        self._tpg_tokens: Dict[tuple, list] = {}  # latent size -> (block, index, tokens) in the order the blocks run
        self.last_predictions: Dict[str, Tensor] = {}
        self.last_outputs: Dict[str, Tensor] = {}  # the last call's backbone output of each branch (float32)
        self.last_branches: Tuple[str, ...] = ()
        self.set_schedule(sigmas)

    def reseed(self, seed: Seeds) -> None:
        """Restart the TPG permutation streams from ``seed`` (one int, or one per image)."""
        self.permutations = TokenPermutations(seed)

    def set_guidance_scale(self, scale: float) -> None:
        """Change the CFG scale from the next call on (``scale <= 1`` drops the uncond rows)."""
        self.cfg = CFG(scale=scale, rescale=self.cfg.rescale, interval=self.cfg.interval)

    # -- schedule -----------------------------------------------------------------------------
    def set_schedule(self, sigmas: Optional[Tensor]) -> None:
        """Give the run's sigmas, needed by intervals written as fractions of the schedule."""
        schedule = None if sigmas is None else torch.as_tensor(sigmas).detach().float().cpu()
        self._levels = schedule
        self._bounds = {
            name: term.interval.sigma_bounds(schedule)
            for name, term in (("cfg", self.cfg), ("tpg", self.tpg), ("pag", self.pag), ("nag", self.nag))
            if term is not None
        }
        self._has_intervals = any(bounds != (0.0, math.inf) for bounds in self._bounds.values())

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma)

    def _active(self, name: str, sigma: float) -> bool:
        low, high = self._bounds[name]
        return low < sigma <= high

    def active_branches(self, sigma: float) -> Tuple[str, ...]:
        """The branches that a call at ``sigma`` puts into the batch, in batch order."""
        on = {
            "uncond": self.cfg.enabled and self._active("cfg", sigma),
            "cond": True,
            "tpg": self.tpg is not None and self._active("tpg", sigma),
            "pag": self.pag is not None and self._active("pag", sigma),
        }
        return tuple(name for name in BRANCH_ORDER if on[name])

    @property
    def shared_prefix_modules(self) -> Tuple[nn.Module, ...]:
        """The modules inside which this denoiser's calls drop the rows that still equal the cond row (none: no sharing)."""
        return self._sharing.modules

    # -- hooks --------------------------------------------------------------------------------
    def _with_sharing_hooks(self, sites: HookSites) -> HookSites:
        """``sites`` and the narrowing / widening hooks of the prefix modules (``dualguide.sharing``)."""
        modules = self._sharing.modules
        return HookSites(sites.pre_hooks + tuple((m, narrow_rows) for m in modules), sites.wrappers,
                         sites.post_hooks + tuple((m, widen_rows) for m in modules))  # fmt: skip

    @contextmanager
    def hooks(self) -> Iterator["GuidedDenoiser"]:
        """Keep this denoiser's hooks installed over many calls (a whole sampling run).

        Without it each call installs and removes them itself. Installation is shared and
        reference-counted per module, so blocks of several denoisers may nest or overlap in
        any order; when the last one exits the UNet has exactly its previous processors and no hooks
        (a compiled UNet keeps its resident ones, which pass through).
        """
        if self._compiled:
            keep_hooks_installed(self.unet, self.family)
        with guidance_hooks(self._hook_sites) as installation:
            self._held.append(installation)
            try:
                yield self
            finally:
                self._held.remove(installation)

    @contextmanager
    def _call_hooks(self) -> Iterator[Installation]:
        """The hooks for one call: those of an enclosing ``hooks()`` block (nothing to install per call), else
        installed for the call; processors replaced meanwhile (``set_attn_processor``) get wrapped again."""
        if self._held:
            installation = self._held[-1]
            installation.ensure_wrappers()
            yield installation
            return
        with self.hooks():
            yield self._held[-1]

    # -- the calls ----------------------------------------------------------------------------
    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        cond: Conditioning,
        uncond: Optional[Conditioning] = None,
        nag_negative: Optional[Tensor] = None,
        concat: Optional[Tensor] = None,
        control: Optional[ControlNetInput] = None,
    ) -> Tensor:
        """The guided x0 prediction at ``(x, sigma)`` (k-diffusion's denoiser convention).

        ``concat``: channels appended to the scaled UNet input (9-channel inpainting: mask and
        masked-image latents), ``[B, C', H, W]``; ``control``: a ControlNet with its image (``ControlNetInput``),
        run on the uncond and cond rows only, its residuals reused by the perturbed rows."""
        sigma = sigma.float().reshape(-1).expand(x.shape[0])
        c_in = self.schedule.input_scale(sigma).view(-1, *([1] * (x.ndim - 1)))
        self._predict(x, x * c_in, self.sigma_to_t(sigma), sigma, cond, uncond, nag_negative, concat, control)
        return self.last_predictions["guided"]

    def predict(
        self,
        model_input: Tensor,
        timestep: Tensor,
        cond: Conditioning,
        uncond: Optional[Conditioning] = None,
        nag_negative: Optional[Tensor] = None,
        *,
        sigma: Tensor,
        concat: Optional[Tensor] = None,
        control: Optional[ControlNetInput] = None,
    ) -> Tensor:
        """The guided UNet output (the model's prediction type) for an input already scaled for the UNet,
        as a diffusers scheduler's ``scale_model_input`` gives it; ``sigma`` is that input's noise level.
        ``concat`` and ``control`` as in ``__call__``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=model_input.device).reshape(-1).expand(model_input.shape[0])
        timestep = torch.as_tensor(timestep, device=model_input.device).reshape(-1).expand(model_input.shape[0])
        x = model_input.float() / self.schedule.input_scale(sigma).view(-1, *([1] * (model_input.ndim - 1)))
        return self._predict(x, model_input, timestep, sigma, cond, uncond, nag_negative, concat, control)

    def _predict(self, x, model_input, timesteps, sigma, cond, uncond, nag_negative, concat=None, control=None) -> Tensor:
        self._check_call(x, cond, uncond, nag_negative)
        if not self._running.acquire(blocking=False):
            raise RuntimeError(
                "this GuidedDenoiser is already running a call (from another thread, or from inside its own call); "
                "use one denoiser per thread: several denoisers may share one UNet"
            )
        try:
            # Reading sigma on the host waits for the device; only intervals need it.
            level = float(sigma.max()) if self._has_intervals or control is not None else math.inf
            branches = self.active_branches(level)
            nag_on = self.nag is not None and self._active("nag", level)
            residuals = None
            if control is not None:
                scales = control.scales_at(*self._step_of(level)) if self._levels is not None else control.scale
                if scales is not None:
                    control_input = model_input.to(self.model_dtype)
                    residuals = control_residuals(control, scales, branches, control_input, timesteps, cond.to(dtype=self.model_dtype),
                                                  None if uncond is None else uncond.to(dtype=self.model_dtype))  # fmt: skip
            if concat is not None:
                model_input = torch.cat([model_input, concat.to(device=model_input.device, dtype=model_input.dtype)], dim=1)
            outputs = self._run_unet(model_input, timesteps, branches, cond, uncond, nag_negative if nag_on else None, residuals)
            predictions = dict(zip(branches, outputs.float().chunk(len(branches))))
            self.last_outputs = predictions
            scales = {"tpg": self.tpg.scale if self.tpg else 0.0, "pag": self._pag_scale(timesteps)}
            guided = guided_prediction(
                predictions["cond"],
                predictions.get("uncond"),
                self.cfg.scale,
                [(scales[name], predictions[name]) for name in ("tpg", "pag") if name in predictions],
            )
            if "uncond" in predictions:
                guided = rescale_guidance(guided, predictions["cond"], self.cfg.rescale)
            self.last_branches = branches
            self.last_predictions = {name: to_denoised(x, sigma, p, self.prediction_type) for name, p in predictions.items()}
            self.last_predictions["guided"] = to_denoised(x, sigma, guided, self.prediction_type)
            return guided
        finally:
            self._running.release()

    def _pag_scale(self, timesteps: Tensor) -> float:
        """PAG's scale at this call's timestep (read on the host only with an adaptive scale)."""
        if self.pag is None:
            return 0.0
        return self.pag.scale_at(float(timesteps.reshape(-1)[0])) if self.pag.adaptive_scale > 0 else self.pag.scale

    def _check_call(self, x: Tensor, cond, uncond, nag_negative) -> None:
        if not isinstance(cond, Conditioning):
            raise TypeError(f"cond must be a dualguide.Conditioning, got {type(cond).__name__}")
        if self.cfg.enabled and not isinstance(uncond, Conditioning):
            raise ValueError("uncond (a Conditioning) is required while guidance_scale > 1")
        if self.nag is not None and not isinstance(nag_negative, (Tensor, Conditioning)):
            raise ValueError("nag_negative (prompt embeds [B, L, D], or a Conditioning for Flux) is required while nag_scale > 1")
        for name, value in (("cond", cond), ("uncond", uncond)):
            if isinstance(value, Conditioning):
                self.family.check_conditioning(value, name)
                if value.batch_size != x.shape[0]:
                    raise ValueError(f"{name} has batch size {value.batch_size}, x has {x.shape[0]}")
        negative_rows = nag_negative.batch_size if isinstance(nag_negative, Conditioning) else getattr(nag_negative, "shape", (None,))[0]
        if nag_negative is not None and negative_rows != x.shape[0]:
            raise ValueError(f"nag_negative has batch size {negative_rows}, x has {x.shape[0]}")
        if self.permutations.per_image and self.tpg is not None and len(self.permutations.seeds) != x.shape[0]:
            raise ValueError(f"{len(self.permutations.seeds)} per-image seeds for a batch of {x.shape[0]} images")

    def _step_inputs(self, branches, cond: Conditioning, uncond, nag_negative) -> tuple:
        """Stacked UNet conditioning for the branches (and the NAG negative of every row).

        Computed once per set of branches for the conditioning in use, not at every step.
        """
        if self._cached_inputs is None or any(a is not b for a, b in zip(self._cached_inputs, (cond, uncond, nag_negative))):
            self._cached_inputs = (cond, uncond, nag_negative)
            self._batch_cache.clear()
        if branches not in self._batch_cache:
            dtype = self.model_dtype
            stacked = Conditioning.cat([uncond if name == "uncond" else cond for name in branches]).to(dtype=dtype)
            negative = None if nag_negative is None else _repeated(nag_negative.to(dtype=dtype), len(branches))
            self._batch_cache[branches] = (stacked, negative)
        return self._batch_cache[branches]

    def _call_nag(self, negative: Optional[Tensor], rows: slice, guided: Optional[slice]) -> Optional[NAGCall]:
        """NAG's state for one backbone call: the guided rows' negative and (a family with a fixed negative) its K/V
        in every cross-attention, computed once for the run (they are the same at every step)."""
        if negative is None or guided is None:
            return None
        key = (id(negative), rows.start, rows.stop, guided.start, guided.stop)
        if key not in self._batch_cache:
            call_negative = _rows(_rows(negative, rows), guided)
            fixed = not self.family.nag_negative_rows
            cache = {attn: negative_key_value(attn, call_negative) for attn in self._nag_attns} if fixed else {}
            settings = self.nag
            self._batch_cache[key] = NAGCall(self._nag_attns, settings.scale, settings.tau, settings.alpha, settings.use_l1, call_negative, cache)
        return self._batch_cache[key]

    def _step_permutations(self, latents: Tensor) -> Dict[nn.Module, Tensor]:
        """This step's TPG permutation of each TPG block for all images of ``latents``, drawn in the order the blocks run."""
        size = tuple(latents.shape[-2:])
        if size not in self._tpg_tokens:
            counts = self.family.token_counts(self.unet, *size)
            self._tpg_tokens[size] = [(block, self._tpg_blocks[block], tokens) for block, tokens in counts.items() if block in self._tpg_blocks]
        images = slice(0, latents.shape[0])
        return {block: self.permutations.get(index, tokens, latents.device, images) for block, index, tokens in self._tpg_tokens[size]}

    def _guided_call(self, call_rows: CallRows, permutations: Dict[nn.Module, Tensor], nag: Optional[NAGCall]) -> GuidedCall:
        """The state the hooks read during one UNet call."""
        tpg = None
        if "tpg" in call_rows.slices:
            images = call_rows.images_of("tpg")
            tpg = TPGCall({block: p if p.ndim == 1 else p[images] for block, p in permutations.items()})
        pag = PAGCall(self._pag_attns, self.pag.beta, self.pag.heads) if "pag" in call_rows.slices else None
        return GuidedCall(call_rows, tpg, pag, nag)

    def _shared(self, call: GuidedCall, branches: Tuple[str, ...], batch: int, device: torch.device) -> GuidedCall:
        """``call`` (all rows of the step in one backbone call) with its shared prefix rows: the narrowed calls,
        laid out once per set of branches for the conditioning in use (``_batch_cache``)."""
        points = self._sharing.points(branches)
        # NAG's extra text rows (joint attention) have no narrowed layout: such calls run every row from the start.
        if not points or (call.nag is not None and self.family.nag_negative_rows):
            return call
        key = ("prefix", branches, batch, id(call.nag), device)
        if key not in self._batch_cache:
            self._batch_cache[key] = call_template(points, call.rows, call.nag, device)
        return shared_call(call, self._batch_cache[key])

    def _step_of(self, level: float) -> Tuple[int, int]:
        """``(step index, steps)`` of a call at noise level ``level`` in the run's schedule."""
        levels = self._levels
        return int((levels[:-1] > level * (1 + 1e-6)).sum()), len(levels) - 1

    def _run_unet(self, model_input: Tensor, timesteps: Tensor, branches, cond, uncond, nag_negative, residuals=None) -> Tensor:
        """The backbone output of every row of the step, in calls of at most ``max_batch_rows`` rows.

        A call that runs out of memory (``dualguide.memory``) reruns the step in calls of half as many rows, down to
        one; the split that worked stays for the rest of the run, with one warning naming it. Other errors propagate."""
        batch = model_input.shape[0]
        model_input = model_input.to(self.model_dtype).repeat(len(branches), 1, 1, 1)
        timesteps = timesteps.repeat(len(branches))
        timestep_cond = None if self.timestep_cond is None else self.timestep_cond.repeat(len(branches), 1)
        stacked, negative = self._step_inputs(branches, cond, uncond, nag_negative)
        self.permutations.new_step()  # once per step: a rerun after running out of memory keeps the step's permutations
        permutations = self._step_permutations(model_input[:batch]) if "tpg" in branches else {}
        rows = len(branches) * batch
        size = rows if self.max_batch_rows is None else min(self.max_batch_rows, rows)
        failed = None
        while True:
            try:
                outputs = self._backbone_calls(
                    plan_calls(branches, batch, size), branches, permutations, model_input, timesteps, stacked, negative,
                    timestep_cond, residuals,
                )  # fmt: skip
                break
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                if size == 1:
                    add_line(error, f"dualguide: out of memory even with one row per backbone call (a step needs {rows} rows)")
                    raise
            # Retried outside the handler, so that the failed attempt's tensors (held by the traceback) are freed.
            failed, size = size, halved_rows(size)
        if failed is not None:
            self.max_batch_rows = size
            logger.warning(
                "dualguide: out of memory in a backbone call of %d rows; this run goes on with max_batch_rows=%d "
                "(%d calls per step, slower; pass max_batch_rows=%d to start there)", failed, size, -(-rows // size), size,
            )  # fmt: skip
        return outputs

    def _cache_context(self, call_rows: CallRows, nag: bool):
        """The cache context of diffusers' cache hooks (``enable_cache``: FirstBlockCache, TaylorSeer...), which keep their
        state per context as diffusers' pipelines open one around each denoiser call: here one per row layout of a call,
        so that a cache never mixes layouts (a step's branches change with the terms' intervals). None without a cache."""
        if not getattr(self.unet, "is_cache_enabled", False):
            return nullcontext()
        layout = ",".join(f"{branch}{rows.start}:{rows.stop}" for branch, rows in call_rows.slices.items())
        return self.unet.cache_context(f"dualguide:{layout}{'+nag' if nag else ''}")

    def _backbone_calls(self, calls, branches, permutations, model_input, timesteps, stacked, negative, timestep_cond, residuals) -> Tensor:
        """The backbone output of the step's rows over ``calls`` (``plan_calls``)."""
        batch = model_input.shape[0] // len(branches)
        outputs = []
        with self._call_hooks():
            for rows, call_rows in calls:
                call = self._guided_call(call_rows, permutations, self._call_nag(negative, rows, call_rows.guided))
                if len(calls) == 1:  # shared prefix rows need every row of the step in the call
                    call = self._shared(call, branches, batch, model_input.device)
                with guided_call(call), self._cache_context(call_rows, call.nag is not None):
                    outputs.append(
                        self.family.call(
                            self.unet, model_input[rows], timesteps[rows], stacked.select(rows),
                            CallExtras(
                                None if timestep_cond is None else timestep_cond[rows],
                                None if residuals is None else ([r[rows] for r in residuals[0]], residuals[1][rows]),
                                self.cross_attention_kwargs,
                            ),
                        )  # fmt: skip
                    )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
