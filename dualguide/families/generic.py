"""Guider-only layouts of the other transformers whose Modular Diffusers loops take a guider: Flux.2 (dev, [klein]),
Qwen-Image and Z-Image (diffusers 0.42.1), and backbones of the same shape. Only TPG runs on them: NAG has no
published semantics there (``nag_attentions`` refuses, naming the family), and the guiders ask for no PAG.

**Blocks, found by structure.** A ``Shape`` names what the backbone's forward takes and its ``nn.ModuleList``s of
blocks, in the order the forward runs them, with what their blocks' forwards take; a backbone matches when it has
those parameters and non-empty lists (so an unknown backbone still gets ``layout_of``'s one ``TypeError``). Ids
count within each list, as Flux.1's: ``j0-jN`` over a list of dual-stream blocks (a text stream of its own in and
out of each block: Flux.2's and Qwen-Image's ``transformer_blocks``), ``s0-sM`` over a list of single-stream blocks
(one sequence of text and image tokens: Flux.2's ``single_transformer_blocks``, Z-Image's main ``layers``).
Z-Image's refiners (image-only and caption-only blocks before the main layers) get no ids.

**Where the image tokens sit** (diffusers 0.42.1's forwards). TPG permutes the generated image tokens entering each
selected block; text, reference-image and padding tokens enter as they are.

* Dual-stream blocks: ``hidden_states`` is the image stream, the generated tokens first (Flux.2 [klein]'s and
  Qwen-Image Edit's reference-image tokens follow them).
* Flux.2's single blocks: ``[text, image]`` (the forward concatenates the streams after the dual blocks), so the
  image tokens follow the call's ``encoder_hidden_states`` tokens, which ``record_text_tokens`` counts per call.
* Z-Image's main layers (its basic call): ``[image, caption]`` per row, the image padded with a pad token to a
  multiple of 32 tokens, so the first ``F/pF * H/p * W/p`` tokens are the image, the padding after them.

**Generated tokens of a call** (``branch_tokens``, from the loop's call arguments): Flux.2, the leading tokens whose
``img_ids`` time coordinate is the first token's (diffusers gives the latents t=0, reference images t=10, 20, ...;
one host sync per TPG call); Qwen-Image, the first shape of ``img_shapes``; Z-Image, ``F/pF * H/p * W/p`` of the
latents. Refused at the call: Flux.2 calls with a ``kv_cache_mode`` (reference tokens put first), Z-Image's Omni call
(nested lists) and latents of several sizes (no diffusers 0.42.1 modular loop makes them); before any call (at
``hook_plan``): Qwen-Image Layered (``use_layer3d_rope``: several generated layers).

**Default** ``tpg_layers`` (``default_tpg_for``): SDXL's TPG layers d6-d23 are its transformer blocks at 9-34% of its
depth D = 70; over a backbone's blocks in run order, the rule takes blocks ``floor(0.09 D)`` to ``floor(0.34 D)``
(``depth_span``; it gives the project's SDXL d6-d23, SD3 j2-j8 and Flux.1 blocks 5-19 too). On the released models:

* Flux.2 [klein] 4B and [klein] base 4B (5 + 20 blocks): ``j2-j4,s0-s3``
* Flux.2 [klein] 9B and [klein] base 9B (8 + 24): ``j2-j7,s0-s2``
* Flux.2 [dev] (8 + 48): ``j5-j7,s0-s11``
* Qwen-Image, Qwen-Image Edit (60): ``j5-j20``
* Z-Image (30 main layers): ``s2-s10``

TPG is experimental on all of them (no published reference); positions live in RoPE, so permuted tokens carry their
content to other positions.
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, List, Mapping, Sequence, Tuple

import torch
from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from ..callstate import current_call
from ..hooks import HookSites
from ..perturb import shuffle_token_span
from .base import BlockLayout, Blocks

# The text tokens before the image tokens in a single block's ``[text, image]`` sequence, for the call in flight.
_TEXT_TOKENS: ContextVar[int] = ContextVar("dualguide_generic_text_tokens", default=0)


def record_text_tokens(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a backbone whose single blocks take ``[text, image]``: the call's text tokens (its
    ``encoder_hidden_states``, the second argument)."""
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    _TEXT_TOKENS.set(text.shape[1])


def _shuffle_from(module: nn.Module, args: tuple, kwargs: dict, start: int):
    """``perturb.shuffle_token_span`` on the block input's tokens ``start`` to ``start +`` the permutation's length."""
    call = current_call()
    permutation = None if call is None or call.tpg is None else call.tpg.permutations.get(module)
    if permutation is None:
        return None
    return shuffle_token_span(module, args, kwargs, start, start + permutation.shape[-1])


