"""Tiny random-weight models with the real layouts, for tests, examples and benchmarks (no downloads).

SDXL: ``transformer_layers_per_block=(1, 2, 10)`` gives SDXL's 24 / 10 / 36 transformer blocks
(ids d0-d23, m0-m9, u0-u35), so SDXL's default layer selections apply unchanged. Stable Diffusion
1.x / 2.x: SD's four levels (three with attention), d0-d5, m0, u0-u8; SD 2.x with linear projections
and v-prediction. Stable Diffusion 3 / 3.5: an MMDiT of 10 joint blocks (j0-j9) with SD3 medium's
(plain attention) or SD3.5 medium's (RMS qk-norm, dual attention in the first half) layout, two CLIP
encoders with projection, an optional T5 encoder whose Unigram tokenizer is built here, SD3's
16-channel VAE scaling and its shifted flow-matching scheduler. Wan: a transformer config of 30 blocks (b0-b29) and
Wan2.1's UniPC flow scheduler settings.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

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


def _tiny_vae(sample_size: int, latent_channels: int = 4, **options):
    """A two-level ``AutoencoderKL`` (factor 2) for latents of side ``sample_size``; ``options`` are more config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=sample_size * 2,
        **options,
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


# ---------------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5

SD3_LAYOUTS = ("sd3", "sd3.5")
SD3_TEXT_DIM = 96  # T5's width = the transformer's joint_attention_dim (the two CLIPs' 32 + 32 are zero-padded to it)
SD3_VAE_SCALING = dict(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE: latents = (z - shift) * scaling
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as T5 numbers them


def tiny_sd3_transformer_config(layout: str = "sd3", sample_size: int = 16, num_layers: int = 10) -> dict:
    """SD3Transformer2DModel config: patch 2, 2 heads of 8, 16 latent channels; ``"sd3"`` = SD3 medium's layout
    (no qk-norm, no dual attention), ``"sd3.5"`` = SD3.5 medium's (RMS qk-norm, dual attention in the first
    half of the blocks). Position embeddings cover 3x (SD3) / 6x (SD3.5) the default side, as the real models' do."""
    if layout not in SD3_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(SD3_LAYOUTS)}, got {layout!r}")
    heads, head_dim, patch = 2, 8, 2
    is_35 = layout == "sd3.5"
    return dict(
        sample_size=sample_size, patch_size=patch, in_channels=16, out_channels=16, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=SD3_TEXT_DIM,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * 32,  # the two CLIP projections, concatenated
        pos_embed_max_size=(6 if is_35 else 3) * max(1, sample_size // patch),
        dual_attention_layers=tuple(range(num_layers // 2)) if is_35 else (), qk_norm="rms_norm" if is_35 else None,
    )  # fmt: skip


def t5_vocabulary(words: Iterable[str] = ()) -> List[Tuple[str, float]]:
    """A Unigram vocabulary ``[(piece, log-probability)]`` in T5's numbering (``<pad>``, ``</s>``, ``<unk>`` first):
    every printable ASCII character, alone and word-initial (``"▁x"``), so that any ASCII text tokenizes, plus each
    of ``words`` as one word-initial piece."""
    characters = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    pieces = [(token, 0.0) for token in T5_SPECIAL_TOKENS] + [("▁", -3.0)]
    pieces += [(c, -5.0) for c in characters] + [("▁" + c, -5.0) for c in characters]
    known = {piece for piece, _ in pieces}
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words) if "▁" + w not in known]
    return pieces


def tiny_t5_tokenizer(words: Iterable[str] = (), model_max_length: int = 512):
    """A ``T5TokenizerFast`` over ``t5_vocabulary(words)``: a ``tokenizers`` Unigram model with T5's Metaspace
    pre-tokenizer and ``</s>`` appended, written as ``tokenizer.json`` and loaded with ``from_pretrained`` (no download)."""
    import json
    import os
    import tempfile

    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pad, eos, unk = T5_SPECIAL_TOKENS
    backend = Tokenizer(Unigram(t5_vocabulary(words), unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, T5_SPECIAL_TOKENS.index(eos))]
    )
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "eos_token": eos, "unk_token": unk,
              "pad_token": pad, "extra_ids": 0, "additional_special_tokens": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        backend.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        return T5TokenizerFast.from_pretrained(folder)


