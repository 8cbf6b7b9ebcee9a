"""Normalized Attention Guidance as a Modular Diffusers guider: CFG plus NAG inside the cond branch's backbone call.

The cond branch's backbone call is one guided call whose rows are all ``"cond"`` rows (the guided rows NAG acts on):
the family adapter's NAG processor wrappers (its ``hook_plan``) extrapolate every cross-attention's output away from
the negative, whose K/V are computed once per run by the layout's ``nag_negative`` (UNets: as ``GuidedDenoiser`` does;
Wan: after the transformer's text embedding, ``families.wan``).
NAG adds no branch; with CFG off the guider has one condition. The negative is a runtime tensor, not config.
"""

from __future__ import annotations

from typing import FrozenSet, List, Optional, Tuple

from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from ..callstate import GuidedCall, NAGCall
from ..config import NAG
from ..families import BlockLayout, layout_of
from ..hooks import HookSites
from ..rows import CallRows
from .branches import BranchGuidance, MakeCall, check_window, in_window

NEGATIVE = "nag_negative_prompt_embeds"


class RuntimeNegative:
    """``from_config`` / ``from_pretrained`` and ``new`` of a guider whose NAG negative is a runtime tensor, not config."""

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config`` (and so ``from_pretrained``), taking ``nag_negative_prompt_embeds`` too."""
        negative = kwargs.pop(NEGATIVE, None)
        loaded = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        (loaded[0] if return_unused_kwargs else loaded).nag_negative_prompt_embeds = negative
        return loaded

    def new(self, **kwargs):
        """A copy with the same config and negative (or those given)."""
        return super().new(**{NEGATIVE: self.nag_negative_prompt_embeds, **kwargs})


class NormalizedAttentionGuidance(RuntimeNegative, BranchGuidance):
    """Classifier-free guidance plus Normalized Attention Guidance (arXiv 2505.21179) for diffusers' modular pipelines.

    In every cross-attention of the cond branch's backbone call, ``Z = alpha Zt + (1 - alpha) Z+`` with
    ``Zt = nag_scale Z+ - (nag_scale - 1) Z-`` clipped to ``nag_tau`` times ``|Z+|`` (L1 with ``nag_use_l1``, else
    L2); ``Z-`` attends to ``nag_negative_prompt_embeds``. Then CFG (on for ``guidance_scale > 1``) with
    ``guidance_rescale``, in float32.

    Args:
        guidance_scale, guidance_rescale, start, stop, enabled: CFG, as ``TokenPerturbationGuidance``.
        nag_scale: NAG's extrapolation scale (``<= 1``: NAG off); nag_tau, nag_alpha, nag_use_l1: its clipping,
            blend and norm (the paper's SDXL values by default).
        nag_start, nag_stop: the fractions of the run's steps with NAG on, counted as diffusers' guiders count.
        nag_negative_prompt_embeds: the negative's prompt embeds, shaped like the pipeline's ``prompt_embeds``
            (one row per image). Not config: ``from_pretrained(path, nag_negative_prompt_embeds=...)`` takes it
            again, and it may be set on the guider between runs.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]
    ignore_for_config = [NEGATIVE]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 5.0,
        nag_scale: float = 3.0,
        nag_tau: float = 2.5,
        nag_alpha: float = 0.5,
        nag_use_l1: bool = True,
        nag_start: float = 0.0,
        nag_stop: float = 1.0,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        nag_negative_prompt_embeds: Optional[Tensor] = None,
    ) -> None:
        self._init_cfg(guidance_scale, guidance_rescale, start, stop, enabled)
        self._settings = NAG(scale=nag_scale, tau=nag_tau, alpha=nag_alpha, use_l1=nag_use_l1)  # validates, naming each
        self.nag_scale, self.nag_tau, self.nag_alpha, self.nag_use_l1 = (
            self._settings.scale, self._settings.tau, self._settings.alpha, self._settings.use_l1,
        )  # fmt: skip
        self.nag_start, self.nag_stop = check_window(nag_start, nag_stop, "nag_start", "nag_stop")
        self._model: Optional[nn.Module] = None
        self._layout: Optional[BlockLayout] = None  # the bound model's
        self._attns: FrozenSet[nn.Module] = frozenset()
        self._sites = HookSites()
        self._call: Optional[NAGCall] = None  # the negative's K/V in every cross-attention of the bound model
        self.nag_negative_prompt_embeds = nag_negative_prompt_embeds

    @property
    def nag_negative_prompt_embeds(self) -> Optional[Tensor]:
        return self._negative

    @nag_negative_prompt_embeds.setter
    def nag_negative_prompt_embeds(self, embeds: Optional[Tensor]) -> None:
        if embeds is not None and not isinstance(embeds, Tensor):
            raise TypeError(f"{NEGATIVE} must be a tensor [batch, tokens, dim] or None, got {type(embeds).__name__}")
        if embeds is not None and (embeds.ndim != 3 or not embeds.is_floating_point()):
            raise ValueError(f"{NEGATIVE} must be floating-point prompt embeds [batch, tokens, dim], got shape {tuple(embeds.shape)}")
        self._negative = embeds
        self._call = None

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:  # a new run: the negative's K/V again, from the weights as they are now
            self._call = None

    def _nag_on(self) -> bool:
        return self._enabled and self.nag_scale > 1.0

    def _nag_enabled(self) -> bool:
        return self._nag_on() and in_window(self.nag_start, self.nag_stop, self._step, self._num_inference_steps)

    def branch_names(self) -> List[str]:
        return ["pred_cond"] + ["pred_uncond"] * self._cfg_enabled()

    def check_inputs(self, batch: Optional[int]) -> None:
        if not self._nag_on():
            return
        if self._negative is None:
            raise ValueError(f"{NEGATIVE} (the NAG negative's prompt embeds, [batch, tokens, dim]) is required while nag_scale > 1")
        if batch is not None and self._negative.shape[0] != batch:
            raise ValueError(f"{NEGATIVE} has batch {self._negative.shape[0]}, the prompt embeds have {batch}: give one row per image")

    def bind(self, model: nn.Module) -> None:
        """The family's cross-attentions and NAG wrappers on ``model``, and the negative's K/V in each (once per run)."""
        if not self._nag_on():
            return
        if model is not self._model:
            family = layout_of(model)
            if family.nag_negative_rows:
                raise ValueError(
                    f"NormalizedAttentionGuidance runs on backbones with a fixed NAG negative in their cross-attentions "
                    f"(Stable Diffusion XL, 1.x / 2.x, Wan); {family.title} takes the negative as extra text rows of its backbone "
                    "call, which diffusers' per-branch loop cannot make: run it through dualguide.guiders.one_forward(pipe) (the rows ride in its one call) or dualguide's pipeline"
                )
            self._attns = family.nag_attentions(model)
            self._sites = family.hook_plan(model, (), (), self._attns)
            self._model, self._layout, self._call = model, family, None
        if self._call is None:
            negative = self._negative.to(device=model.device, dtype=model.dtype)
            negative, cache = self._layout.nag_negative(model, self._attns, negative)  # checks the width
            settings = self._settings
            self._call = NAGCall(self._attns, settings.scale, settings.tau, settings.alpha, settings.use_l1, negative, cache)

    def branch_call(self, name: str) -> Optional[Tuple[HookSites, MakeCall]]:
        return (self._sites, self.nag_call) if name == "pred_cond" and self._nag_enabled() else None

    @property
    def attentions(self) -> FrozenSet[nn.Module]:
        """The cross-attentions NAG extrapolates on the bound backbone (empty before ``bind``)."""
        return self._attns

    def nag_call(self, args: tuple, kwargs: dict) -> GuidedCall:
        """The cond branch's call: all its rows are guided rows, with the run's negative K/V."""
        rows, _ = self._layout.branch_tokens(self._model, args, kwargs)
        if rows != self._call.negative.shape[0]:
            raise ValueError(f"{NEGATIVE} has batch {self._call.negative.shape[0]}, the cond branch has {rows} rows")
        return GuidedCall(CallRows({"cond": slice(0, rows)}), nag=self._call)

    def forward(self, pred_cond: Tensor, pred_uncond: Optional[Tensor] = None):
        return self.combine(pred_cond, pred_uncond)