def shuffle_leading_tokens(module: nn.Module, args: tuple, kwargs: dict):
    """TPG's forward pre-hook on a block whose input (``hidden_states`` or its first argument) starts with the
    generated image tokens; the tokens after them (reference images, padding, Z-Image's caption) are left."""
    return _shuffle_from(module, args, kwargs, 0)


def shuffle_tokens_after_text(module: nn.Module, args: tuple, kwargs: dict):
    """TPG's forward pre-hook on a single block taking ``[text, image]``: the generated image tokens after the call's
    text tokens (``record_text_tokens``); the text and the reference-image tokens are left."""
    return _shuffle_from(module, args, kwargs, _TEXT_TOKENS.get())


@dataclass(frozen=True)
class Stack:
    """One ``nn.ModuleList`` of blocks: its attribute, its ids' prefix (``"j"`` dual-, ``"s"`` single-stream), the
    parameters its blocks' forward takes, and whether its blocks' sequence puts the call's text before the image."""

    attribute: str
    prefix: str
    block_params: FrozenSet[str]
    after_text: bool = False


# (rows, generated image tokens) of a backbone call, from the backbone and the call's arguments by name.
Generated = Callable[[nn.Module, Mapping[str, object]], Tuple[int, int]]


def _any_model(transformer: nn.Module) -> None:
    """A shape's ``check_model`` when every model of the shape runs TPG."""


@dataclass(frozen=True)
class Shape:
    """A backbone type as the layout sees it: the parameters its forward takes, its stacks in run order, how a call's
    arguments give its rows and generated image tokens, and ``check_model`` (``ValueError`` for a variant it cannot
    run, before any backbone call)."""

    call_params: FrozenSet[str]
    stacks: Tuple[Stack, ...]
    generated: Generated
    check_model: Callable[[nn.Module], None] = _any_model


def _takes(function: Callable, params: FrozenSet[str]) -> bool:
    return params <= inspect.signature(function).parameters.keys()


