"""The guidance and sampler arguments every guided pipeline adds to its diffusers parent, defined once.

``guided_call`` builds a pipeline's ``__call__`` from its diffusers parent's signature plus these
parameters (with the family's default layers), so ``inspect.signature`` and ``help()`` show every
argument. ``ABSENT`` fills in the arguments a pipeline lacks, at the value that means "not used",
for the shared runs and checks.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from ..config import IntervalLike
from ..families import ModelFamily
from ..layers import LayerSpec
from ..validation import checked_call
from .exclusive import one_call_per_scheduler

# Arguments of the task pipelines that some diffusers pipeline lacks, at the value that means "not used".
ABSENT: Dict[str, Any] = {
    "timesteps": None, "sigmas": None, "denoising_start": None, "denoising_end": None, "guidance_rescale": 0.0,
    "masked_image_latents": None, "negative_original_size": None, "negative_crops_coords_top_left": (0, 0),
    "negative_target_size": None, "latents": None, "height": None, "width": None, "eta": 0.0, "mu": None,
    "skip_guidance_layers": None
}  # fmt: skip


# ``callback_on_step_end(pipe, step, timestep, tensors)`` returns replacements for the named tensors.
CALLBACK_ANNOTATIONS = {
    "callback_on_step_end": Optional[Callable[..., Dict[str, torch.Tensor]]],
    "callback_on_step_end_tensor_inputs": Sequence[str],
}


def with_absent(args: Dict[str, Any]) -> Dict[str, Any]:
    """``args`` with the arguments its pipeline lacks filled in from ``ABSENT``."""
    return {**{name: value for name, value in ABSENT.items() if name not in args}, **args}


def guidance_parameters(family: ModelFamily) -> List[inspect.Parameter]:
    """The guidance, interval, sampler and long-prompt parameters, with ``family``'s default layers."""
    specs = [
        ("tpg_scale", float, family.default_tpg_scale),
        ("tpg_applied_layers_index", LayerSpec, family.default_tpg_layers),
        ("pag_scale", Optional[float], None),
        ("pag_adaptive_scale", float, 0.0),
        ("pag_applied_layers_index", LayerSpec, family.default_pag_layers),
        ("do_nag", Optional[bool], None),
        ("nag_scale", Optional[float], None),
        ("nag_tau", Optional[float], None),
        ("nag_alpha", Optional[float], None),
        ("nag_use_l1", Optional[bool], None),
        ("nag_negative_prompt", Optional[Union[str, List[str]]], None),
        ("nag_negative_prompt_embeds", Optional[torch.Tensor], None),
        *([("nag_negative_prompt_2", Optional[Union[str, List[str]]], None), ("nag_negative_pooled_prompt_embeds", Optional[torch.Tensor], None)]
          if family.pooled_nag_negative else []),
        ("nag_end", Optional[float], None),
        ("cfg_interval", IntervalLike, None),
        ("tpg_interval", IntervalLike, None),
        ("pag_interval", IntervalLike, None),
        ("nag_interval", IntervalLike, None),
        ("sampler", Optional[Union[str, Callable]], None),
        ("sigma_schedule", Optional[str], None),
        ("sigma_min", Optional[float], None),
        ("sigma_max", Optional[float], None),
        ("max_batch_rows", Optional[int], None),
        ("share_prefix", bool, True),
        ("truncate_long_prompts", bool, False),
    ]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [inspect.Parameter(name, kind, default=default, annotation=annotation) for name, annotation, default in specs]


GUIDANCE_DOC = """
        Dual guidance: ``tpg_scale`` ({tpg_scale:g}; 0 turns TPG off) on ``tpg_applied_layers_index`` ({tpg}),
        ``pag_scale`` (0, or 3.0 after ``apply_softpag``; ``pag_adaptive_scale`` lowers it by that much per
        timestep below 1000, as diffusers' PAG pipelines) on ``pag_applied_layers_index`` ({pag}), and NAG
        with ``do_nag`` and ``nag_scale`` (3.0), ``nag_tau`` (2.5), ``nag_alpha`` (0.5), ``nag_use_l1``
        (True), ``nag_negative_prompt``, ``nag_end`` (1.0). ``*_interval`` limit a term to ``(start, end)``
        fractions of the schedule. Without ``sampler`` the loop follows ``pipe.scheduler`` as diffusers
        does; a k-diffusion sampler name or a callable runs that sampler instead, over ``sigma_schedule``
        ("model", "karras", "exponential"), ``sigmas`` or ``timesteps``. ``max_batch_rows`` splits a step's rows
        over several UNet calls to save memory; ``share_prefix`` (True) runs the TPG / PAG rows as the cond row until their
        first perturbed block (same images, fewer FLOPs). Prompts longer than the tokenizer's window are encoded window
        by window unless ``truncate_long_prompts``.
"""


def guided_signature(parent_call: Callable, family: ModelFamily, defaults: Optional[Dict[str, Any]] = None) -> inspect.Signature:
    """``parent_call``'s parameters (without its deprecated ``**kwargs``; ``defaults`` replacing some defaults; the
    callback as the guided runs call it, its tensor names an immutable ``("latents",)``) followed by the guidance
    parameters."""
    defaults = {"callback_on_step_end_tensor_inputs": ("latents",), **(defaults or {})}
    own = [
        p.replace(default=defaults.get(p.name, p.default), annotation=CALLBACK_ANNOTATIONS.get(p.name, p.annotation))
        for p in inspect.signature(parent_call).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    return inspect.Signature(own + guidance_parameters(family))


def with_pipeline_defaults(call: Callable) -> Callable:
    """``call`` taking each argument its caller leaves out from the pipeline's ``call_defaults()`` where it has one
    (``set_pag_applied_layers`` sets ``pag_applied_layers_index``'s); the others keep the signature's defaults."""
    signature = inspect.signature(call)

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        defaults = getattr(self, "call_defaults", dict)()
        if defaults:
            passed = signature.bind_partial(self, *args, **kwargs).arguments
            kwargs.update((name, value) for name, value in defaults.items() if name not in passed)
        return call(self, *args, **kwargs)

    return __call__


def guided_call(
    parent: type, family: ModelFamily, check: Callable[[Any, Dict[str, Any]], Dict[str, Any]], run: str, summary: str,
    defaults: Optional[Dict[str, Any]] = None,
) -> Callable:
    """A pipeline ``__call__``: ``parent.__call__``'s arguments (``defaults`` overriding some of its defaults) plus
    the guidance ones, all checked by ``check`` (arguments the pipeline lacks filled from ``ABSENT``), then handed
    to the shared run ``self.<run>(args)``; one call at a time per scheduler; the pipeline's ``call_defaults()``
    (``set_pag_applied_layers``) replace the signature's defaults."""

    def __call__(self, **arguments):
        return getattr(self, run)(with_absent(arguments))

    __call__.__signature__ = guided_signature(parent.__call__, family, defaults)
    __call__.__doc__ = (
        f"{summary}\n\n        The arguments of ``{parent.__name__}`` mean what they mean there.\n"
        + GUIDANCE_DOC.format(tpg_scale=family.default_tpg_scale, tpg=repr(family.default_tpg_layers), pag=repr(family.default_pag_layers))
    )
    checked = checked_call(lambda pipe, args: check(pipe, with_absent(args)))(torch.no_grad()(__call__))
    return one_call_per_scheduler(with_pipeline_defaults(checked))