def _tiny_t5_encoder(vocab_size: int):
    """A two-layer T5 v1.1-style (gated GELU) encoder, as wide as the SD3 transformer's ``joint_attention_dim``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=SD3_TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def build_tiny_sd3(layout: str = "sd3", seed: int = 0, sample_size: int = 16, num_layers: int = 10, with_t5: bool = True) -> dict:
    """Random-weight Stable Diffusion 3 components keyed like ``StableDiffusion3Pipeline``'s arguments.

    ``layout``: ``"sd3"`` (SD3 medium: plain joint attention) or ``"sd3.5"`` (SD3.5 medium: RMS qk-norm, dual
    attention in the first half of the blocks); ``num_layers`` joint blocks (j0-j9 by default, so the default
    TPG "j2-j8" and PAG "j1" layers exist). ``sample_size`` is the latent side (the tiny VAE's factor is 2).
    ``with_t5=False`` leaves ``text_encoder_3``/``tokenizer_3`` None: diffusers then feeds zeros for T5's part.
    Text: two CLIPs of width 32 (projection 32 each, so pooled embeds are 64 wide) and a T5 of width 96."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    config = tiny_sd3_transformer_config(layout, sample_size, num_layers)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config)
    vae = _tiny_vae(sample_size, latent_channels=config["in_channels"], use_quant_conv=False, use_post_quant_conv=False,
                    **SD3_VAE_SCALING)  # fmt: skip
    text_encoder = CLIPTextModelWithProjection(_tiny_text_config(77))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(77))
    tokenizer_3 = tiny_t5_tokenizer() if with_t5 else None
    text_encoder_3 = _tiny_t5_encoder(len(tokenizer_3)) if with_t5 else None
    return dict(
        transformer=transformer.eval(),
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        text_encoder_3=text_encoder_3,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


FLUX_VARIANTS = ("dev", "schnell", "kontext")
FLUX_TEXT_DIM = SD3_TEXT_DIM  # T5's width = the transformer's joint_attention_dim
FLUX_VAE_SCALING = dict(scaling_factor=0.3611, shift_factor=0.1159)  # Flux's VAE: latents = (z - shift) * scaling


def tiny_flux_transformer_config(variant: str = "dev", num_layers: int = 19, num_single_layers: int = 38) -> dict:
    """FluxTransformer2DModel config with Flux.1's depth (19 double-stream blocks j0-j18, 38 single-stream blocks
    s0-s37, so the default layers exist), 2 heads of 16 (rotary axes 4 + 6 + 6), 16 latent channels packed 2x2 (64 in),
    the guidance embedding of ``"dev"`` and ``"kontext"`` (none on ``"schnell"``)."""
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(FLUX_VARIANTS)}, got {variant!r}")
    return dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=FLUX_TEXT_DIM, pooled_projection_dim=32,
        guidance_embeds=variant != "schnell", axes_dims_rope=(4, 6, 6),
    )  # fmt: skip


def flux_scheduler_config(variant: str = "dev") -> dict:
    """Flux.1's ``FlowMatchEulerDiscreteScheduler``: shift 3 with dynamic shifting (dev, Kontext); schnell's fixed shift 1."""
    if variant == "schnell":
        return dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip


def build_tiny_flux(variant: str = "dev", seed: int = 0, sample_size: int = 16, num_layers: int = 19, num_single_layers: int = 38) -> dict:
    """Random-weight Flux.1 components keyed like ``FluxPipeline``'s arguments (``variant`` ``"dev"``, ``"schnell"``
    or ``"kontext"``, for ``FluxKontextPipeline``). ``sample_size`` is the latent side (the tiny VAE's factor is 2, so
    Flux's 2x2 packing needs an even side). Text: a CLIP of width 32 (pooled) and a T5 of width 96."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    config = tiny_flux_transformer_config(variant, num_layers, num_single_layers)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**config)
    vae = _tiny_vae(sample_size, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **FLUX_VAE_SCALING)
    tokenizer_2 = tiny_t5_tokenizer()
    return dict(
        transformer=transformer.eval(),
        vae=vae,
        text_encoder=CLIPTextModel(_tiny_text_config(77)).eval(),
        text_encoder_2=_tiny_t5_encoder(len(tokenizer_2)),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(variant)),
    )


def tiny_chroma_transformer_config(num_layers: int = 19, num_single_layers: int = 38) -> dict:
    """ChromaTransformer2DModel config with Flux.1's depth (j0-j18, s0-s37, so the default layers exist), the tiny
    Flux widths (2 heads of 16, rotary axes 4 + 6 + 6, 64 packed channels in, T5 width 96) and a small approximator
    (16 input channels: the timestep's, the guidance's and the modulation index's sinusoids, 4 + 4 + 8; width 32, 2
    layers) that makes every block's modulation from the timestep."""
    return dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=FLUX_TEXT_DIM, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2,
    )  # fmt: skip


def build_tiny_chroma(seed: int = 0, sample_size: int = 16) -> dict:
    """Random-weight Chroma components keyed like ``ChromaPipeline``'s arguments: the transformer of
    ``tiny_chroma_transformer_config``, Flux's 16-channel VAE scaling, a T5 of width 96 with the offline tokenizer
    (Chroma has no CLIP) and Flux.1 dev's shifted flow-matching scheduler (Chroma1's: shift 3, dynamic shifting).
    ``sample_size`` is the latent side (even, for the 2x2 packing)."""
    from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(**tiny_chroma_transformer_config())
    vae = _tiny_vae(sample_size, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **FLUX_VAE_SCALING)
    tokenizer = tiny_t5_tokenizer()
    return dict(
        transformer=transformer.eval(),
        vae=vae,
        text_encoder=_tiny_t5_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**flux_scheduler_config("dev")),
    )


WAN_TEXT_DIM = 32  # the tiny Wan's text_dim (UMT5's width is 4096 on the released models)


def tiny_wan_transformer_config(num_layers: int = 30) -> dict:
    """WanTransformer3DModel config with Wan2.1 1.3B's depth (30 blocks b0-b29, so the default layers exist), 2 heads
    of 12 (rotary axes 4 + 4 + 4), 16 latent channels in 1x2x2 patches, cross-attention norm and RMS qk-norm across
    heads, as diffusers' own tiny Wan."""
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=WAN_TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )  # fmt: skip


def wan_scheduler_config() -> dict:
    """Wan2.1's UniPC flow-matching scheduler settings (flow_shift 3.0, its 480p value)."""
    return dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000)
