"""Modular Diffusers guiders: TPG and NAG as ``diffusers.guiders.BaseGuidance`` subclasses, a thin front end over the
family adapters, hooks, call state, rows and guidance math that ``GuidedDenoiser`` uses (see ``branches``), and
``one_forward`` for every branch in one backbone call per step (see ``loop``), and ``with_nag_negative_prompt`` for NAG's
negative as text, encoded by the pipeline's own text encoder (see ``text``)."""

from .dual import DualGuidance
from .loop import one_forward
from .nag import NormalizedAttentionGuidance
from .text import (
    NAGNegativePromptStep,
    StableDiffusion3NAGNegativePromptStep,
    StableDiffusionXLNAGNegativePromptStep,
    WanNAGNegativePromptStep,
    WanOneConditionTextEncoderStep,
    with_nag_negative_prompt,
)
from .tpg import TokenPerturbationGuidance

__all__ = [
    "DualGuidance",
    "NAGNegativePromptStep",
    "NormalizedAttentionGuidance",
    "StableDiffusion3NAGNegativePromptStep",
    "StableDiffusionXLNAGNegativePromptStep",
    "TokenPerturbationGuidance",
    "WanNAGNegativePromptStep",
    "WanOneConditionTextEncoderStep",
    "one_forward",
    "with_nag_negative_prompt",
]
