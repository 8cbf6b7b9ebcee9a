"""diffusers' ``PAGMixin`` API on the guided pipelines: what a diffusers PAG user expects, mapped onto our calls.

``pag_applied_layers=`` at construction or in ``from_pretrained(...)``, as diffusers' PAG pipelines take it, and
``set_pag_applied_layers(layers)`` set the default of every later call's ``pag_applied_layers_index`` (our ids,
diffusers' layer names, or both); ``pag_applied_layers`` reads it (the family's default layers until set);
``pag_scale`` / ``pag_adaptive_scale`` are the last call's. ``_set_pag_attn_processor`` and ``pag_attn_processors``
install and list diffusers' PAG processors on the self-attentions of the blocks those layers select, as in diffusers'
PAG pipelines, for a diffusers-style loop that restores the processors itself. Our calls never use them: they
install PAG for the call only and leave the UNet's processors as they found them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0
from diffusers.pipelines.pag.pag_utils import PAGMixin

from ..checks import check_layer_spec
from ..layers import NAMED_LAYERS_PARAMETER, parse_layer_spec, self_attentions

# diffusers' default PAG processors: with classifier-free guidance (uncond, cond, perturbed rows) and without.
DIFFUSERS_PAG_PROCESSORS = (PAGCFGIdentitySelfAttnProcessor2_0(), PAGIdentitySelfAttnProcessor2_0())
LAYERS_PARAMETER = "pag_applied_layers"  # diffusers' name at construction and in set_pag_applied_layers


def check_pag_applied_layers(layers: Union[str, Sequence[str]]) -> List[str]:
    """``layers`` as a list (a string is one item, as diffusers reads it), each item layer ids or a diffusers PAG layer
    name in form; ``ValueError`` / ``TypeError`` naming ``pag_applied_layers`` otherwise."""
    layers = [layers] if isinstance(layers, str) else list(check_layer_spec(layers, LAYERS_PARAMETER))
    parse_layer_spec(layers, LAYERS_PARAMETER)
    return layers


def with_pag_applied_layers(init: Callable) -> Callable:
    """``init`` (a diffusers pipeline's ``__init__``) taking diffusers' PAG pipelines' last parameter
    ``pag_applied_layers`` too (None: the family's default layers), in the signature ``from_pretrained`` reads."""
    signature = inspect.signature(init)
    layers = inspect.Parameter(LAYERS_PARAMETER, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                               annotation=Optional[Union[str, List[str]]])  # fmt: skip
    signature = signature.replace(parameters=[*signature.parameters.values(), layers])

    @functools.wraps(init)
    def __init__(self, *args, **kwargs) -> None:
        arguments = signature.bind(self, *args, **kwargs).arguments
        applied = arguments.pop(LAYERS_PARAMETER, None)
        if applied is not None:
            check_pag_applied_layers(applied)
        init(**arguments)
        if applied is not None:
            self.set_pag_applied_layers(applied)

    __init__.__signature__ = signature
    return __init__


class PAGLayersMixin(PAGMixin):
    """diffusers' ``PAGMixin`` on a guided pipeline (first among its mixins, before ``GuidedSamplingMixin``)."""

    _pag_attn_processors: Optional[Tuple[Any, Any]] = DIFFUSERS_PAG_PROCESSORS
    _pag_scale = 0.0
    _pag_adaptive_scale = 0.0
    _pag_layers: Optional[List[str]] = None

    def __init_subclass__(cls, **kwargs) -> None:
        """A pipeline class without an ``__init__`` of its own takes ``pag_applied_layers=`` as diffusers' PAG ones do."""
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__ and LAYERS_PARAMETER not in inspect.signature(cls.__init__).parameters:
            cls.__init__ = with_pag_applied_layers(cls.__init__)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' ``from_pretrained``; ``pag_applied_layers=`` is checked in form before anything loads, and against
        the UNet at construction."""
        if kwargs.get(LAYERS_PARAMETER) is not None:
            check_pag_applied_layers(kwargs[LAYERS_PARAMETER])
        return super().from_pretrained(*args, **kwargs)

    @property
    def pag_applied_layers(self) -> List[str]:
        """The default of each call's ``pag_applied_layers_index``: ``set_pag_applied_layers``'s, else the family's."""
        return list(self._pag_layers) if self._pag_layers is not None else [self.family.default_pag_layers]

    @pag_applied_layers.setter
    def pag_applied_layers(self, layers: Sequence[str]) -> None:
        self._pag_layers = list(layers)

    def set_pag_applied_layers(
        self, pag_applied_layers: Union[str, Sequence[str]], pag_attn_processors: Tuple[Any, Any] = DIFFUSERS_PAG_PROCESSORS
    ) -> None:
        """Make ``pag_applied_layers`` (ids such as ``"m0-m9"``, diffusers' names such as ``"mid"``, ``"down_blocks.1"``)
        the default of later calls' ``pag_applied_layers_index``; ``ValueError`` for a layer this UNet lacks, before
        anything changes (without a UNet, as for prompt encoding alone, only the form is checked now, the layers at
        the call). ``pag_attn_processors``: what ``_set_pag_attn_processor`` installs (diffusers' API)."""
        layers = check_pag_applied_layers(pag_applied_layers)
        if self.unet is not None:
            self.family.resolve(self.unet, layers, LAYERS_PARAMETER)
        super().set_pag_applied_layers(layers, pag_attn_processors)

    def call_defaults(self) -> Dict[str, Any]:
        """Defaults of a call's arguments that this pipeline's settings replace: ``pag_applied_layers_index`` once set."""
        return {} if self._pag_layers is None else {NAMED_LAYERS_PARAMETER: list(self._pag_layers)}

    def guidance_terms(self, args: Dict[str, Any]):
        """The call's terms (``GuidedSamplingMixin``), its PAG scales kept for ``pag_scale`` / ``pag_adaptive_scale``."""
        terms = super().guidance_terms(args)
        self._pag_scale, self._pag_adaptive_scale = terms[2].scale, terms[2].adaptive_scale
        return terms

    def _set_pag_attn_processor(self, pag_applied_layers: Union[str, Sequence[str]], do_classifier_free_guidance: bool) -> None:
        """diffusers' helper: its PAG processor (the CFG one when ``do_classifier_free_guidance``) on the self-attentions
        of the blocks ``pag_applied_layers`` select; ``ValueError`` for a layer this UNet lacks, before any change."""
        if self._pag_attn_processors is None:
            raise ValueError("No PAG attention processors have been set; call set_pag_applied_layers first")
        processor = self._pag_attn_processors[0 if do_classifier_free_guidance else 1]
        blocks = self.family.resolve(self.unet, pag_applied_layers, LAYERS_PARAMETER)
        for _, block in blocks:
            for _, attention in self_attentions(block):
                attention.processor = processor
