"""Modular Diffusers guiders: TPG and NAG as ``diffusers.guiders.BaseGuidance`` subclasses, a thin front end over the
family adapters, hooks, call state, rows and guidance math that ``GuidedDenoiser`` uses (see ``branches``)."""

from .nag import NormalizedAttentionGuidance
from .tpg import TokenPerturbationGuidance

__all__ = ["NormalizedAttentionGuidance", "TokenPerturbationGuidance"]
