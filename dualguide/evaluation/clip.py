"""CLIP score and CLIP image features from a local CLIP checkpoint folder (``--clip DIR``).

The folder is what ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained`` write. torchmetrics'
``CLIPScore`` loads only named hub models (it refuses a folder path) and returns only the mean, so the
per-image score is computed here with transformers, by CLIPScore's definition:
``max(100 * cos(image embedding, text embedding), 0)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence, Tuple, Union

import numpy as np

CLIP_OPTION = "--clip"
Clip = Tuple[Any, Any]  # (transformers.CLIPModel, transformers.CLIPProcessor)


def check_clip_folder(folder: Union[str, os.PathLike]) -> Path:
    """``folder`` as a path if its ``config.json`` is a CLIP model's; else ``ValueError`` naming ``--clip``."""
    try:
        with open(Path(folder) / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{CLIP_OPTION} {folder} is not a CLIP model folder: {error}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        raise ValueError(f"{CLIP_OPTION} {folder} is not a CLIP model folder: config.json has model_type "
                         f"{model_type!r}, not 'clip'")  # fmt: skip
    return Path(folder)


def load_clip(folder: Union[str, os.PathLike]) -> Clip:
    """``(CLIPModel, CLIPProcessor)`` from a local folder, model in eval mode; ``ValueError`` naming ``--clip``."""
    from transformers import CLIPModel, CLIPProcessor

    folder = check_clip_folder(folder)
    try:
        return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"{CLIP_OPTION} {folder} could not be loaded as a CLIP model and processor: {error}") from None


def _rgb(images: Sequence) -> list:
    """PIL RGB images from PIL images or uint8 ``[H, W, 3]`` arrays."""
    from PIL import Image

    return [Image.fromarray(np.asarray(image)) if not hasattr(image, "convert") else image.convert("RGB")
            for image in images]  # fmt: skip


def clip_scores(images: Sequence, prompts: Sequence[str], clip: Clip, batch_size: int = 64) -> np.ndarray:
    """CLIP score of each image against its prompt, ``max(100 * cosine, 0)``, with a ``load_clip`` pair: ``[N]``."""
    import torch

    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one prompt per image")
    model, processor = clip
    length = model.config.text_config.max_position_embeddings
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = slice(start, start + batch_size)
            inputs = processor(text=list(prompts[batch]), images=_rgb(images[batch]), return_tensors="pt",
                               padding=True, truncation=True, max_length=length)  # fmt: skip
            output = model(**inputs)
            scores.append((output.image_embeds * output.text_embeds).sum(dim=-1))
    return (100 * torch.cat(scores)).clamp(min=0).double().numpy()


def clip_image_features(images: Sequence, clip: Clip, batch_size: int = 64) -> np.ndarray:
    """``[N, D]`` float64 projected CLIP image embeddings with a ``load_clip`` pair (for KID against references)."""
    import torch

    model, processor = clip
    features = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = processor(images=_rgb(images[start : start + batch_size]), return_tensors="pt")["pixel_values"]
            output = model.get_image_features(pixel_values=pixels)
            features.append(output if isinstance(output, torch.Tensor) else output.pooler_output)  # transformers 5
    return torch.cat(features).double().numpy()
