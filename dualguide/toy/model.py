"""The embedded model: SDXL's architecture in miniature, built from the toy grammar; save/load in diffusers format.

Two CLIP text encoders (hidden 32 and 64) over a byte-level BPE vocabulary that has every grammar word as
one token, a ``UNet2DConditionModel`` with SDXL's 24/10/36 transformer layout and ``text_time``
conditioning, an f=4 ``AutoencoderKL`` (64x64 images <-> 16x16 latents) and SDXL's Euler scheduler.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..loading import RECOMMENDED_FILE, read_recommended, write_recommended
from ..tiny import sdxl_scheduler_config, tiny_unet_config
from .data import grammar_words
from ..vocab import word_vocabulary, write_tokenizer_files

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
RESOLUTION = 64
MODEL_MAX_LENGTH = 16
TEXT_HIDDEN_SIZES = (32, 64)
PROJECTION_DIM = 64
VAE_CHANNELS = (16, 32, 64)
UNET_CHANNELS = (32, 64, 64)


def build_tokenizer(model_max_length: int = MODEL_MAX_LENGTH):
    """A ``CLIPTokenizer`` whose vocabulary is every byte plus every grammar word as one token (see ``vocab``)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(folder, grammar_words(), model_max_length)
        return CLIPTokenizer.from_pretrained(folder)


def text_encoder_config(hidden_size: int, model_max_length: int = MODEL_MAX_LENGTH, layers: int = 3):
    """A small ``CLIPTextConfig`` over the toy vocabulary (bos / eos = pad are its last two ids)."""
    from transformers import CLIPTextConfig

    vocab_size = len(word_vocabulary(grammar_words())[0])
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=4,
        num_hidden_layers=layers, max_position_embeddings=model_max_length, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act="gelu", projection_dim=PROJECTION_DIM,
    )  # fmt: skip


def build_unet(resolution: int = RESOLUTION):
    """SDXL-layout UNet for ``resolution`` images (latents of ``resolution // 4``)."""
    from diffusers import UNet2DConditionModel

    config = tiny_unet_config(
        sample_size=resolution // 4, block_out_channels=UNET_CHANNELS,
        cross_attention_dim=sum(TEXT_HIDDEN_SIZES), projection_dim=PROJECTION_DIM,
    )  # fmt: skip
    return UNet2DConditionModel(**config)


def build_vae(resolution: int = RESOLUTION):
    """An f=4 ``AutoencoderKL`` (three blocks) with 4 latent channels.

    Latents are normalised per channel with ``latents_mean`` / ``latents_std`` (set after training), so
    ``scaling_factor`` is 1.
    """
    from diffusers import AutoencoderKL

    blocks = len(VAE_CHANNELS)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=VAE_CHANNELS, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        norm_num_groups=8, sample_size=resolution, scaling_factor=1.0,
    )  # fmt: skip


def build_scheduler(prediction_type: str = "v_prediction"):
    """SDXL base's ``EulerDiscreteScheduler`` with ``prediction_type``."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**sdxl_scheduler_config(prediction_type))


def build_components(seed: int = 0, prediction_type: str = "v_prediction", vae=None) -> Dict[str, object]:
    """Fresh random-weight components keyed like the pipeline's arguments (``vae`` reused when given)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return dict(
        vae=vae if vae is not None else build_vae(),
        text_encoder=CLIPTextModel(text_encoder_config(TEXT_HIDDEN_SIZES[0])),
        text_encoder_2=CLIPTextModelWithProjection(text_encoder_config(TEXT_HIDDEN_SIZES[1])),
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        unet=build_unet(),
        scheduler=build_scheduler(prediction_type),
    )


def assemble_pipeline(components: Dict[str, object]):
    """A ``StableDiffusionXLTPGPipeline`` from the parts; the empty prompt is really encoded (it was trained on)."""
    from ..pipelines import StableDiffusionXLTPGPipeline

    return StableDiffusionXLTPGPipeline(**components, force_zeros_for_empty_prompt=False, add_watermarker=False)


def save_pipeline(pipe, folder: Union[str, os.PathLike], recommended: Optional[dict] = None) -> None:
    """Write ``pipe`` in diffusers folder format (safetensors) and ``recommended.json`` beside it."""
    pipe.save_pretrained(folder, safe_serialization=True)
    if recommended is not None:
        write_recommended(folder, recommended)


def load_pipeline(folder: Union[str, os.PathLike] = EMBEDDED_DIR, torch_dtype: torch.dtype = torch.float32):
    """Load a saved toy pipeline offline with ``from_pretrained`` (the float16-stored UNet loads as float32)."""
    from ..pipelines import StableDiffusionXLTPGPipeline

    dtype = {} if torch_dtype == torch.float32 else {"torch_dtype": torch_dtype}
    return StableDiffusionXLTPGPipeline.from_pretrained(
        str(folder), local_files_only=True, add_watermarker=False, **dtype
    )


def load_recommended(folder: Union[str, os.PathLike] = EMBEDDED_DIR) -> dict:
    """The recommended sampling settings stored beside the weights (the embedded model's by default)."""
    settings = read_recommended(folder)
    if not settings:
        raise FileNotFoundError(f"no {RECOMMENDED_FILE} in {folder}")
    return settings


def tokenize(tokenizer, captions: Sequence[str]) -> Tensor:
    """Token ids ``[N, model_max_length]``, padded and truncated as the SDXL pipeline does."""
    padding = {"padding": "max_length", "max_length": tokenizer.model_max_length, "truncation": True}
    return tokenizer(list(captions), return_tensors="pt", **padding).input_ids


def encode_tokens(text_encoder, text_encoder_2, ids: Tensor, ids_2: Tensor) -> Tuple[Tensor, Tensor]:
    """``(prompt_embeds, pooled_embeds)`` exactly as SDXL's ``encode_prompt`` computes them, with gradients.

    Penultimate hidden states of both encoders concatenated; the pooled projection of the second.
    """
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    output_2 = text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([hidden, output_2.hidden_states[-2]], dim=-1), output_2.text_embeds


def time_ids(batch: int, resolution: int = RESOLUTION) -> Tensor:
    """SDXL micro-conditioning ``[batch, 6]`` for uncropped square images (what the pipeline passes by default)."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32).repeat(batch, 1)


def pixels(images) -> Tensor:
    """uint8 images ``[N, H, W, 3]`` (numpy or torch) -> float ``[N, 3, H, W]`` in [-1, 1]."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def latent_normalisation(vae) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(mean, std)`` ``[1, C, 1, 1]`` from the VAE config (0 and 1 when unset)."""
    channels = vae.config.latent_channels
    mean = vae.config.latents_mean or [0.0] * channels
    std = vae.config.latents_std or [1.0] * channels
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def encode_images(vae, images: Tensor, batch_size: int = 256) -> Tensor:
    """Normalised diffusion latents (posterior means) of ``[-1, 1]`` images, as the pipeline's decoder expects them."""
    mean, std = latent_normalisation(vae)
    parts = [vae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    return (torch.cat(parts) - mean) * vae.config.scaling_factor / std
