"""Prompt encoding per family -> ``Conditioning``: SDXL (prompt embeds, pooled embeds, time ids),
Stable Diffusion 1.x / 2.x (prompt embeds only) and Stable Diffusion 3 / 3.5 (the joint CLIP + T5 prompt
embeds and the two CLIPs' pooled embeds, through diffusers' ``encode_prompt``: no long-prompt windowing).

Long prompts: a prompt longer than the tokenizer's window (``model_max_length``: 77 for SDXL, i.e.
BOS + 75 tokens + EOS) is encoded window by window and the windows are concatenated along the
sequence axis, as the k-diffusion front-ends do, instead of being cut as diffusers cuts it. The
pooled embeds come from the first window. Both prompts of a CFG pair (and every prompt of a batch)
get the same number of windows, the shorter ones padded with empty windows. ``truncate_long_prompts``
restores diffusers' cutting; prompts that fit one window always go through diffusers' ``encode_prompt``.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

PromptLike = Optional[Union[str, Sequence[str]]]
TokenIds = List[List[int]]  # one list of content token ids (no BOS/EOS) per prompt


@dataclass(frozen=True)
class Conditioning:
    """What a UNet is conditioned on, one row per image.

    SDXL rows carry all three tensors; Stable Diffusion 1.x / 2.x rows only ``prompt_embeds``
    (``pooled_embeds`` and ``time_ids`` None). ``attention_mask`` ``[B, L]`` (1 keep, 0 hide) hides the padding windows of rows whose prompts
    need fewer windows than the longest of their batch, so that each row gets what it gets alone;
    ``image_embeds`` are the IP-Adapter image embeddings (one tensor per adapter).
    """

    prompt_embeds: Tensor  # [B, L, D]: the text encoders' hidden states (SDXL: both, concatenated)
    pooled_embeds: Optional[Tensor] = None  # [B, P]: SDXL's text_encoder_2 pooled projection
    time_ids: Optional[Tensor] = None  # [B, 6]: SDXL's original size, crop top-left, target size
    attention_mask: Optional[Tensor] = None  # [B, L]
    image_embeds: Optional[List[Tensor]] = None

    def __post_init__(self) -> None:
        tensors = {"prompt_embeds": self.prompt_embeds, "pooled_embeds": self.pooled_embeds, "time_ids": self.time_ids}
        sizes = {name: t.shape[0] for name, t in tensors.items() if t is not None}
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"Conditioning: {', '.join(sizes)} must have the same batch size, got {', '.join(map(str, sizes.values()))}"
            )

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def added_cond_kwargs(self) -> Optional[dict]:
        """The UNet's added text conditioning of these rows (SDXL's ``text_embeds`` / ``time_ids``); None without."""
        if self.pooled_embeds is None or self.time_ids is None:
            return None
        return {"text_embeds": self.pooled_embeds, "time_ids": self.time_ids}

    def _map(self, function) -> "Conditioning":
        def optional(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else function(t)

        return Conditioning(
            function(self.prompt_embeds), optional(self.pooled_embeds), optional(self.time_ids),
            optional(self.attention_mask), None if self.image_embeds is None else [function(e) for e in self.image_embeds],
        )  # fmt: skip

    def to(self, device=None, dtype=None) -> "Conditioning":
        moved = self._map(lambda t: t.to(device=device, dtype=dtype))
        if self.attention_mask is None:
            return moved
        return replace(moved, attention_mask=self.attention_mask.to(device=device))

    def select(self, rows: slice) -> "Conditioning":
        """The rows ``rows`` (views, no copy)."""
        return self._map(lambda t: t[rows])

    def repeat(self, times: int) -> "Conditioning":
        """Each row repeated ``times`` times in a row (``repeat_interleave``), as ``num_images_per_prompt`` does."""
        return self._map(lambda t: t.repeat_interleave(times, dim=0))

    def with_image_embeds(self, image_embeds: Optional[List[Tensor]]) -> "Conditioning":
        return replace(self, image_embeds=image_embeds)

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of ``parts`` one after another (a part without a mask keeps every token)."""
        masks = None
        if any(p.attention_mask is not None for p in parts):
            masks = torch.cat([p.prompt_embeds.new_ones(p.prompt_embeds.shape[:2]) if p.attention_mask is None else p.attention_mask for p in parts])
        images = None
        if all(p.image_embeds is not None for p in parts):
            images = [torch.cat(group) for group in zip(*(p.image_embeds for p in parts))]
        def stacked(field: str) -> Optional[Tensor]:
            tensors = [getattr(p, field) for p in parts]
            return None if any(t is None for t in tensors) else torch.cat(tensors)

        return Conditioning(torch.cat([p.prompt_embeds for p in parts]), stacked("pooled_embeds"), stacked("time_ids"), masks, images)


