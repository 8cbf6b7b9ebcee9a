"""The family seam: what the denoiser needs to know about one backbone type.

A ``ModelFamily`` adapter answers, for one backbone: how its blocks are enumerated and named
(layer ids), which module's input tokens TPG shuffles, which self-attention PAG perturbs, which
attentions NAG extrapolates (and how its hooks are installed), how many tokens enter each TPG module, what a row's conditioning
must hold, and how one backbone call is made with row-stacked conditioning. The denoiser, hooks,
call state and guidance math go through it and name no family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from diffusers.utils.torch_utils import unwrap_module
from torch import Tensor, nn

from ..conditioning import Conditioning
from ..hooks import HookSites
from ..layers import LayerSpec, resolve_ids
from ..nag import negative_key_value

Blocks = Dict[str, Tuple[str, nn.Module]]  # layer id -> (module name, block)


@dataclass(frozen=True)
class CallExtras:
    """What one backbone call takes beside the rows: a guidance-distilled UNet's ``timestep_cond``, ControlNet
    ``residuals`` (down block residuals, mid block residual), the attention processors' kwargs."""

    timestep_cond: Optional[Tensor] = None
    residuals: Optional[Tuple[Sequence[Tensor], Tensor]] = None
    attention_kwargs: Optional[dict] = None


