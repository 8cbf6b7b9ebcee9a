"""The family seam: what the denoiser needs to know about one backbone type.

A ``ModelFamily`` adapter answers, for one backbone: how its blocks are enumerated and named
(layer ids), which module's input tokens TPG shuffles, which self-attention PAG perturbs, which
cross-attentions NAG extrapolates, how many tokens enter each TPG module, what a row's conditioning
must hold, and how one backbone call is made with row-stacked conditioning. The denoiser, hooks,
call state and guidance math go through it and name no family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..conditioning import Conditioning
from ..layers import LayerSpec, resolve_ids

Blocks = Dict[str, Tuple[str, nn.Module]]  # layer id -> (module name, block)


class ModelFamily(ABC):
    """Adapter of one backbone family; one stateless instance per family."""

    name: str  # short name ("sdxl", "sd")
    title: str  # how messages and the README name it
    default_tpg_layers: str
    default_pag_layers: str

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` (unwrapped from ``torch.compile``) is a backbone of this family."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> Blocks:
        """Every layer id of ``model``, in the order the ids count, with its block."""

    @abstractmethod
    def tpg_module(self, block: nn.Module) -> nn.Module:
        """The module of ``block`` whose input image tokens TPG permutes (a forward pre-hook on it)."""

    @abstractmethod
    def pag_attention(self, block: nn.Module) -> nn.Module:
        """The self-attention of ``block`` that PAG / SoftPAG perturbs."""

    @abstractmethod
    def nag_attentions(self, model: nn.Module) -> FrozenSet[nn.Module]:
        """The cross-attentions NAG extrapolates (all of the model's text attentions)."""

    @abstractmethod
    def token_counts(self, model: nn.Module, height: int, width: int) -> Dict[nn.Module, int]:
        """Image tokens entering each TPG module for ``height x width`` latents, in the order the forward runs them."""

    @abstractmethod
    def check_conditioning(self, cond: Conditioning, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` when ``cond`` lacks what a row of this family carries."""

    @abstractmethod
    def call(
        self,
        model: nn.Module,
        sample: Tensor,
        timesteps: Tensor,
        cond: Conditioning,
        *,
        timestep_cond: Optional[Tensor] = None,
        residuals: Optional[Tuple[Sequence[Tensor], Tensor]] = None,
        cross_attention_kwargs: Optional[dict] = None,
    ) -> Tensor:
        """One backbone call on row-stacked ``sample`` / ``cond`` (ControlNet ``residuals`` per row): its output."""

    @abstractmethod
    def hook_sites(self, model: nn.Module) -> Tuple[List[nn.Module], List[nn.Module], List[nn.Module]]:
        """Every TPG module, PAG self-attention and NAG cross-attention: what a compiled model keeps hooked."""

    def resolve(self, model: nn.Module, spec: LayerSpec, parameter: str) -> List[Tuple[str, nn.Module]]:
        """``(module name, block)`` of each id in ``spec``; ``ValueError`` naming ``parameter`` and the valid ranges."""
        return resolve_ids(self.blocks(model), spec, parameter)
