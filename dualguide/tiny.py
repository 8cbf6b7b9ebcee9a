"""Tiny random-weight models with the real layouts, for tests, examples and benchmarks (no downloads).

SDXL: ``transformer_layers_per_block=(1, 2, 10)`` gives SDXL's 24 / 10 / 36 transformer blocks
(ids d0-d23, m0-m9, u0-u35), so SDXL's default layer selections apply unchanged. Stable Diffusion
1.x / 2.x: SD's four levels (three with attention), d0-d5, m0, u0-u8; SD 2.x with linear projections
and v-prediction.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .vocab import word_vocabulary, write_tokenizer_files


def tiny_tokenizer(words: Iterable[str] = (), model_max_length: int = 77):
    """A ``CLIPTokenizer`` over ``word_vocabulary(words)``, built in memory."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(folder, words, model_max_length)
        return CLIPTokenizer.from_pretrained(folder)


def tiny_unet_config(
    sample_size: int = 32,
    block_out_channels: Sequence[int] = (32, 64, 64),
    attention_head_dim: Sequence[int] = (2, 4, 8),
    cross_attention_dim: int = 64,
    projection_dim: int = 32,
) -> dict:
    """UNet2DConditionModel config with SDXL's block types, 24/10/36 transformer layout and text_time conditioning."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=tuple(attention_head_dim),
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + projection_dim,
        norm_num_groups=16,
    )


def sdxl_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """SDXL base's EulerDiscreteScheduler config."""
    return dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type=prediction_type,
        use_karras_sigmas=False,
    )


def _tiny_vae(sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size * 2,
    ).eval()


def _tiny_text_config(model_max_length: int):
    from transformers import CLIPTextConfig

    vocab_size = len(word_vocabulary(())[0])
    return CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab_size,
        max_position_embeddings=model_max_length, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, hidden_act="gelu", projection_dim=32,
    )  # fmt: skip


def build_tiny_sdxl(seed: int = 0, sample_size: int = 32, prediction_type: str = "epsilon", model_max_length: int = 77) -> dict:
    """Random-weight SDXL-layout components (the benchmark's figures' model), keyed like the pipeline's arguments."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size=sample_size))
    vae = _tiny_vae(sample_size)
    text_encoder = CLIPTextModel(_tiny_text_config(model_max_length))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(model_max_length))
    return dict(
        unet=unet.eval(),
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tiny_tokenizer(model_max_length=model_max_length),
        tokenizer_2=tiny_tokenizer(model_max_length=model_max_length),
        scheduler=EulerDiscreteScheduler(**sdxl_scheduler_config(prediction_type)),
    )


def tiny_sd_unet_config(version: int = 1, sample_size: int = 16, in_channels: int = 4) -> dict:
    """UNet2DConditionModel config with SD 1.x's (``version=1``) or SD 2.x's (``version=2``: linear projections,
    per-level head widths) block layout: d0-d5, m0, u0-u8, no added conditioning."""
    return dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        attention_head_dim=8 if version == 1 else (2, 4, 8, 8),
        cross_attention_dim=32,
        use_linear_projection=version == 2,
        norm_num_groups=16,
    )


def sd_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """SD 1.5 / 2.1's DDIMScheduler config (scaled-linear betas, ``leading`` spacing)."""
    return dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type,
    )  # fmt: skip


def build_tiny_sd(version: int = 1, seed: int = 0, sample_size: int = 16, in_channels: int = 4, model_max_length: int = 77) -> dict:
    """Random-weight Stable Diffusion components keyed like the pipeline's arguments: SD 1.x layout (epsilon) for
    ``version=1``, SD 2.x (linear projections, v-prediction) for ``version=2``; ``in_channels=9`` for inpainting.
    ``sample_size`` is the latent side (the tiny VAE's factor is 2); no safety checker."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if version not in (1, 2):
        raise ValueError(f"version must be 1 (SD 1.x) or 2 (SD 2.x), got {version!r}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sd_unet_config(version, sample_size, in_channels))
    vae = _tiny_vae(sample_size)
    text_encoder = CLIPTextModel(_tiny_text_config(model_max_length))
    prediction_type = "epsilon" if version == 1 else "v_prediction"
    return dict(
        unet=unet.eval(),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_tokenizer(model_max_length=model_max_length),
        scheduler=DDIMScheduler(**sd_scheduler_config(prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_controlnet(unet, seed: int = 1):
    """A random-weight ``ControlNetModel`` with ``unet``'s layout, for control images of the tiny VAE's pixel size.

    diffusers zero-initialises the ControlNet's output convolutions; here they get small random weights,
    so that the ControlNet changes the result."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()
    for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.02)
    return model
