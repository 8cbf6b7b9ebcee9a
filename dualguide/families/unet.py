"""What the UNet families (SD 1.x/2.x, SDXL) share: diffusers' ``UNet2DConditionModel`` and its
``BasicTransformerBlock``s, ids d/m/u over its down, mid and up blocks."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from diffusers.models.attention import BasicTransformerBlock
from diffusers.utils.torch_utils import unwrap_module
from torch import Tensor, nn

from ..conditioning import Conditioning
from ..hooks import HookSites
from ..layers import transformer_blocks
from ..nag import NAGCrossAttnProcessor
from ..perturb import PerturbedSelfAttnProcessor, shuffle_tokens
from .base import Blocks, CallExtras, ModelFamily


def _transformer_blocks_in(module: nn.Module) -> List[nn.Module]:
    return [m for m in module.modules() if isinstance(m, BasicTransformerBlock)]


@dataclass
class _Structure:
    """What a guided run reads of one UNet's module tree: walked once per model, not per run (a walk
    of SDXL's tree is tens of thousands of Python calls). Nothing in diffusers replaces a UNet's blocks."""

    blocks: Blocks
    transformer_blocks: List[nn.Module]
    token_counts: Dict[Tuple[int, int], Dict[nn.Module, int]] = field(default_factory=dict)
    prefixes: Dict[Tuple[str, ...], List[Tuple[str, nn.Module]]] = field(default_factory=dict)  # block names -> prefix modules


_structures: "weakref.WeakKeyDictionary[nn.Module, _Structure]" = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> _Structure:
    unet = unwrap_module(model)
    structure = _structures.get(unet)
    if structure is None:
        structure = _structures[unet] = _Structure(transformer_blocks(unet), _transformer_blocks_in(unet))
    return structure


def _token_counts(unet: nn.Module, height: int, width: int) -> Dict[nn.Module, int]:
    """``UNetFamily.token_counts``, walking the tree."""
    counts: Dict[nn.Module, int] = {}
    size, skips = (height, width), []

    def record(block: nn.Module, size: Tuple[int, int]) -> None:
        counts.update((m, size[0] * size[1]) for m in _transformer_blocks_in(block))

    for block in unet.down_blocks:
        record(block, size)
        if getattr(block, "downsamplers", None):
            skips.append(size)
            size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
    if unet.mid_block is not None:
        record(unet.mid_block, size)
    for block in unet.up_blocks:
        record(block, size)
        if getattr(block, "upsamplers", None):
            size = skips.pop()
    return counts


def _run_order(module: nn.Module, name: str) -> List[str]:
    """The children of a UNet (``name`` ""), one of its blocks or a ``Transformer2DModel`` that can run before a
    transformer block, in the order the module's forward runs them; [] for any other module."""
    if not name:
        downs = [f"down_blocks.{i}" for i in range(len(module.down_blocks))]
        ups = [f"up_blocks.{i}" for i in range(len(module.up_blocks))]
        return ["conv_in", *downs, *(["mid_block"] if module.mid_block is not None else []), *ups]
    if hasattr(module, "transformer_blocks"):
        return [f"transformer_blocks.{i}" for i in range(len(module.transformer_blocks))]
    resnets = [f"resnets.{i}" for i in range(len(getattr(module, "resnets", ())))]
    attentions = [f"attentions.{i}" for i in range(len(getattr(module, "attentions", None) or ()))]
    if name == "mid_block":  # resnets[0], then each attention with the resnet after it
        return resnets[:1] + [child for pair in zip(attentions, resnets[1:]) for child in pair]
    return [child for pair in zip(resnets, attentions) for child in pair] if attentions else resnets


def _before(unet: nn.Module, path: str) -> Tuple[Tuple[int, ...], List[Tuple[str, nn.Module]]]:
    """The run-order position of the module ``path`` (per level) and the coarsest modules that run entirely before it."""
    module, name, position, before = unet, "", [], []
    while name != path:
        rest = path[len(name) + 1 :] if name else path
        order = _run_order(module, name)
        at = next((i for i, child in enumerate(order) if rest == child or rest.startswith(child + ".")), None)
        if at is None:  # a level this walk does not know: what runs before it is all it can tell
            break
        position.append(at)
        before += [(f"{name}.{child}" if name else child, module.get_submodule(child)) for child in order[:at]]
        name, module = f"{name}.{order[at]}" if name else order[at], module.get_submodule(order[at])
    return tuple(position), before


