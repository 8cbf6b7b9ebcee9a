"""Chroma prompt encoding through diffusers' ``ChromaPipeline.encode_prompt``: T5's hidden states and T5's attention
mask (no CLIP, no pooled embeds, no long-prompt windowing).

What the family adapter must do with the mask, to equal ``ChromaPipeline`` (diffusers 0.42): the mask ``[B, L]`` is
float, in the text encoder's dtype, 1 on each prompt's tokens, its ``</s>`` and the first padding token (diffusers
keeps token ``i`` where ``i <= number of tokens``), 0 on the rest of the padding. The pipeline appends ones for the
image tokens (``_prepare_attention_mask``: ``torch.cat([mask, torch.ones(B, N, dtype=torch.bool)], 1)``, which torch
promotes to the float dtype), text first as the transformer orders its sequence, and passes that ``[B, L + N]`` as
``attention_mask=`` to ``ChromaTransformer2DModel``, whose blocks form ``mask[:, None, None, :] * mask[:, None, :, None]``
``[B, 1, S, S]`` and hand it to attention. Being float, scaled-dot-product attention ADDS it to the logits: kept pairs
get +1 and "masked" pairs +0, so the padding is not hidden (huggingface/diffusers#12116). Parity needs this same float
mask; a boolean one hides the padding and changes the output. In one batched call each row keeps its own side's mask
(CFG's uncond rows the negative's).
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .base import (
    Conditioning, PromptLike, check_max_sequence_length, nag_negative_texts, one_encoding_at_a_time, prompt_batch_size,
    reuses_cfg_negative, rows_per_image,
)  # fmt: skip


@one_encoding_at_a_time
def encode_chroma(
    pipe, prompt: PromptLike, negative_prompt: PromptLike = None, *, num_images_per_prompt: int = 1, with_negative: bool = True,
    device=None, lora_scale: Optional[float] = None, max_sequence_length: int = 512, prompt_embeds: Optional[Tensor] = None,
    negative_prompt_embeds: Optional[Tensor] = None, prompt_attention_mask: Optional[Tensor] = None,
    negative_prompt_attention_mask: Optional[Tensor] = None,
) -> Tuple[Conditioning, Optional[Conditioning]]:  # fmt: skip
    """Encode the positive (and, with ``with_negative``: CFG, the negative) Chroma conditioning: ``prompt_embeds``
    ``[B, max_sequence_length, D]`` and ``attention_mask`` ``[B, max_sequence_length]``, exactly diffusers' (see the
    module's note for what the mask means to the transformer). The negative is ``negative_prompt``, else the empty
    string; a string is used for every prompt. Given embeds need their mask (as diffusers' ``check_inputs`` asks) and
    are used as they are; given with one row per prompt they are repeated per image (diffusers' ``encode_prompt``
    leaves them at one row per prompt). Rows are prompt-major, ``num_images_per_prompt`` per prompt.
    """
    check_max_sequence_length(max_sequence_length)
    pairs = [("prompt_embeds", prompt_embeds, "prompt_attention_mask", prompt_attention_mask)]
    if with_negative:
        pairs.append(("negative_prompt_embeds", negative_prompt_embeds, "negative_prompt_attention_mask", negative_prompt_attention_mask))
    for embeds_name, embeds, mask_name, mask in pairs:
        if embeds is not None and mask is None:
            raise ValueError(f"{mask_name} must be given with {embeds_name} (Chroma masks T5's padding)")
    batch = prompt_embeds.shape[0] if prompt is None and prompt_embeds is not None else prompt_batch_size(prompt)
    embeds, _, mask, negative_embeds, _, negative_mask = pipe.encode_prompt(
        prompt=prompt, negative_prompt=negative_prompt, device=device, num_images_per_prompt=num_images_per_prompt,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, prompt_attention_mask=prompt_attention_mask,
        negative_prompt_attention_mask=negative_prompt_attention_mask, do_classifier_free_guidance=with_negative,
        max_sequence_length=max_sequence_length, lora_scale=lora_scale,
    )  # fmt: skip

    def rows(embeds: Tensor, mask: Tensor, side: str) -> Conditioning:
        if mask.shape != embeds.shape[:2]:
            raise ValueError(
                f"{side}prompt_attention_mask must be [batch, L] of {side}prompt_embeds ({list(embeds.shape[:2])}), got {list(mask.shape)}"
            )
        return Conditioning(
            rows_per_image(embeds, batch, num_images_per_prompt, f"{side}prompt_embeds"),
            attention_mask=rows_per_image(mask, batch, num_images_per_prompt, f"{side}prompt_attention_mask"),
        )

    return rows(embeds, mask, ""), rows(negative_embeds, negative_mask, "negative_") if with_negative else None


def encode_chroma_nag_negative(
    pipe, batch: int, num_images_per_prompt: int, nag_negative_prompt: PromptLike = None, negative_prompt: PromptLike = None,
    cfg_negative: Optional[Conditioning] = None, *, device=None, lora_scale: Optional[float] = None, max_sequence_length: int = 512,
) -> Conditioning:  # fmt: skip
    """NAG's negative rows for Chroma (T5's embeds and mask), one per image. The NAG authors have no Chroma pipeline;
    this is their Flux rule without the pooled embeds: ``nag_negative_prompt`` encoded; else, when ``negative_prompt``
    was given, CFG's negative rows (``cfg_negative``: what ``encode_chroma`` made with ``with_negative``, None without
    CFG) or, without CFG, ``negative_prompt`` encoded; else the encoded empty string. A string is used for every
    prompt; a list needs one entry per prompt."""
    if reuses_cfg_negative(nag_negative_prompt, negative_prompt, cfg_negative):
        return cfg_negative
    texts = nag_negative_texts(batch, nag_negative_prompt, negative_prompt)
    negative, _ = encode_chroma(
        pipe, texts, num_images_per_prompt=num_images_per_prompt, with_negative=False, device=device, lora_scale=lora_scale,
        max_sequence_length=max_sequence_length,
    )  # fmt: skip
    return negative