# Text encoding touches state the pipelines of several threads share: a fast tokenizer keeps its padding and
# truncation settings from call to call, and a LoRA scale is set on the text encoders for the call. One encoding
# at a time keeps each thread's prompts its own (encoding is a small part of a run).
_text_encoding = threading.RLock()


def one_encoding_at_a_time(encode: Callable) -> Callable:
    """Decorate a prompt encoder so that calls from several threads encode one after the other."""

    @functools.wraps(encode)
    def serialized(*args, **kwargs):
        with _text_encoding:
            return encode(*args, **kwargs)

    return serialized


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


# ---------------------------------------------------------------------------------------------------
# Long prompts: tokenize -> windows -> encode each encoder's windows -> concatenate.


def _encoders(pipe) -> List[Tuple[object, torch.nn.Module]]:
    """``(tokenizer, text_encoder)`` pairs in diffusers' order: SD's one, SDXL's two (the refiner, without
    ``text_encoder``, only the second)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def _has_second_encoder(pipe) -> bool:
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


def _encode_ids(pipe, ids_per_encoder: Sequence[TokenIds], count: int, select: HiddenStates) -> Tuple[Tensor, Optional[Tensor]]:
    """Prompt embeds ``[B, count * W, D1 + D2]`` and pooled embeds (first window) of already tokenized prompts."""
    hidden, pooled = [], None
    for ids, (tokenizer, text_encoder) in zip(ids_per_encoder, _encoders(pipe)):
        windows = torch.tensor([_windows(row, tokenizer, count) for row in ids], dtype=torch.long)
        states, encoder_pooled = _encode_windows(text_encoder, windows, select)
        hidden.append(states)
        if pooled is None:  # diffusers keeps the first encoder output that is pooled (text_encoder_2's projection)
            pooled = encoder_pooled
    return torch.cat(hidden, dim=-1), pooled


def _sdxl_hidden(clip_skip: Optional[int]) -> HiddenStates:
    """The hidden state SDXL uses: the penultimate layer, ``clip_skip`` layers earlier (as diffusers indexes it)."""
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    return lambda encoder, output: output.hidden_states[layer]


def _sd_hidden(clip_skip: Optional[int]) -> HiddenStates:
    """The hidden state SD 1.x / 2.x uses: the last (normed) one, or ``clip_skip`` layers earlier through the
    final layer norm, as diffusers' SD ``encode_prompt``."""
    if clip_skip is None:
        return lambda encoder, output: output[0]
    # transformers 4 keeps the norm in ``CLIPTextModel.text_model``, 5 on the model itself
    return lambda encoder, output: getattr(encoder, "text_model", encoder).final_layer_norm(output.hidden_states[-(clip_skip + 1)])


@contextmanager
def _lora_scaled(pipe, lora_scale: Optional[float]) -> Iterator[None]:
    """The text encoders' LoRA scale around an encoding, exactly as diffusers' ``encode_prompt`` sets and resets it."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.models.lora import adjust_lora_scale_text_encoder
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    is_lora_pipe = isinstance(pipe, (StableDiffusionXLLoraLoaderMixin, StableDiffusionLoraLoaderMixin))
    encoders = [encoder for _, encoder in _encoders(pipe)]
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


def _embeds_dtype(pipe):
    """The prompt embeds' dtype as diffusers casts them: the (last) text encoder's, else the UNet's."""
    encoders = _encoders(pipe)
    return encoders[-1][1].dtype if encoders else pipe.unet.dtype


