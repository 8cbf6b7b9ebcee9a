"""Flux.1 (dev, schnell, Kontext): diffusers' ``FluxTransformer2DModel``, a flow-matching transformer of double-stream
blocks (``transformer_blocks``: ids j0-jN; Flux.1: j0-j18) and single-stream blocks (``single_transformer_blocks``:
s0-sM; Flux.1: s0-s37), positions in rotary embeddings of text and image ids, dev's distilled guidance as an
embedding per row.

Latents stay ``[B, 16, H/8, W/8]`` in the denoiser, as for every family; ``call`` packs them into Flux's 2x2
patch tokens, builds the image ids and unpacks the output (packing is a permutation, so a scheduler step on
packed or unpacked latents is the same arithmetic). Kontext's reference image rides in each row's Conditioning
(``reference_latents``): its tokens, ids ``(1, y, x)``, follow the generated ones and are never guided or shuffled.

TPG (experimental: no published reference for Flux) permutes the image tokens entering each selected block, text
tokens untouched. Flux has no position embedding on the tokens themselves (positions live in RoPE), so permuted
tokens carry their content to other positions. Default ``j5-j18``: SDXL's TPG layers are the transformer blocks at
9-34% of its depth (SD3: j2-j8 of 24); on Flux's 57 blocks that span is blocks 5-19, the double-stream blocks
from j5 on. PAG (experimental): the joint semantics used for SD3 (the image-image block of the map is the
identity) on ``j7-j9`` and ``s7-s9``, the blocks whose skipping ComfyUI's skip-layer guidance uses on Flux. NAG:
every attention, double and single, with the official NAG Flux semantics (``dualguide.flux_joint``).
"""

from __future__ import annotations

import weakref
from typing import Dict, FrozenSet, Iterable, List, Tuple

import torch
from diffusers.utils.torch_utils import unwrap_module
from torch import Tensor, nn

from ..callstate import current_call
from ..conditioning import Conditioning
from ..defaults import DEFAULT_LAYERS
from ..flux_joint import FluxGuidanceProcessor, output_rows, reference_tokens, shuffle_generated_tokens, single_block_inputs
from ..hooks import HookSites
from ..joint import image_stream_temb
from .base import Blocks, CallExtras, ModelFamily

_blocks: "weakref.WeakKeyDictionary[nn.Module, Blocks]" = weakref.WeakKeyDictionary()


