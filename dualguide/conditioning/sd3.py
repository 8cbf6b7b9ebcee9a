"""Stable Diffusion 3 / 3.5 prompt encoding through diffusers' ``encode_prompt`` (CLIP-L and CLIP-G hidden states
zero-padded to T5's width, then T5's ``max_sequence_length`` tokens along the sequence: L = 77 + max_sequence_length;
no long-prompt windowing) and NAG's negative by the official NAG SD3 pipeline's rule."""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .base import (
    Conditioning, PromptLike, check_max_sequence_length, nag_negative_texts_per_encoder, one_encoding_at_a_time,
    prompt_batch_size, reuses_cfg_negative, rows_per_image,
)  # fmt: skip


def _sd3_sequence(pipe, max_sequence_length: int) -> Tuple[int, int]:
    """``(L, D)`` of SD3 prompt embeds: CLIP's window plus T5's ``max_sequence_length`` tokens, the transformer's text width."""
    return pipe.tokenizer_max_length + max_sequence_length, pipe.transformer.config.joint_attention_dim


@one_encoding_at_a_time
def encode_sd3(
    pipe, prompt: PromptLike, prompt_2: PromptLike = None, prompt_3: PromptLike = None, negative_prompt: PromptLike = None,
    negative_prompt_2: PromptLike = None, negative_prompt_3: PromptLike = None, *, num_images_per_prompt: int = 1,
    with_negative: bool = True, device=None, lora_scale: Optional[float] = None, clip_skip: Optional[int] = None,
    max_sequence_length: int = 256, prompt_embeds: Optional[Tensor] = None, negative_prompt_embeds: Optional[Tensor] = None,
    pooled_prompt_embeds: Optional[Tensor] = None, negative_pooled_prompt_embeds: Optional[Tensor] = None,
) -> Tuple[Conditioning, Optional[Conditioning]]:  # fmt: skip
    """Encode positive (and, with ``with_negative``, negative) Stable Diffusion 3 / 3.5 conditioning.

    Through diffusers' ``encode_prompt``, so prompts give exactly diffusers' embeds: ``prompt_embeds``
    ``[B, 77 + max_sequence_length, joint_attention_dim]`` (CLIPs cut at 77 tokens, T5 at ``max_sequence_length``;
    zeros for T5 without ``text_encoder_3``) and ``pooled_embeds`` ``[B, 2 * projection]``; the negative is
    ``negative_prompt`` or the empty string, really encoded, with ``clip_skip`` ignored as diffusers ignores it.
    Rows are prompt-major, ``num_images_per_prompt`` per prompt; given embeds with one row per prompt are
    repeated likewise (diffusers' SD3 ``encode_prompt`` leaves them at one row per prompt).
    """
    check_max_sequence_length(max_sequence_length)
    if prompt_embeds is not None and pooled_prompt_embeds is None:
        raise ValueError("pooled_prompt_embeds must be given with prompt_embeds (SD3 needs both)")
    if with_negative and negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise ValueError("negative_pooled_prompt_embeds must be given with negative_prompt_embeds (SD3 needs both)")
    batch = prompt_embeds.shape[0] if prompt is None and prompt_embeds is not None else prompt_batch_size(prompt)
    encoded = pipe.encode_prompt(
        prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, device=device, num_images_per_prompt=num_images_per_prompt,
        do_classifier_free_guidance=with_negative, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
        negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        clip_skip=clip_skip, max_sequence_length=max_sequence_length, lora_scale=lora_scale,
    )  # fmt: skip
    embeds, negative_embeds, pooled, negative_pooled = encoded

    def rows(tensor: Tensor, parameter: str) -> Tensor:
        return rows_per_image(tensor, batch, num_images_per_prompt, parameter)

    positive = Conditioning(rows(embeds, "prompt_embeds"), rows(pooled, "pooled_prompt_embeds"))
    if not with_negative:
        return positive, None
    negative = Conditioning(rows(negative_embeds, "negative_prompt_embeds"), rows(negative_pooled, "negative_pooled_prompt_embeds"))
    return positive, negative


@one_encoding_at_a_time
def encode_sd3_nag_negative(
    pipe, batch: int, num_images_per_prompt: int, nag_negative_prompt: PromptLike = None,
    nag_negative_prompt_embeds: Optional[Tensor] = None, negative_prompt: PromptLike = None,
    negative_prompt_embeds: Optional[Tensor] = None, *, device=None, lora_scale: Optional[float] = None,
    clip_skip: Optional[int] = None, max_sequence_length: int = 256, negative_prompt_2: PromptLike = None,
    negative_prompt_3: PromptLike = None,
) -> Tensor:  # fmt: skip
    """SD3 prompt embeds of NAG's negative, ``[batch * num_images_per_prompt, L, D]`` with the positive's ``L``
    (``77 + max_sequence_length``) and ``D`` (``joint_attention_dim``), by the official NAG SD3 pipeline's rule:

    ``nag_negative_prompt_embeds``; else ``nag_negative_prompt`` encoded (as a positive prompt: ``clip_skip`` applies);
    else, when ``negative_prompt`` was given, the CFG negative's ``negative_prompt_embeds`` (the embeds
    ``encode_sd3`` made of it) or, without CFG, ``negative_prompt`` (with ``negative_prompt_2`` / ``_3``) encoded;
    else the encoded empty string (real embeddings, also T5's part where there is a T5). A string is used for every
    prompt; a list needs one entry per prompt. Given embeds may have one row per prompt or per image.
    """
    check_max_sequence_length(max_sequence_length)
    if nag_negative_prompt_embeds is not None:
        embeds, parameter = nag_negative_prompt_embeds, "nag_negative_prompt_embeds"
    elif reuses_cfg_negative(nag_negative_prompt, negative_prompt, negative_prompt_embeds):
        embeds, parameter = negative_prompt_embeds, "negative_prompt_embeds"
    else:
        prompts, prompts_2, prompts_3 = nag_negative_texts_per_encoder(
            batch, nag_negative_prompt, negative_prompt, [(negative_prompt_2, "negative_prompt_2"), (negative_prompt_3, "negative_prompt_3")]
        )
        embeds = pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts_2, prompt_3=prompts_3, device=device,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=False, clip_skip=clip_skip,
            max_sequence_length=max_sequence_length, lora_scale=lora_scale,
        )[0]  # fmt: skip
        parameter = "nag_negative_prompt"
    if embeds.ndim != 3 or tuple(embeds.shape[1:]) != _sd3_sequence(pipe, max_sequence_length):
        length, width = _sd3_sequence(pipe, max_sequence_length)
        raise ValueError(
            f"{parameter} must be [batch, {length}, {width}] (77 CLIP tokens + max_sequence_length={max_sequence_length} "
            f"T5 tokens, joint_attention_dim {width}) like the prompt embeds, got {list(embeds.shape)}"
        )
    return rows_per_image(embeds.to(device or pipe._execution_device), batch, num_images_per_prompt, parameter)
