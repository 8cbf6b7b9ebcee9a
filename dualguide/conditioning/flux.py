"""Flux.1 prompt encoding (dev, schnell, Kontext) through diffusers' ``FluxPipeline.encode_prompt``: CLIP's pooled
embeds ``[B, P]`` and T5's hidden states ``[B, max_sequence_length, D]`` (no long-prompt windowing), and NAG's
negative by the official NAG Flux pipeline's rule.

The text RoPE ids are not encoded here: diffusers' ``text_ids`` are zeros ``[L, 3]`` for every prompt, so the family
adapter makes them from ``L``.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .base import (
    Conditioning, PromptLike, as_list, check_max_sequence_length, nag_negative_texts_per_encoder, one_encoding_at_a_time,
    prompt_batch_size, reuses_cfg_negative, rows_per_image,
)  # fmt: skip


def _check_pair(embeds: Optional[Tensor], pooled: Optional[Tensor], names: Tuple[str, str]) -> None:
    """Flux needs T5's embeds and CLIP's pooled embeds together (diffusers' ``check_inputs`` asks the same)."""
    if (embeds is None) != (pooled is None):
        raise ValueError(f"{names[0]} and {names[1]} must be given together (Flux needs both), got only {names[embeds is None]}")


def _encode(
    pipe, side: str, prompt: PromptLike, prompt_2: PromptLike, embeds: Optional[Tensor], pooled: Optional[Tensor], *,
    batch: int, num_images_per_prompt: int, device, lora_scale: Optional[float], max_sequence_length: int,
) -> Conditioning:  # fmt: skip
    """One side's rows (``side``: ``""`` or ``"negative_"``, for the parameter names) through ``encode_prompt``: given
    embeds as given (one row per prompt or per image), else the prompts and ``prompt_2`` (T5's text, else ``prompt``)
    as lists of one entry per prompt."""
    if embeds is None:
        prompt = as_list(prompt, batch, f"{side}prompt")
        prompt_2 = None if prompt_2 is None else as_list(prompt_2, batch, f"{side}prompt_2")
    embeds, pooled, _ = pipe.encode_prompt(
        prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt, prompt_embeds=embeds,
        pooled_prompt_embeds=pooled, max_sequence_length=max_sequence_length, lora_scale=lora_scale,
    )  # fmt: skip
    return Conditioning(
        rows_per_image(embeds, batch, num_images_per_prompt, f"{side}prompt_embeds"),
        rows_per_image(pooled, batch, num_images_per_prompt, f"{side}pooled_prompt_embeds"),
    )


@one_encoding_at_a_time
def encode_flux(
    pipe, prompt: PromptLike, prompt_2: PromptLike = None, negative_prompt: PromptLike = None,
    negative_prompt_2: PromptLike = None, *, num_images_per_prompt: int = 1, with_negative: bool = False, device=None,
    lora_scale: Optional[float] = None, max_sequence_length: int = 512, prompt_embeds: Optional[Tensor] = None,
    pooled_prompt_embeds: Optional[Tensor] = None, negative_prompt_embeds: Optional[Tensor] = None,
    negative_pooled_prompt_embeds: Optional[Tensor] = None,
) -> Tuple[Conditioning, Optional[Conditioning]]:  # fmt: skip
    """Encode the positive (and, with ``with_negative``: true CFG, the negative) Flux conditioning.

    Exactly diffusers' ``FluxPipeline`` encoding: ``prompt`` to CLIP (``pooled_embeds`` ``[B, P]``, cut at 77 tokens),
    ``prompt_2`` (else ``prompt``) to T5 (``prompt_embeds`` ``[B, max_sequence_length, D]``); the negative is
    ``negative_prompt`` / ``negative_prompt_2`` encoded the same way (the empty string when neither text nor
    embeds are given). Given embeds are used as they are; given with one row per prompt they are repeated per image
    (diffusers' Flux ``encode_prompt`` leaves them at one row per prompt). Rows are prompt-major,
    ``num_images_per_prompt`` per prompt; a string negative is used for every prompt. ``guidance`` is left unset:
    the distilled guidance scale is the pipeline's, not the prompt's.
    """
    check_max_sequence_length(max_sequence_length)
    _check_pair(prompt_embeds, pooled_prompt_embeds, ("prompt_embeds", "pooled_prompt_embeds"))
    if with_negative:
        _check_pair(negative_prompt_embeds, negative_pooled_prompt_embeds, ("negative_prompt_embeds", "negative_pooled_prompt_embeds"))
    batch = prompt_embeds.shape[0] if prompt is None and prompt_embeds is not None else prompt_batch_size(prompt)
    options = dict(batch=batch, num_images_per_prompt=num_images_per_prompt, device=device, lora_scale=lora_scale,
                   max_sequence_length=max_sequence_length)  # fmt: skip
    positive = _encode(pipe, "", prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, **options)
    if not with_negative:
        return positive, None
    negative_prompt = "" if negative_prompt is None else negative_prompt
    negative = _encode(pipe, "negative_", negative_prompt, negative_prompt_2, negative_prompt_embeds, negative_pooled_prompt_embeds, **options)
    return positive, negative


@one_encoding_at_a_time
def encode_flux_nag_negative(
    pipe, batch: int, num_images_per_prompt: int, nag_negative_prompt: PromptLike = None,
    nag_negative_prompt_2: PromptLike = None, nag_negative_prompt_embeds: Optional[Tensor] = None,
    nag_negative_pooled_prompt_embeds: Optional[Tensor] = None, negative_prompt: PromptLike = None,
    negative_prompt_2: PromptLike = None, true_cfg_negative: Optional[Conditioning] = None, *, device=None,
    lora_scale: Optional[float] = None, max_sequence_length: int = 512,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """NAG's negative prompt embeds ``[batch * num_images_per_prompt, L, D]`` and pooled embeds ``[.., P]``, one row
    per image, by the official NAG Flux pipeline's rule:

    ``nag_negative_prompt_embeds`` with ``nag_negative_pooled_prompt_embeds`` (one given without the other is a
    ValueError; the official pipeline would drop it silently); else ``nag_negative_prompt`` (T5: ``nag_negative_prompt_2``,
    else it) encoded; else, when ``negative_prompt`` was given, the true-CFG negative's rows (``true_cfg_negative``:
    what ``encode_flux`` made with ``with_negative``, None without true CFG) or, without true CFG, ``negative_prompt``
    (T5: ``negative_prompt_2``) encoded; else the encoded empty string. A string is used for every prompt; a list needs
    one entry per prompt; given embeds may have one row per prompt or per image, else ValueError naming them. ``L``
    is the negative's own (``max_sequence_length`` when encoded).
    """
    check_max_sequence_length(max_sequence_length)
    names = ("nag_negative_prompt_embeds", "nag_negative_pooled_prompt_embeds")
    _check_pair(nag_negative_prompt_embeds, nag_negative_pooled_prompt_embeds, names)
    if nag_negative_prompt_embeds is not None:
        embeds, pooled = nag_negative_prompt_embeds, nag_negative_pooled_prompt_embeds
    elif reuses_cfg_negative(nag_negative_prompt, negative_prompt, true_cfg_negative):
        embeds, pooled = true_cfg_negative.prompt_embeds, true_cfg_negative.pooled_embeds
        names = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
    else:
        prompts, prompts_2 = nag_negative_texts_per_encoder(
            batch, nag_negative_prompt, negative_prompt, [(negative_prompt_2, "negative_prompt_2")],
            [(nag_negative_prompt_2, "nag_negative_prompt_2")],
        )  # fmt: skip
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts_2, device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, lora_scale=lora_scale,
        )  # fmt: skip
    if embeds.ndim != 3 or pooled.ndim != 2:
        raise ValueError(f"{names[0]} must be [batch, L, D] and {names[1]} [batch, P], got {list(embeds.shape)} and {list(pooled.shape)}")
    device = device or pipe._execution_device
    return tuple(rows_per_image(t.to(device), batch, num_images_per_prompt, name) for t, name in zip((embeds, pooled), names))
