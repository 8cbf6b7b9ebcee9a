"""What the Chroma pipelines change in the Flux ones: T5-only prompt encoding with T5's attention mask
(``encode_chroma``; no pooled embeds, no guidance embedding), and CFG as ``ChromaPipeline`` decides it
(``guidance_scale > 1``, the negative prompt defaulting to the empty string) as uncond rows of the one transformer
call. NAG (no official Chroma code) takes the official NAG Flux rule and settings without the pooled negative; its
negative is text, or CFG's negative reused (``encode_chroma_nag_negative``), as the negative needs T5's mask.
Sigmas, ``mu``, the 2x2 packing at the edges and decoding are Flux's (``FluxFamilyMixin``)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from diffusers.pipelines.chroma.pipeline_output import ChromaPipelineOutput
from torch import Tensor

from ..conditioning import Conditioning, encode_chroma, encode_chroma_nag_negative
from ..conditioning.base import check_max_sequence_length
from ..config import CFG, NAG
from ..families import CHROMA
from .flux_base import FluxFamilyMixin, check_flux_call
from .sampling import GuidanceInputs


def check_chroma_call(pipe, args: Dict[str, Any]) -> Dict[str, Any]:
    """``check_flux_call`` with Chroma's rules: T5's ``max_sequence_length`` at most 512; the prompt masks float
    (``ChromaPipeline``'s 0/1, added to the attention scores) or boolean; no ``nag_negative_prompt_embeds`` (the
    negative would need T5's mask too: give ``nag_negative_prompt``)."""
    check_max_sequence_length(args["max_sequence_length"])
    if args["nag_negative_prompt_embeds"] is not None:
        raise ValueError(
            "nag_negative_prompt_embeds is not supported on Chroma: its NAG negative needs T5's attention mask too; give "
            "nag_negative_prompt (text), or negative_prompt_embeds with negative_prompt_attention_mask to reuse CFG's negative"
        )
    for name in ("prompt_attention_mask", "negative_prompt_attention_mask"):
        mask = args[name]
        if mask is not None and not (isinstance(mask, Tensor) and (mask.is_floating_point() or mask.dtype == torch.bool)):
            kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"{name} must be a float (0/1, as ChromaPipeline encodes it) or boolean tensor, got {kind}")
    return check_flux_call(pipe, args)


class ChromaFamilyMixin(FluxFamilyMixin):
    """Chroma parts of a guided pipeline; first in the pipeline's bases."""

    family = CHROMA
    guidance_scale_is_cfg = True  # ChromaPipeline's CFG scale, which a step-end callback may change

    def cfg_scale(self, args: Dict[str, Any]) -> float:
        """``ChromaPipeline``'s CFG: ``guidance_scale`` (on above 1), with or without a negative prompt."""
        return args["guidance_scale"]

    def distilled_guidance(self, cond: Conditioning) -> Conditioning:
        """Chroma has no guidance embedding: the rows as they are."""
        return cond

    def encode_prompts(self, args: Dict[str, Any], cfg: CFG, device, lora_scale: Optional[float]) -> Tuple[Conditioning, Optional[Conditioning]]:
        return encode_chroma(
            self, args["prompt"], args["negative_prompt"], num_images_per_prompt=args["num_images_per_prompt"],
            with_negative=cfg.enabled, device=device, lora_scale=lora_scale, max_sequence_length=args["max_sequence_length"],
            prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
            prompt_attention_mask=args["prompt_attention_mask"], negative_prompt_attention_mask=args["negative_prompt_attention_mask"],
        )  # fmt: skip

    def encode_nag_negative(self, args: Dict[str, Any], batch: int, negative: Optional[Conditioning], device, lora_scale) -> Conditioning:
        return encode_chroma_nag_negative(
            self, batch, args["num_images_per_prompt"], self.nag_negative_source(args), args["negative_prompt"], negative,
            device=device, lora_scale=lora_scale, max_sequence_length=args["max_sequence_length"],
        )  # fmt: skip

    def guidance_inputs(self, args: Dict[str, Any], cfg: CFG, nag: NAG, batch: int, device) -> GuidanceInputs:
        """The encoded rows; one call stacks every row's text, so the negatives must be as long as the prompt's."""
        inputs = super().guidance_inputs(args, cfg, nag, batch, device)
        length = inputs.cond.prompt_embeds.shape[1]
        for name, other in (("the CFG negative", inputs.uncond), ("NAG's negative", inputs.nag_negative)):
            if other is not None and other.prompt_embeds.shape[1] != length:
                raise ValueError(
                    f"max_sequence_length: {name} has {other.prompt_embeds.shape[1]} text tokens and the prompt {length}; one "
                    "transformer call stacks their rows, so encode them at the same length (max_sequence_length = prompt_embeds' length)"
                )
        return inputs

    def output(self, images, args: Dict[str, Any]):
        self.maybe_free_model_hooks()
        return ChromaPipelineOutput(images=images) if args["return_dict"] else (images,)
