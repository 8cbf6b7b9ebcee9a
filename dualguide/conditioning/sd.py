"""Stable Diffusion 1.x / 2.x prompt encoding: prompt embeds only, long prompts windowed as for SDXL."""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor

from .base import Conditioning, PromptLike, as_list, one_encoding_at_a_time
from .clip import HiddenStates, embeds_dtype, encode_ids, lora_scaled, padding_mask, text_encoders, tokenize, windows_needed


def _sd_hidden(clip_skip: Optional[int]) -> HiddenStates:
    """The hidden state SD 1.x / 2.x uses: the last (normed) one, or ``clip_skip`` layers earlier through the
    final layer norm, as diffusers' SD ``encode_prompt``."""
    if clip_skip is None:
        return lambda encoder, output: output[0]
    # transformers 4 keeps the norm in ``CLIPTextModel.text_model``, 5 on the model itself
    return lambda encoder, output: getattr(encoder, "text_model", encoder).final_layer_norm(output.hidden_states[-(clip_skip + 1)])


@one_encoding_at_a_time
def encode_sd(
    pipe,
    prompt: PromptLike,
    negative_prompt: PromptLike = None,
    *,
    num_images_per_prompt: int = 1,
    with_negative: bool = True,
    device=None,
    lora_scale: Optional[float] = None,
    clip_skip: Optional[int] = None,
    prompt_embeds: Optional[Tensor] = None,
    negative_prompt_embeds: Optional[Tensor] = None,
    truncate_long_prompts: bool = False,
) -> Tuple[Conditioning, Optional[Conditioning]]:
    """Encode positive (and, with ``with_negative``, negative) Stable Diffusion 1.x / 2.x conditioning.

    One text encoder; the negative is ``negative_prompt`` or the empty string. Prompts longer than the
    tokenizer's window are encoded window by window as for SDXL (the negative padded to the same windows,
    a mask hiding the padding windows of shorter prompts), unless ``truncate_long_prompts`` or given
    embeds; everything else goes through diffusers' ``encode_prompt``. Rows are prompt-major:
    ``num_images_per_prompt`` rows per prompt.
    """
    if not truncate_long_prompts and prompt_embeds is None and negative_prompt_embeds is None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = as_list(negative_prompt or "", len(prompts), "negative_prompt") if with_negative else None
        encoded = encode_sd_windowed(
            pipe, prompts, negatives, device=device, num_images_per_prompt=num_images_per_prompt, lora_scale=lora_scale,
            clip_skip=clip_skip,
        )  # fmt: skip
        if encoded is not None:
            embeds, negative_embeds, mask = encoded
            negative = Conditioning(negative_embeds, attention_mask=mask) if with_negative else None
            return Conditioning(embeds, attention_mask=mask), negative
    embeds, negative_embeds = pipe.encode_prompt(
        prompt, device or pipe._execution_device, num_images_per_prompt, with_negative, negative_prompt,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
        clip_skip=clip_skip,
    )  # fmt: skip
    return Conditioning(embeds), Conditioning(negative_embeds) if with_negative else None


def encode_sd_windowed(
    pipe, prompts: List[str], negatives: Optional[List[str]], *, device, num_images_per_prompt: int,
    lora_scale: Optional[float], clip_skip: Optional[int],
) -> Optional[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
    """SD's prompt embeds, the negative's (when given) and the padding mask, long prompts windowed; ``None``
    when every text fits one window. The negative uses the last hidden state whatever ``clip_skip`` is, as
    diffusers' SD ``encode_prompt``."""
    to_encode = [tokenize(pipe, [texts]) for texts in (prompts, negatives) if texts is not None]
    count = max(windows_needed(pipe, ids) for ids in to_encode)
    if count == 1:
        return None
    with lora_scaled(pipe, lora_scale):
        encoded = [encode_ids(pipe, ids, count, _sd_hidden(clip_skip if index == 0 else None))[0] for index, ids in enumerate(to_encode)]
    mask = padding_mask(pipe, to_encode, count, text_encoders(pipe)[0][0].model_max_length)
    dtype, device = embeds_dtype(pipe), device or pipe._execution_device

    def rows(tensor: Optional[Tensor], cast: bool) -> Optional[Tensor]:
        if tensor is None:
            return None
        tensor = tensor.to(dtype=dtype, device=device) if cast else tensor.to(device)
        return tensor.repeat_interleave(num_images_per_prompt, dim=0)

    return rows(encoded[0], True), rows(encoded[1] if negatives is not None else None, True), rows(mask, False)
