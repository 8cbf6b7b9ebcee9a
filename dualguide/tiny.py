"""Tiny random-weight models with SDXL's layout, for tests, examples and benchmarks (no downloads).

``transformer_layers_per_block=(1, 2, 10)`` gives SDXL's 24 / 10 / 36 transformer blocks
(ids d0-d23, m0-m9, u0-u35), so SDXL's default layer selections apply unchanged.
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


def build_tiny_sdxl(seed: int = 0, sample_size: int = 32, prediction_type: str = "epsilon", model_max_length: int = 77) -> dict:
    """Random-weight SDXL-layout components (the benchmark's figures' model), keyed like the pipeline's arguments."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size=sample_size))
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size * 2,
    )
    vocab_size = len(word_vocabulary(())[0])
    text_config = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab_size,
        max_position_embeddings=model_max_length, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, hidden_act="gelu", projection_dim=32,
    )  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tiny_tokenizer(model_max_length=model_max_length),
        tokenizer_2=tiny_tokenizer(model_max_length=model_max_length),
        scheduler=EulerDiscreteScheduler(**sdxl_scheduler_config(prediction_type)),
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