class UNetFamily(ModelFamily):
    """A ``UNet2DConditionModel`` family: TPG shuffles each block's input tokens, PAG perturbs ``attn1``,
    NAG extrapolates every ``attn2``; the subclass says which UNets it takes and what a row carries."""

    def blocks(self, model: nn.Module) -> Blocks:
        return dict(_structure(model).blocks)

    def tpg_module(self, block: nn.Module) -> nn.Module:
        return block

    def pag_attentions(self, block: nn.Module) -> List[nn.Module]:
        return [block.attn1]

    def nag_attentions(self, model: nn.Module) -> FrozenSet[nn.Module]:
        return frozenset(b.attn2 for b in _structure(model).transformer_blocks if b.attn2 is not None)

    def hook_plan(
        self, model: nn.Module, tpg_modules: Iterable[nn.Module], pag_attns: Iterable[nn.Module], nag_attns: Iterable[nn.Module]
    ) -> HookSites:
        """TPG's pre-hook on each block, PAG's wrapper on ``attn1``, NAG's on ``attn2``."""
        return HookSites(
            tuple((block, shuffle_tokens) for block in tpg_modules),
            tuple((attn, PerturbedSelfAttnProcessor) for attn in pag_attns) + tuple((attn, NAGCrossAttnProcessor) for attn in nag_attns),
        )

    def hook_sites(self, model: nn.Module) -> HookSites:
        blocks = list(_structure(model).transformer_blocks)
        return self.hook_plan(model, blocks, [b.attn1 for b in blocks], [b.attn2 for b in blocks if b.attn2 is not None])

    def prefix_modules(self, model: nn.Module, names: Sequence[str]) -> List[Tuple[str, nn.Module]]:
        """``conv_in``, the down / mid / up blocks, and within the first block's own UNet block and
        ``Transformer2DModel`` the resnets, attentions and transformer blocks that run before it (its
        ``Transformer2DModel``'s norm and ``proj_in`` stay wide: they cost almost nothing)."""
        known, names = _structure(model).prefixes, tuple(names)
        if names not in known:
            unet = unwrap_module(model)
            known[names] = min((_before(unet, name) for name in names), default=((), []))[1]
        return list(known[names])

    def token_counts(self, model: nn.Module, height: int, width: int) -> Dict[nn.Module, int]:
        """Down blocks halve the size after their attentions (rounding up, as their stride-2 convolutions
        do); the mid block works at the smallest size; each up block upsamples to its skip's size."""
        known = _structure(model).token_counts
        if (height, width) not in known:
            known[(height, width)] = _token_counts(unwrap_module(model), height, width)
        return dict(known[(height, width)])

    def added_conditioning(self, cond: Conditioning) -> Optional[Dict[str, object]]:
        """The UNet's ``added_cond_kwargs`` for the rows of ``cond``: its extra conditioning and IP-Adapter image embeds."""
        added = cond.added_cond_kwargs() or {}
        if cond.image_embeds is not None:
            added["image_embeds"] = cond.image_embeds
        return added or None

    def call(self, model: nn.Module, sample: Tensor, timesteps: Tensor, cond: Conditioning, extras: CallExtras) -> Tensor:
        residuals = extras.residuals
        return model(
            sample,
            timesteps,
            encoder_hidden_states=cond.prompt_embeds,
            added_cond_kwargs=self.added_conditioning(cond),
            timestep_cond=extras.timestep_cond,
            encoder_attention_mask=cond.attention_mask,
            down_block_additional_residuals=None if residuals is None else list(residuals[0]),
            mid_block_additional_residual=None if residuals is None else residuals[1],
            cross_attention_kwargs=extras.attention_kwargs,
            return_dict=False,
        )[0]

    def is_unet(self, model: nn.Module) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(unwrap_module(model), UNet2DConditionModel)