def _tokenize(pipe, texts_per_encoder: Sequence[List[str]]) -> List[TokenIds]:
    """Content ids of each encoder's prompts (``[prompts, prompts_2]``, zipped with the encoders as diffusers zips them)."""
    return [_content_ids(pipe, texts, tokenizer) for texts, (tokenizer, _) in zip(texts_per_encoder, _encoders(pipe))]


def _windows_needed(pipe, ids_per_encoder: Sequence[TokenIds]) -> int:
    """The most windows any prompt needs with any of the encoders' tokenizers."""
    return max(
        _window_count(row, tokenizer) for ids, (tokenizer, _) in zip(ids_per_encoder, _encoders(pipe)) for row in ids
    )


def _padding_mask(pipe, to_encode: Sequence[Sequence[TokenIds]], count: int, window: int) -> Optional[Tensor]:
    """``[B, count * window]``: 1 on the windows each row's own prompts need, 0 on its padding windows;
    None when every row needs ``count`` windows."""
    needed = [
        max(_windows_needed(pipe, [[ids[row]] for ids in ids_per_encoder]) for ids_per_encoder in to_encode)
        for row in range(len(to_encode[0][0]))
    ]
    if min(needed) == count:
        return None
    mask = torch.zeros(len(needed), count * window)
    for row, windows in enumerate(needed):
        mask[row, : windows * window] = 1.0
    return mask


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
    encoders = _encoders(pipe)
    positive_ids = negative_ids = None
    if prompt_embeds is None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        positive_ids = _tokenize(pipe, [prompts, _as_list(prompt_2 or prompt, batch, "prompt_2")])
    else:
        batch = prompt_embeds.shape[0]
    zero_negative = with_negative and negative_prompt is None and pipe.config.force_zeros_for_empty_prompt
    if with_negative and negative_prompt_embeds is None and not zero_negative:
        negative_prompt = negative_prompt or ""
        negatives = _as_list(negative_prompt, batch, "negative_prompt")
        negative_ids = _tokenize(pipe, [negatives, _as_list(negative_prompt_2 or negative_prompt, batch, "negative_prompt_2")])
    to_encode = [ids for ids in (positive_ids, negative_ids) if ids is not None]
    if not to_encode:
        return None
    count = max(_windows_needed(pipe, ids) for ids in to_encode)
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

    with _lora_scaled(pipe, lora_scale):
        if positive_ids is not None:
            prompt_embeds, pooled = _encode_ids(pipe, positive_ids, count, _sdxl_hidden(clip_skip))
            pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds
        if negative_ids is not None:
            negative_prompt_embeds, pooled = _encode_ids(pipe, negative_ids, count, _sdxl_hidden(None))
            negative_pooled_prompt_embeds = pooled if negative_pooled_prompt_embeds is None else negative_pooled_prompt_embeds
    if pooled_prompt_embeds is None:
        raise ValueError("pooled_prompt_embeds must be given with prompt_embeds")
    if with_negative and negative_prompt_embeds is None:  # force_zeros_for_empty_prompt
        negative_prompt_embeds = torch.zeros_like(prompt_embeds)
        negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
    if not with_negative:
        negative_prompt_embeds = negative_pooled_prompt_embeds = None
    mask = _padding_mask(pipe, to_encode, count, window) if not given else None

    device = device or pipe._execution_device
    dtype = _embeds_dtype(pipe)

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


# ---------------------------------------------------------------------------------------------------


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


def _rows_per_image(embeds: Tensor, batch: int, num_images_per_prompt: int, parameter: str) -> Tensor:
    """Given embeds as rows per image: ``batch`` rows (one per prompt) are repeated ``num_images_per_prompt`` times;
    ``batch * num_images_per_prompt`` rows are taken as they are; ValueError naming ``parameter`` otherwise."""
    if embeds.shape[0] == batch:
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
    if embeds.shape[0] != batch * num_images_per_prompt:
        raise ValueError(
            f"{parameter} has batch {embeds.shape[0]}; expected {batch} (one per prompt) or {batch * num_images_per_prompt}"
        )
    return embeds