def _flux_blocks(model: nn.Module) -> Blocks:
    transformer = unwrap_module(model)
    blocks = _blocks.get(transformer)
    if blocks is None:
        double = {f"j{i}": (f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)}
        single = {f"s{i}": (f"single_transformer_blocks.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)}
        blocks = _blocks[transformer] = {**double, **single}
    return blocks


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` latents as Flux's tokens ``[B, H/2 * W/2, 4C]`` (2x2 patches, row-major), as diffusers packs them."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Flux's tokens back to ``[B, C, height, width]`` latents (the inverse of ``pack_latents``)."""
    b, _, channels = tokens.shape
    c = channels // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, device, dtype, index: int = 0) -> Tensor:
    """Rotary ids ``(index, y, x)`` of the tokens of ``height x width`` latents (``index`` 1: Kontext's reference)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxFamily(ModelFamily):
    name = "flux"
    title = "Flux.1"
    default_tpg_layers = DEFAULT_LAYERS["flux"]["tpg"]  # "j5-j18"
    default_pag_layers = DEFAULT_LAYERS["flux"]["pag"]  # "j7-j9,s7-s9"
    # TPG is experimental on Flux: off unless asked for, so that a call written for diffusers' or the official NAG
    # Flux pipeline makes the same image.
    default_tpg_scale = 0.0
    nag_negative_rows = True
    pooled_nag_negative = True

    def backbone_type(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def matches(self, model: nn.Module) -> bool:
        return isinstance(unwrap_module(model), self.backbone_type())

    def blocks(self, model: nn.Module) -> Blocks:
        return dict(_flux_blocks(model))

    def run_order(self, model: nn.Module) -> List[str]:
        """The image and text projections, the time (/ guidance) / pooled text embedding, the double- then the
        single-stream blocks (the rotary embedding of the ids has no rows)."""
        return ["x_embedder", "time_text_embed", "context_embedder", *(name for name, _ in _flux_blocks(model).values())]

    def tpg_module(self, block: nn.Module) -> nn.Module:
        return block

    def pag_attentions(self, block: nn.Module) -> List[nn.Module]:
        return [block.attn]

    def nag_attentions(self, model: nn.Module) -> FrozenSet[nn.Module]:
        return frozenset(block.attn for _, block in _flux_blocks(model).values())

    def token_counts(self, model: nn.Module, height: int, width: int) -> Dict[nn.Module, int]:
        tokens = (height // 2) * (width // 2)
        return {block: tokens for _, block in _flux_blocks(model).values()}

    def check_conditioning(self, cond: Conditioning, name: str) -> None:
        if cond.pooled_embeds is None or cond.time_ids is not None:
            raise ValueError(f"{name}: a Flux transformer takes prompt embeds and pooled_embeds in each row's Conditioning, no time_ids")
        if cond.attention_mask is not None:
            raise ValueError(f"{name}: attention masks are not supported on Flux yet")

    def text_inputs(self, model: nn.Module, cond: Conditioning, timesteps: Tensor, image_tokens: int) -> Dict[str, object]:
        """The transformer's text-side keyword inputs for the rows of ``cond`` (with NAG: its extra negative rows);
        ``image_tokens``: the image stream's length (Chroma's attention mask covers it)."""
        text, pooled, guidance = cond.prompt_embeds, cond.pooled_embeds, cond.guidance
        if unwrap_module(model).config.guidance_embeds and guidance is None:
            raise ValueError("a Flux transformer with a guidance embedding (Flux.1 dev) needs each row's guidance in its Conditioning")
        call = current_call()
        if call is not None and call.nag is not None:
            negative, guided = call.nag.negative, call.rows.guided
            text = torch.cat([text, negative.prompt_embeds.to(text.dtype)])
            pooled = torch.cat([pooled, negative.pooled_embeds.to(pooled.dtype)])
            timesteps = torch.cat([timesteps, timesteps[guided]])
            guidance = None if guidance is None else torch.cat([guidance, guidance[guided]])
        return {"encoder_hidden_states": text, "pooled_projections": pooled, "timestep": timesteps, "guidance": guidance}

    def call(self, model: nn.Module, sample: Tensor, timesteps: Tensor, cond: Conditioning, extras: CallExtras) -> Tensor:
        """One transformer call on packed ``sample``; with NAG, the guided rows' negative text, pooled embeds, timesteps
        and guidance are appended to the text stream; the rows' IP-Adapter image embeds go in ``joint_attention_kwargs``. Kontext's reference tokens follow the generated ones."""
        if extras.residuals is not None:
            raise ValueError("ControlNet residuals are not supported on Flux yet")
        height, width = sample.shape[-2:]
        tokens = pack_latents(sample)
        ids = image_ids(height, width, sample.device, sample.dtype)
        generated, reference = tokens.shape[1], cond.reference_latents
        if reference is not None:
            tokens = torch.cat([tokens, pack_latents(reference.to(sample.dtype))], dim=1)
            ids = torch.cat([ids, image_ids(*reference.shape[-2:], sample.device, sample.dtype, index=1)])
        inputs = self.text_inputs(model, cond, timesteps, tokens.shape[1])
        text = inputs["encoder_hidden_states"]
        attention_kwargs = None if extras.attention_kwargs is None else dict(extras.attention_kwargs)
        if cond.image_embeds is not None:  # the transformer projects them for its double blocks' IP-Adapter processors
            attention_kwargs = {**(attention_kwargs or {}), "ip_adapter_image_embeds": cond.image_embeds}
        with reference_tokens(tokens.shape[1] - generated):
            output = model(
                hidden_states=tokens,
                timestep=inputs.pop("timestep").to(sample.dtype) / 1000,
                txt_ids=torch.zeros(text.shape[1], 3, device=sample.device, dtype=sample.dtype),
                img_ids=ids,
                joint_attention_kwargs=attention_kwargs,
                return_dict=False,
                **inputs,
            )[0]
        return unpack_latents(output[:, :generated], height, width)

    def hook_plan(
        self, model: nn.Module, tpg_modules: Iterable[nn.Module], pag_attns: Iterable[nn.Module], nag_attns: Iterable[nn.Module]
    ) -> HookSites:
        """TPG's and the single stream's hooks (``stream_hooks``); PAG and NAG in the attentions' wrapper; with NAG, the
        double blocks' image-stream ``temb`` and the output rows."""
        pag_attns, nag_attns = list(pag_attns), list(nag_attns)
        transformer = unwrap_module(model)
        single_attns = {block.attn for block in transformer.single_transformer_blocks}
        single_guided = bool(nag_attns or single_attns.intersection(pag_attns))
        pre_hooks, post_hooks = self.stream_hooks(transformer, list(tpg_modules), single_guided)
        if nag_attns:
            pre_hooks += [(block.norm1, image_stream_temb) for block in transformer.transformer_blocks]
            pre_hooks.append((transformer.norm_out, output_rows))
        wrapped = dict.fromkeys([*pag_attns, *nag_attns])
        return HookSites(tuple(pre_hooks), tuple((attn, FluxGuidanceProcessor) for attn in wrapped), tuple(post_hooks))

    def stream_hooks(self, transformer: nn.Module, tpg_modules: List[nn.Module], single_guided: bool) -> Tuple[list, list]:
        """``(pre-hooks, forward hooks)`` of TPG on ``tpg_modules`` and, when PAG or NAG acts in a single block
        (``single_guided``), of the single stream: each single block's pre-hook (text length, NAG's widened image stream)."""
        pre_hooks = [(block, shuffle_generated_tokens) for block in tpg_modules]
        if single_guided:
            pre_hooks += [(block, single_block_inputs) for block in transformer.single_transformer_blocks]
        return pre_hooks, []

    def hook_sites(self, model: nn.Module) -> HookSites:
        blocks = [block for _, block in _flux_blocks(model).values()]
        return self.hook_plan(model, blocks, [block.attn for block in blocks], self.nag_attentions(model))


FLUX = FluxFamily()