def depth_span(ids: Sequence[str]) -> str:
    """TPG's default over a backbone's layer ids in run order: the blocks ``floor(0.09 D)`` to ``floor(0.34 D)`` of
    its depth ``D``, written as ranges per prefix (``"j5-j7,s0-s11"``)."""
    depth = len(ids)
    spans: Dict[str, List[str]] = {}
    for layer_id in ids[9 * depth // 100 : 34 * depth // 100 + 1]:
        spans.setdefault(layer_id[0], []).append(layer_id)
    return ",".join(span[0] if len(span) == 1 else f"{span[0]}-{span[-1]}" for span in spans.values())


class TransformerLayout(BlockLayout):
    """The guiders' layout of one ``Shape`` of transformer (see the module's docstring)."""

    def __init__(self, name: str, title: str, shape: Shape, reference_default: str) -> None:
        self.name, self.title, self.shape = name, title, shape
        self.default_tpg_layers = reference_default  # on the family's first released depth; default_tpg_for computes it

    def matches(self, model: nn.Module) -> bool:
        transformer = unwrap_module(model)
        if not _takes(transformer.forward, self.shape.call_params):
            return False
        for stack in self.shape.stacks:
            blocks = getattr(transformer, stack.attribute, None)
            if not isinstance(blocks, nn.ModuleList) or not len(blocks):
                return False
            if not all(_takes(block.forward, stack.block_params) for block in {type(b): b for b in blocks}.values()):
                return False
        return True

    def blocks(self, model: nn.Module) -> Blocks:
        transformer = unwrap_module(model)
        return {
            f"{stack.prefix}{index}": (f"{stack.attribute}.{index}", block)
            for stack in self.shape.stacks
            for index, block in enumerate(getattr(transformer, stack.attribute))
        }

    def default_tpg_for(self, model: nn.Module) -> str:
        return depth_span(list(self.blocks(model)))

    def tpg_module(self, block: nn.Module) -> nn.Module:
        return block

    def branch_tokens(self, model: nn.Module, args: tuple, kwargs: dict) -> Tuple[int, Dict[nn.Module, int]]:
        """Rows and generated image tokens of the call (the same in every block), its arguments bound by name."""
        transformer = unwrap_module(model)
        call = inspect.signature(transformer.forward).bind_partial(*args, **kwargs)
        call.apply_defaults()
        rows, tokens = self.shape.generated(transformer, call.arguments)
        return rows, {block: tokens for _, block in self.blocks(transformer).values()}

    def hook_plan(
        self, model: nn.Module, tpg_modules: Iterable[nn.Module], pag_attns: Iterable[nn.Module], nag_attns: Iterable[nn.Module]
    ) -> HookSites:
        """TPG's pre-hook on each selected block, by where its stack's image tokens sit; for blocks after the text,
        the backbone's ``record_text_tokens``. ``ValueError`` for a variant the shape cannot run."""
        if list(pag_attns) or list(nag_attns):
            raise ValueError(f"only TPG runs on {self.title}: PAG and NAG have no published semantics there")
        selected, transformer = set(tpg_modules), unwrap_module(model)
        self.shape.check_model(transformer)
        pre_hooks = [
            (block, shuffle_tokens_after_text if stack.after_text else shuffle_leading_tokens)
            for stack in self.shape.stacks
            for block in getattr(transformer, stack.attribute)
            if block in selected
        ]
        if any(hook is shuffle_tokens_after_text for _, hook in pre_hooks):
            pre_hooks.insert(0, (transformer, record_text_tokens))
        return HookSites(tuple(pre_hooks))


def _flux2_generated(transformer: nn.Module, call: Mapping[str, object]) -> Tuple[int, int]:
    tokens, ids = call["hidden_states"], call["img_ids"]
    if call.get("kv_cache_mode") is not None:
        raise ValueError("TPG on Flux.2 takes calls without kv_cache_mode (reference tokens put first for a KV cache are not supported)")
    if ids is None:
        return tokens.shape[0], tokens.shape[1]
    time = (ids[0] if ids.ndim == 3 else ids)[:, 0]
    other = int(torch.argmax((time != time[0]).int()))  # the first token of another time; 0 when there is none
    return tokens.shape[0], other or tokens.shape[1]


def _qwen_image_check(transformer: nn.Module) -> None:
    if getattr(transformer.config, "use_layer3d_rope", False):
        raise ValueError("TPG on Qwen-Image Layered (use_layer3d_rope) is not supported: its call generates several layers")


def _qwen_image_generated(transformer: nn.Module, call: Mapping[str, object]) -> Tuple[int, int]:
    tokens, shapes = call["hidden_states"], call["img_shapes"]
    if not shapes:
        return tokens.shape[0], tokens.shape[1]
    first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]  # a row's shapes, or its one shape
    frames, height, width = first
    return tokens.shape[0], frames * height * width


def _z_image_generated(transformer: nn.Module, call: Mapping[str, object]) -> Tuple[int, int]:
    latents = call["x"]
    if isinstance(latents[0], list):
        raise ValueError("TPG on Z-Image takes its basic call (one latent [C, F, H, W] per image), not the Omni call's nested lists")
    if len({tuple(latent.shape) for latent in latents}) > 1:
        raise ValueError("TPG on Z-Image takes latents of one size in a call")
    _, frames, height, width = latents[0].shape
    patch, frame_patch = call["patch_size"], call["f_patch_size"]
    return len(latents), (frames // frame_patch) * (height // patch) * (width // patch)


FLUX2 = TransformerLayout(
    "flux2",
    "Flux.2",
    Shape(
        frozenset({"hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"}),
        (
            Stack("transformer_blocks", "j", frozenset({"hidden_states", "encoder_hidden_states", "temb_mod_img", "temb_mod_txt"})),
            Stack("single_transformer_blocks", "s", frozenset({"hidden_states", "temb_mod", "text_seq_len"}), after_text=True),
        ),
        _flux2_generated,
    ),
    "j2-j4,s0-s3",  # [klein] 4B
)
QWEN_IMAGE = TransformerLayout(
    "qwenimage",
    "Qwen-Image",
    Shape(
        frozenset({"hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "img_shapes"}),
        (Stack("transformer_blocks", "j", frozenset({"hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "temb"})),),
        _qwen_image_generated,
        _qwen_image_check,
    ),
    "j5-j20",
)
Z_IMAGE = TransformerLayout(
    "zimage",
    "Z-Image",
    Shape(
        frozenset({"x", "t", "cap_feats", "patch_size", "f_patch_size"}),
        (Stack("layers", "s", frozenset({"x", "attn_mask", "freqs_cis"})),),
        _z_image_generated,
    ),
    "s2-s10",
)

# The generic layouts, most specific first (each matches its own shape only).
GENERIC: Tuple[TransformerLayout, ...] = (FLUX2, QWEN_IMAGE, Z_IMAGE)