def _nag_negative_texts(batch: int, nag_negative_prompt: PromptLike, negative_prompt: PromptLike) -> List[str]:
    """NAG's negative text per prompt: ``nag_negative_prompt``, else ``negative_prompt``, else the empty string."""
    if nag_negative_prompt is not None:
        source, parameter = nag_negative_prompt, "nag_negative_prompt"
    elif negative_prompt is not None:
        source, parameter = negative_prompt, "negative_prompt"
    else:
        source, parameter = "", "nag_negative_prompt"
    prompt_batch_size(source, parameter)
    return _as_list(source, batch, parameter)


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
        return _rows_per_image(nag_negative_prompt_embeds.to(device), batch, num_images_per_prompt, "nag_negative_prompt_embeds")
    prompts = _nag_negative_texts(batch, nag_negative_prompt, negative_prompt)
    if not truncate_long_prompts:
        options = dict(device=device, num_images_per_prompt=num_images_per_prompt, lora_scale=lora_scale, clip_skip=clip_skip)
        if _has_second_encoder(pipe):
            encoded = _encode_windowed(pipe, prompts, None, None, None, with_negative=False, **options)
        else:
            encoded = _encode_sd_windowed(pipe, prompts, None, **options)
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
        negatives = _as_list(negative_prompt or "", len(prompts), "negative_prompt") if with_negative else None
        encoded = _encode_sd_windowed(
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


def _encode_sd_windowed(
    pipe, prompts: List[str], negatives: Optional[List[str]], *, device, num_images_per_prompt: int,
    lora_scale: Optional[float], clip_skip: Optional[int],
) -> Optional[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
    """SD's prompt embeds, the negative's (when given) and the padding mask, long prompts windowed; ``None``
    when every text fits one window. The negative uses the last hidden state whatever ``clip_skip`` is, as
    diffusers' SD ``encode_prompt``."""
    to_encode = [_tokenize(pipe, [texts]) for texts in (prompts, negatives) if texts is not None]
    count = max(_windows_needed(pipe, ids) for ids in to_encode)
    if count == 1:
        return None
    with _lora_scaled(pipe, lora_scale):
        encoded = [_encode_ids(pipe, ids, count, _sd_hidden(clip_skip if index == 0 else None))[0] for index, ids in enumerate(to_encode)]
    mask = _padding_mask(pipe, to_encode, count, _encoders(pipe)[0][0].model_max_length)
    dtype, device = _embeds_dtype(pipe), device or pipe._execution_device

    def rows(tensor: Optional[Tensor], cast: bool) -> Optional[Tensor]:
        if tensor is None:
            return None
        tensor = tensor.to(dtype=dtype, device=device) if cast else tensor.to(device)
        return tensor.repeat_interleave(num_images_per_prompt, dim=0)

    return rows(encoded[0], True), rows(encoded[1] if negatives is not None else None, True), rows(mask, False)


# ---------------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5: diffusers' encode_prompt (CLIP-L and CLIP-G hidden states zero-padded to T5's width,
# then T5's max_sequence_length tokens along the sequence: L = 77 + max_sequence_length).


def _check_max_sequence_length(max_sequence_length: int) -> None:
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
        raise ValueError(f"max_sequence_length must be an integer from 1 to 512 (T5's window), got {max_sequence_length!r}")


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
    _check_max_sequence_length(max_sequence_length)
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
        return _rows_per_image(tensor, batch, num_images_per_prompt, parameter)

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
    _check_max_sequence_length(max_sequence_length)
    if nag_negative_prompt_embeds is not None:
        embeds, parameter = nag_negative_prompt_embeds, "nag_negative_prompt_embeds"
    elif nag_negative_prompt is None and negative_prompt is not None and negative_prompt_embeds is not None:
        embeds, parameter = negative_prompt_embeds, "negative_prompt_embeds"
    else:
        prompts = _nag_negative_texts(batch, nag_negative_prompt, negative_prompt)
        from_negative = nag_negative_prompt is None and negative_prompt is not None
        others = [
            None if text is None or not from_negative else _as_list(text, batch, name)
            for text, name in ((negative_prompt_2, "negative_prompt_2"), (negative_prompt_3, "negative_prompt_3"))
        ]
        embeds = pipe.encode_prompt(
            prompt=prompts, prompt_2=others[0], prompt_3=others[1], device=device,
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
    return _rows_per_image(embeds.to(device or pipe._execution_device), batch, num_images_per_prompt, parameter)
