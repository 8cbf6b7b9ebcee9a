"""Long prompts for the CLIP text encoders of SDXL and Stable Diffusion 1.x / 2.x: tokenize -> windows -> encode each
encoder's windows -> concatenate.

A prompt longer than the tokenizer's window (``model_max_length``: 77 for SDXL, i.e. BOS + 75 tokens + EOS) is
encoded window by window and the windows are concatenated along the sequence axis, as the k-diffusion front-ends
do, instead of being cut as diffusers cuts it. The pooled embeds come from the first window. Both prompts of a CFG
pair (and every prompt of a batch) get the same number of windows, the shorter ones padded with empty windows.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

TokenIds = List[List[int]]  # one list of content token ids (no BOS/EOS) per prompt

def text_encoders(pipe) -> List[Tuple[object, torch.nn.Module]]:
    """``(tokenizer, text_encoder)`` pairs in diffusers' order: SD's one, SDXL's two (the refiner, without
    ``text_encoder``, only the second)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def has_second_encoder(pipe) -> bool:
    """SDXL pipelines (two text encoder slots, pooled embeds) rather than SD 1.x / 2.x (one)."""
    return hasattr(pipe, "text_encoder_2")


def _content_ids(pipe, prompts: List[str], tokenizer) -> TokenIds:
    """Token ids of each prompt, without BOS/EOS and without truncation (textual-inversion tokens expanded first)."""
    from diffusers.loaders import TextualInversionLoaderMixin

    if isinstance(pipe, TextualInversionLoaderMixin):
        prompts = pipe.maybe_convert_prompt(prompts, tokenizer)
    return tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids


def _window_count(ids: Sequence[int], tokenizer) -> int:
    """Windows of ``model_max_length - 2`` content tokens that ``ids`` needs (at least one, for the empty prompt)."""
    per_window = tokenizer.model_max_length - 2
    return max(1, -(-len(ids) // per_window))


def _windows(ids: Sequence[int], tokenizer, count: int) -> List[List[int]]:
    """``count`` windows ``[BOS] + chunk + [EOS]`` padded to ``model_max_length`` as diffusers pads; missing chunks are empty."""
    length = tokenizer.model_max_length
    per_window = length - 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    windows = []
    for index in range(count):
        window = [tokenizer.bos_token_id, *ids[index * per_window : (index + 1) * per_window], tokenizer.eos_token_id]
        padding = [pad] * (length - len(window))
        windows.append(padding + window if tokenizer.padding_side == "left" else window + padding)
    return windows


HiddenStates = Callable[[torch.nn.Module, object], Tensor]  # (text encoder, its output) -> the embeds diffusers uses


def _encode_windows(text_encoder, windows: Tensor, select: HiddenStates) -> Tuple[Tensor, Optional[Tensor]]:
    """Run one text encoder on windows ``[B, count, W]`` as diffusers' ``encode_prompt`` runs it.

    Returns the hidden states ``select`` picks, ``[B, count * W, D]`` (windows concatenated along the sequence) and, for an
    encoder with a pooled projection, the pooled embeds ``[B, P]`` of each prompt's first window. The first
    windows run as one batch of ``B``, as diffusers runs the prompts, so they and the pooled embeds are
    bit-identical to the truncated encoding; the other windows run as a second batch.
    """
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        device = get_module_execution_device(text_encoder)
    except ImportError:  # older diffusers
        device = text_encoder.device
    rows, count, length = windows.shape
    outputs = [
        text_encoder(part.reshape(-1, length).to(device), output_hidden_states=True)
        for part in (windows[:, :1], windows[:, 1:])
        if part.shape[1]
    ]
    hidden = [select(text_encoder, output) for output in outputs]
    hidden = torch.cat([h.reshape(rows, -1, h.shape[-1]) for h in hidden], dim=1)
    pooled = outputs[0][0] if outputs[0][0].ndim == 2 else None
    return hidden, pooled


def encode_ids(pipe, ids_per_encoder: Sequence[TokenIds], count: int, select: HiddenStates) -> Tuple[Tensor, Optional[Tensor]]:
    """Prompt embeds ``[B, count * W, D1 + D2]`` and pooled embeds (first window) of already tokenized prompts."""
    hidden, pooled = [], None
    for ids, (tokenizer, text_encoder) in zip(ids_per_encoder, text_encoders(pipe)):
        windows = torch.tensor([_windows(row, tokenizer, count) for row in ids], dtype=torch.long)
        states, encoder_pooled = _encode_windows(text_encoder, windows, select)
        hidden.append(states)
        if pooled is None:  # diffusers keeps the first encoder output that is pooled (text_encoder_2's projection)
            pooled = encoder_pooled
    return torch.cat(hidden, dim=-1), pooled


@contextmanager
def lora_scaled(pipe, lora_scale: Optional[float]) -> Iterator[None]:
    """The text encoders' LoRA scale around an encoding, exactly as diffusers' ``encode_prompt`` sets and resets it."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.models.lora import adjust_lora_scale_text_encoder
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    is_lora_pipe = isinstance(pipe, (StableDiffusionXLLoraLoaderMixin, StableDiffusionLoraLoaderMixin))
    encoders = [encoder for _, encoder in text_encoders(pipe)]
    if lora_scale is not None and is_lora_pipe:
        pipe._lora_scale = lora_scale
        for encoder in encoders:
            if USE_PEFT_BACKEND:
                scale_lora_layers(encoder, lora_scale)
            else:
                adjust_lora_scale_text_encoder(encoder, lora_scale)
    try:
        yield
    finally:
        if is_lora_pipe and USE_PEFT_BACKEND:
            for encoder in encoders:
                unscale_lora_layers(encoder, lora_scale)


def embeds_dtype(pipe):
    """The prompt embeds' dtype as diffusers casts them: the (last) text encoder's, else the UNet's."""
    encoders = text_encoders(pipe)
    return encoders[-1][1].dtype if encoders else pipe.unet.dtype


def tokenize(pipe, texts_per_encoder: Sequence[List[str]]) -> List[TokenIds]:
    """Content ids of each encoder's prompts (``[prompts, prompts_2]``, zipped with the encoders as diffusers zips them)."""
    return [_content_ids(pipe, texts, tokenizer) for texts, (tokenizer, _) in zip(texts_per_encoder, text_encoders(pipe))]


def windows_needed(pipe, ids_per_encoder: Sequence[TokenIds]) -> int:
    """The most windows any prompt needs with any of the encoders' tokenizers."""
    return max(
        _window_count(row, tokenizer) for ids, (tokenizer, _) in zip(ids_per_encoder, text_encoders(pipe)) for row in ids
    )


def padding_mask(pipe, to_encode: Sequence[Sequence[TokenIds]], count: int, window: int) -> Optional[Tensor]:
    """``[B, count * window]``: 1 on the windows each row's own prompts need, 0 on its padding windows;
    None when every row needs ``count`` windows."""
    needed = [
        max(windows_needed(pipe, [[ids[row]] for ids in ids_per_encoder]) for ids_per_encoder in to_encode)
        for row in range(len(to_encode[0][0]))
    ]
    if min(needed) == count:
        return None
    mask = torch.zeros(len(needed), count * window)
    for row, windows in enumerate(needed):
        mask[row, : windows * window] = 1.0
    return mask
