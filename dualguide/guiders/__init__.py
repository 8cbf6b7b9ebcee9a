"""Modular Diffusers guiders: TPG and NAG as ``diffusers.guiders.BaseGuidance`` subclasses, a thin front end over the
family adapters, hooks, call state, rows and guidance math that ``GuidedDenoiser`` uses (see ``branches``), and
``one_forward`` for every branch in one backbone call per step (see ``loop``)."""

from .dual import DualGuidance
from .loop import one_forward
from .nag import NormalizedAttentionGuidance
from .tpg import TokenPerturbationGuidance

__all__ = ["DualGuidance", "NormalizedAttentionGuidance", "TokenPerturbationGuidance", "one_forward"]
