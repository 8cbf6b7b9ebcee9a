"""SDXL prompt encoding (prompt embeds, pooled embeds, time ids; long prompts windowed) and NAG's negative for
SDXL and Stable Diffusion 1.x / 2.x."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .base import Conditioning, PromptLike, as_list, nag_negative_texts, one_encoding_at_a_time, rows_per_image
from .clip import (
    HiddenStates, embeds_dtype, encode_ids, has_second_encoder, lora_scaled, padding_mask, text_encoders, tokenize, windows_needed,
)  # fmt: skip
from .sd import encode_sd_windowed


def time_ids(pipe, size: Tuple[int, int], crop: Tuple[int, int], target: Tuple[int, int], dtype, projection_dim: int) -> Tensor:
    """SDXL micro-conditioning ids ``[1, 6]`` through the pipeline's own helper (which checks the UNet's width)."""
    return pipe._get_add_time_ids(tuple(size), tuple(crop), tuple(target), dtype=dtype, text_encoder_projection_dim=projection_dim)


def _sdxl_hidden(clip_skip: Optional[int]) -> HiddenStates:
    """The hidden state SDXL uses: the penultimate layer, ``clip_skip`` layers earlier (as diffusers indexes it)."""
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    return lambda encoder, output: output.hidden_states[layer]


def _encode_windowed(
    pipe,
    prompt: PromptLike,
    prompt_2: PromptLike,
    negative_prompt: PromptLike,
    negative_prompt_2: PromptLike,
    *,
    device,
    num_images_per_prompt: int,
    with_negative: bool,
    lora_scale: Optional[float],
    clip_skip: Optional[int],
    prompt_embeds: Optional[Tensor] = None,
    pooled_prompt_embeds: Optional[Tensor] = None,
    negative_prompt_embeds: Optional[Tensor] = None,
    negative_pooled_prompt_embeds: Optional[Tensor] = None,
) -> Optional[Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]]:
    """``encode_prompt``'s four results and a padding mask, with long prompts windowed; ``None`` when nothing
    needs more than one window.

    The positive and negative get the same window count (the most any prompt of the batch needs, or that
    given embeds have); shorter prompts are padded with empty windows, which the mask hides for rows
    whose own prompts need fewer windows than the batch (so a row gets what it gets alone). Otherwise it mirrors ``encode_prompt``:
    given embeds are used as they are, ``force_zeros_for_empty_prompt`` zeroes a missing negative, the
    negative uses the penultimate layer whatever ``clip_skip`` is (as diffusers 0.42 does), and rows are
    repeated ``num_images_per_prompt`` times.
    """
    encoders = text_encoders(pipe)
    positive_ids = negative_ids = None
    if prompt_embeds is None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        positive_ids = tokenize(pipe, [prompts, as_list(prompt_2 or prompt, batch, "prompt_2")])
    else:
        batch = prompt_embeds.shape[0]
    zero_negative = with_negative and negative_prompt is None and pipe.config.force_zeros_for_empty_prompt
    if with_negative and negative_prompt_embeds is None and not zero_negative:
        negative_prompt = negative_prompt or ""
        negatives = as_list(negative_prompt, batch, "negative_prompt")
        negative_ids = tokenize(pipe, [negatives, as_list(negative_prompt_2 or negative_prompt, batch, "negative_prompt_2")])
    to_encode = [ids for ids in (positive_ids, negative_ids) if ids is not None]
    if not to_encode:
        return None
    count = max(windows_needed(pipe, ids) for ids in to_encode)
    window = encoders[0][0].model_max_length
    given = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds if with_negative else None}
    given = {name: embeds for name, embeds in given.items() if embeds is not None}
    if count == 1 and all(embeds.shape[1] <= window for embeds in given.values()):
        return None  # everything fits one window: diffusers' encode_prompt gives today's results
    if any(tokenizer.model_max_length != window for tokenizer, _ in encoders):
        raise ValueError(
            "long prompts need tokenizers with one model_max_length, got "
            f"{[tokenizer.model_max_length for tokenizer, _ in encoders]}; pass truncate_long_prompts=True"
        )
    count = max([count] + [-(-embeds.shape[1] // window) for embeds in given.values()])
    for name, embeds in given.items():
        if embeds.shape[1] != count * window:
            raise ValueError(
                f"{name} has {embeds.shape[1]} tokens but the prompts encoded with it need {count} windows of {window} "
                f"tokens ({count * window}); give {name} of that length or pass truncate_long_prompts=True"
            )

    with lora_scaled(pipe, lora_scale):
        if positive_ids is not None:
            prompt_embeds, pooled = encode_ids(pipe, positive_ids, count, _sdxl_hidden(clip_skip))
            pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds
        if negative_ids is not None:
            negative_prompt_embeds, pooled = encode_ids(pipe, negative_ids, count, _sdxl_hidden(None))
            negative_pooled_prompt_embeds = pooled if negative_pooled_prompt_embeds is None else negative_pooled_prompt_embeds
    if pooled_prompt_embeds is None:
        raise ValueError("pooled_prompt_embeds must be given with prompt_embeds")
    if with_negative and negative_prompt_embeds is None:  # force_zeros_for_empty_prompt
        negative_prompt_embeds = torch.zeros_like(prompt_embeds)
        negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
    if not with_negative:
        negative_prompt_embeds = negative_pooled_prompt_embeds = None
    mask = padding_mask(pipe, to_encode, count, window) if not given else None

    device = device or pipe._execution_device
    dtype = embeds_dtype(pipe)

    def rows(tensor: Optional[Tensor], cast: bool) -> Optional[Tensor]:
        if tensor is None:
            return None
        tensor = tensor.to(dtype=dtype, device=device) if cast else tensor
        return tensor.repeat_interleave(num_images_per_prompt, dim=0)

    return (
        rows(prompt_embeds, True),
        rows(negative_prompt_embeds, True),
        rows(pooled_prompt_embeds, False),
        rows(negative_pooled_prompt_embeds, False),
        rows(mask.to(device) if mask is not None else None, False),
    )


@one_encoding_at_a_time
def encode_sdxl(
    pipe,
    prompt: PromptLike,
    prompt_2: PromptLike = None,
    negative_prompt: PromptLike = None,
    negative_prompt_2: PromptLike = None,
    *,
    num_images_per_prompt: int = 1,
    with_negative: bool = True,
    size: Tuple[int, int],
    crop: Tuple[int, int] = (0, 0),
    target: Optional[Tuple[int, int]] = None,
    negative_size: Optional[Tuple[int, int]] = None,
    negative_crop: Tuple[int, int] = (0, 0),
    negative_target: Optional[Tuple[int, int]] = None,
    device=None,
    lora_scale: Optional[float] = None,
    clip_skip: Optional[int] = None,
    prompt_embeds: Optional[Tensor] = None,
    pooled_prompt_embeds: Optional[Tensor] = None,
    negative_prompt_embeds: Optional[Tensor] = None,
    negative_pooled_prompt_embeds: Optional[Tensor] = None,
    truncate_long_prompts: bool = False,
) -> Tuple[Conditioning, Optional[Conditioning]]:
    """Encode positive (and, with ``with_negative``, negative) SDXL conditioning.

    Prompts that fit the tokenizer's window (``model_max_length``, 77 for SDXL), and every prompt with
    ``truncate_long_prompts=True``, go through diffusers' ``encode_prompt`` (which cuts at the window).
    Longer prompts are encoded window by window (``model_max_length - 2`` tokens plus BOS/EOS each, both
    encoders) and the windows concatenated; the pooled embeds are the first window's; the positive and
    negative (and all prompts of the batch) are padded with empty windows to the same count.
    Honours ``force_zeros_for_empty_prompt`` exactly as diffusers does. Rows are ordered
    prompt-major: ``num_images_per_prompt`` rows per prompt.
    """
    encoded = None
    if not truncate_long_prompts:
        encoded = _encode_windowed(
            pipe, prompt, prompt_2, negative_prompt, negative_prompt_2, device=device,
            num_images_per_prompt=num_images_per_prompt, with_negative=with_negative, lora_scale=lora_scale,
            clip_skip=clip_skip, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )  # fmt: skip
    mask = None
    if encoded is not None:
        *encoded, mask = encoded
    else:
        encoded = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=with_negative,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
    embeds, negative_embeds, pooled, negative_pooled = encoded
    projection_dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
    target = target or size
    ids = time_ids(pipe, size, crop, target, embeds.dtype, projection_dim).to(embeds.device)
    positive = Conditioning(embeds, pooled, ids.repeat(embeds.shape[0], 1), mask)
    if not with_negative:
        return positive, None
    if negative_size is not None and negative_target is not None:
        negative_ids = time_ids(pipe, negative_size, negative_crop, negative_target, embeds.dtype, projection_dim)
    else:
        negative_ids = ids
    negative = Conditioning(negative_embeds, negative_pooled, negative_ids.to(embeds.device).repeat(embeds.shape[0], 1), mask)
    return positive, negative


@one_encoding_at_a_time
def encode_nag_negative(
    pipe,
    batch: int,
    num_images_per_prompt: int,
    nag_negative_prompt: PromptLike = None,
    nag_negative_prompt_embeds: Optional[Tensor] = None,
    negative_prompt: PromptLike = None,
    device=None,
    lora_scale: Optional[float] = None,
    clip_skip: Optional[int] = None,
    truncate_long_prompts: bool = False,
) -> Tensor:
    """Prompt embeds of NAG's negative, ``[batch * num_images_per_prompt, L, D]``.

    Order: ``nag_negative_prompt_embeds``, else ``nag_negative_prompt``, else ``negative_prompt``,
    else the empty string, always really encoded (never the zeros of ``force_zeros_for_empty_prompt``).
    A long text is windowed on its own (its ``L`` is its own window count times the window, not the
    positive's: NAG attends to it separately); ``truncate_long_prompts=True`` cuts it as diffusers does.
    """
    if nag_negative_prompt_embeds is not None:
        return rows_per_image(nag_negative_prompt_embeds.to(device), batch, num_images_per_prompt, "nag_negative_prompt_embeds")
    prompts = nag_negative_texts(batch, nag_negative_prompt, negative_prompt)
    if not truncate_long_prompts:
        options = dict(device=device, num_images_per_prompt=num_images_per_prompt, lora_scale=lora_scale, clip_skip=clip_skip)
        if has_second_encoder(pipe):
            encoded = _encode_windowed(pipe, prompts, None, None, None, with_negative=False, **options)
        else:
            encoded = encode_sd_windowed(pipe, prompts, None, **options)
        if encoded is not None:
            return encoded[0]
    return pipe.encode_prompt(  # the prompt embeds come first in every family's encode_prompt results
        prompt=prompts,
        device=device,
        num_images_per_prompt=num_images_per_prompt,
        do_classifier_free_guidance=False,
        lora_scale=lora_scale,
        clip_skip=clip_skip,
    )[0]