def backbone_sample(args: tuple, kwargs: dict) -> Tensor:
    """The latents of a direct backbone call: the first positional argument (UNets), else ``sample`` / ``hidden_states``."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    if not isinstance(sample, Tensor):
        raise TypeError("a guided branch's backbone call must take its latents first, or as sample= / hidden_states=")
    return sample


class BlockLayout(ABC):
    """What the Modular Diffusers guiders need of a backbone, whose calls diffusers' loops make: its layer ids and
    blocks, the module TPG permutes in each, the hooks for a set of terms, and the rows and tokens of a call. Every
    ``ModelFamily`` is one; a guider-only layout (``families.wan``, ``families.generic``) is only this."""

    name: str  # short name ("sdxl", "sd", "sd3")
    title: str  # how messages and the README name it
    default_tpg_layers: str
    # How NAG's negative enters: False, fixed K/V of the negative text in every cross-attention (computed once per
    # run, UNets); True, extra text-stream rows, one per guided row, appended by ``call`` (MMDiT joint attention).
    nag_negative_rows: bool = False

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
    def branch_tokens(self, model: nn.Module, args: tuple, kwargs: dict) -> Tuple[int, Dict[nn.Module, int]]:
        """``(rows, image tokens entering each TPG module)`` of a direct call ``model(*args, **kwargs)``, as a
        modular loop makes it (the modules in the order the forward runs them)."""

    @abstractmethod
    def hook_plan(
        self, model: nn.Module, tpg_modules: Iterable[nn.Module], pag_attns: Iterable[nn.Module], nag_attns: Iterable[nn.Module]
    ) -> HookSites:
        """The pre-hooks and processor wrappers of ``model`` that carry out TPG on ``tpg_modules``, PAG on
        ``pag_attns`` and NAG on ``nag_attns`` (NAG's whole set, or none)."""

    def default_tpg_for(self, model: nn.Module) -> str:
        """TPG's default layer ids on ``model`` (``default_tpg_layers``; a layout of many depths may compute them)."""
        return self.default_tpg_layers

    def nag_attentions(self, model: nn.Module) -> FrozenSet[nn.Module]:
        """The attentions NAG extrapolates (all of the model's text attentions); ``ValueError`` on a layout without
        NAG semantics (the default)."""
        raise ValueError(f"NAG has no semantics on {self.title} (no published NAG for it); use TPG or CFG there")

    def nag_negative(self, model: nn.Module, attns: FrozenSet[nn.Module], negative: Tensor) -> Tuple[Tensor, Dict[nn.Module, Tuple[Tensor, Tensor]]]:
        """NAG's fixed negative as ``attns`` take it, and its K/V heads in each (once per run: ``NAGCall.negative`` and
        ``cache``); ``ValueError`` naming ``nag_negative_prompt_embeds`` when its width does not fit. By default the
        prompt embeds themselves, with ``dualguide.nag``'s K/V (UNet cross-attentions)."""
        width = next(iter(attns)).to_k.in_features
        if negative.shape[-1] != width:
            raise ValueError(f"nag_negative_prompt_embeds has width {negative.shape[-1]}, the backbone's cross-attentions take {width}")
        return negative, {attn: negative_key_value(attn, negative) for attn in attns}

    def resolve(self, model: nn.Module, spec: LayerSpec, parameter: str) -> List[Tuple[str, nn.Module]]:
        """``(module name, block)`` of each id in ``spec``; ``ValueError`` naming ``parameter`` and the valid ranges."""
        return resolve_ids(self.blocks(model), spec, parameter)


class ModelFamily(BlockLayout):
    """Adapter of one backbone family that dualguide's pipelines and denoiser run; one stateless instance per family."""

    default_tpg_scale: float = 3.0  # the pipelines' tpg_scale default (0: TPG off unless asked for)
    default_pag_layers: str
    # Whether NAG's negative carries pooled embeds of its own (Flux: its rows' ``temb``), given as
    # ``nag_negative_prompt_2`` / ``nag_negative_pooled_prompt_embeds`` beside the negative text.
    pooled_nag_negative: bool = False

    @abstractmethod
    def pag_attentions(self, block: nn.Module) -> List[nn.Module]:
        """The self-attentions of ``block`` that PAG / SoftPAG perturbs."""

    @abstractmethod
    def nag_attentions(self, model: nn.Module) -> FrozenSet[nn.Module]:
        """The attentions NAG extrapolates (all of the model's text attentions)."""

    @abstractmethod
    def token_counts(self, model: nn.Module, height: int, width: int) -> Dict[nn.Module, int]:
        """Image tokens entering each TPG module for ``height x width`` latents, in the order the forward runs them."""

    @abstractmethod
    def check_conditioning(self, cond: Conditioning, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` when ``cond`` lacks what a row of this family carries."""

    @abstractmethod
    def call(self, model: nn.Module, sample: Tensor, timesteps: Tensor, cond: Conditioning, extras: CallExtras) -> Tensor:
        """One backbone call on row-stacked ``sample`` / ``cond`` (and ``extras``, per row): its output."""

    @abstractmethod
    def hook_sites(self, model: nn.Module) -> HookSites:
        """Every hook and wrapper any guided call may use: what a compiled model keeps installed."""

    def prefix_modules(self, model: nn.Module, names: Sequence[str]) -> List[Tuple[str, nn.Module]]:
        """``(name, module)`` of the coarsest modules of ``model`` that run entirely before the first of the blocks
        ``names`` (module names), whose output rows a perturbation there cannot change; [] (the default) when the
        family does not share prefix rows (``dualguide.sharing``). By default the modules of ``run_order`` before the
        first of ``names``."""
        order = self.run_order(model)
        first = min((order.index(name) for name in names if name in order), default=0)
        return [(name, unwrap_module(model).get_submodule(name)) for name in order[:first]]

    def run_order(self, model: nn.Module) -> List[str]:
        """For a transformer family: the names of the row-wise modules of ``model`` in the order its forward runs them
        (embedders, then blocks), which ``prefix_modules`` cuts at the first perturbed block; [] (the default): none."""
        return []

    def branch_tokens(self, model: nn.Module, args: tuple, kwargs: dict) -> Tuple[int, Dict[nn.Module, int]]:
        """Rows and ``token_counts`` of the call's latents (``[B, C, H, W]``, the first argument or ``sample`` /
        ``hidden_states``)."""
        sample = backbone_sample(args, kwargs)
        return sample.shape[0], self.token_counts(model, *sample.shape[-2:])
