"""SDXL prompt encoding -> ``Conditioning`` (prompt embeds, pooled embeds, time ids)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

PromptLike = Optional[Union[str, Sequence[str]]]


@dataclass(frozen=True)
class Conditioning:
    """What the SDXL UNet is conditioned on, one row per image."""

    prompt_embeds: Tensor  # [B, L, D]: both text encoders' hidden states, concatenated
    pooled_embeds: Tensor  # [B, P]: text_encoder_2's pooled projection
    time_ids: Tensor  # [B, 6]: original size, crop top-left, target size

    def __post_init__(self) -> None:
        sizes = {self.prompt_embeds.shape[0], self.pooled_embeds.shape[0], self.time_ids.shape[0]}
        if len(sizes) != 1:
            raise ValueError(
                "Conditioning: prompt_embeds, pooled_embeds and time_ids must have the same batch size, got "
                f"{self.prompt_embeds.shape[0]}, {self.pooled_embeds.shape[0]}, {self.time_ids.shape[0]}"
            )

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(*(t.to(device=device, dtype=dtype) for t in (self.prompt_embeds, self.pooled_embeds, self.time_ids)))

    def repeat(self, times: int) -> "Conditioning":
        """Each row repeated ``times`` times in a row (``repeat_interleave``), as ``num_images_per_prompt`` does."""
        return Conditioning(*(t.repeat_interleave(times, dim=0) for t in (self.prompt_embeds, self.pooled_embeds, self.time_ids)))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        return Conditioning(
            torch.cat([p.prompt_embeds for p in parts]),
            torch.cat([p.pooled_embeds for p in parts]),
            torch.cat([p.time_ids for p in parts]),
        )


def prompt_batch_size(prompt: PromptLike, parameter: str = "prompt") -> int:
    """Number of prompts in ``prompt`` (a string counts as one)."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise TypeError(f"{parameter} must be a string or a non-empty list of strings, got {prompt!r}")


def _as_list(prompt: PromptLike, batch: int, parameter: str) -> List[str]:
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise ValueError(f"{parameter} has {len(prompts)} entries but prompt has {batch}; give one per prompt or a single string")
    return prompts


def time_ids(pipe, size: Tuple[int, int], crop: Tuple[int, int], target: Tuple[int, int], dtype, projection_dim: int) -> Tensor:
    """SDXL micro-conditioning ids ``[1, 6]`` through the pipeline's own helper (which checks the UNet's width)."""
    return pipe._get_add_time_ids(tuple(size), tuple(crop), tuple(target), dtype=dtype, text_encoder_projection_dim=projection_dim)


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
) -> Tuple[Conditioning, Optional[Conditioning]]:
    """Encode positive (and, with ``with_negative``, negative) SDXL conditioning with diffusers' ``encode_prompt``.

    Honours ``force_zeros_for_empty_prompt`` exactly as diffusers does. Rows are ordered
    prompt-major: ``num_images_per_prompt`` rows per prompt.
    """
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
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
    projection_dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
    target = target or size
    ids = time_ids(pipe, size, crop, target, embeds.dtype, projection_dim).to(embeds.device)
    positive = Conditioning(embeds, pooled, ids.repeat(embeds.shape[0], 1))
    if not with_negative:
        return positive, None
    if negative_size is not None and negative_target is not None:
        negative_ids = time_ids(pipe, negative_size, negative_crop, negative_target, embeds.dtype, projection_dim)
    else:
        negative_ids = ids
    negative = Conditioning(negative_embeds, negative_pooled, negative_ids.to(embeds.device).repeat(embeds.shape[0], 1))
    return positive, negative


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
) -> Tensor:
    """Prompt embeds of NAG's negative, ``[batch * num_images_per_prompt, L, D]``.

    Order: ``nag_negative_prompt_embeds``, else ``nag_negative_prompt``, else ``negative_prompt``,
    else the empty string, always really encoded (never the zeros of ``force_zeros_for_empty_prompt``).
    """
    if nag_negative_prompt_embeds is not None:
        embeds = nag_negative_prompt_embeds.to(device)
        if embeds.shape[0] == batch:
            embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if embeds.shape[0] != batch * num_images_per_prompt:
            raise ValueError(
                f"nag_negative_prompt_embeds has batch {embeds.shape[0]}; expected {batch} (one per prompt) "
                f"or {batch * num_images_per_prompt}"
            )
        return embeds
    if nag_negative_prompt is not None:
        source, parameter = nag_negative_prompt, "nag_negative_prompt"
    elif negative_prompt is not None:
        source, parameter = negative_prompt, "negative_prompt"
    else:
        source, parameter = "", "nag_negative_prompt"
    prompts = _as_list(source, batch, parameter)
    embeds, _, _, _ = pipe.encode_prompt(
        prompt=prompts,
        device=device,
        num_images_per_prompt=num_images_per_prompt,
        do_classifier_free_guidance=False,
        lora_scale=lora_scale,
        clip_skip=clip_skip,
    )
    return embeds
