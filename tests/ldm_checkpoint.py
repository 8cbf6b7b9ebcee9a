"""A Stable Diffusion 1.x pipeline's weights under the original (LDM / CompVis) key names of a single-file checkpoint,
as the checkpoints users download are laid out: ``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE),
``cond_stage_model.transformer.`` (CLIP text encoder). Test helper; the layout facts:

- UNet: ``input_blocks.0.0`` is ``conv_in``; down level ``i``, layer ``j`` is ``input_blocks.{1 + i*(L+1) + j}``
  (``.0`` resnet, ``.1`` attention), its downsampler ``input_blocks.{(i+1)*(L+1)}.0.op``; ``middle_block.0/1/2`` are
  resnet, attention, resnet; up level ``i``, layer ``j`` (L+1 layers a level) is ``output_blocks.{i*(L+1) + j}``, its
  upsampler in the level's last block, ``.1`` (no attention) or ``.2``; resnets name their layers
  ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``, ``skip_connection``; attentions keep diffusers' names.
- VAE: ``encoder.down.{i}.block.{j}`` / ``.downsample``; the decoder's levels run the other way
  (``decoder.up.{N-1-i}``); ``mid.block_1/2``, ``mid.attn_1`` with 1x1-conv ``q/k/v/proj_out`` and ``norm``;
  ``norm_out`` for ``conv_norm_out``; resnet shortcut ``nin_shortcut``.
- Text encoder: transformers' CLIPTextModel keys under ``cond_stage_model.transformer.text_model.``.
"""

from __future__ import annotations

import re
from typing import Dict

import torch

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
            "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def _unet_resnet(rest: str) -> str:
    layer, param = rest.rsplit(".", 1)
    return f"{UNET_RESNET[layer]}.{param}"


def unet_key(key: str, layers_per_block: int, up_attention: Dict[int, bool]) -> str:
    """The LDM name (without ``model.diffusion_model.``) of a diffusers UNet2DConditionModel weight."""
    step = layers_per_block + 1
    layer, _, param = key.rpartition(".")
    if layer in UNET_TOP:
        return f"{UNET_TOP[layer]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = f"input_blocks.{1 + i * step + j}"
        return f"{block}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_unet_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = f"output_blocks.{i * step + j}"
        return f"{block}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        i = int(m[1])
        return f"output_blocks.{i * step + layers_per_block}.{2 if up_attention[i] else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet weight {key}")


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_key(key: str, levels: int) -> str:
    """The LDM name (without ``first_stage_model.``) of a diffusers AutoencoderKL weight."""
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(\w+)", key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"(post_)?quant_conv\.\w+", key):
        return key
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    raise KeyError(f"no LDM name for VAE weight {key}")


def ldm_state_dict(unet, vae, text_encoder) -> Dict[str, torch.Tensor]:
    """The three models' weights under an SD 1.x single-file checkpoint's key names (contiguous copies)."""
    layers = unet.config.layers_per_block
    up_attention = {i: hasattr(block, "attentions") for i, block in enumerate(unet.up_blocks)}
    state = {}
    for key, value in unet.state_dict().items():
        state["model.diffusion_model." + unet_key(key, layers, up_attention)] = value
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        name = vae_key(key, levels)
        if ".mid.attn_1." in name and name.endswith("weight") and not name.endswith("norm.weight"):
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        state["first_stage_model." + name] = value
    for key, value in text_encoder.state_dict().items():
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    if len(state) != len(unet.state_dict()) + len(vae.state_dict()) + len(text_encoder.state_dict()):
        raise AssertionError("two weights got the same LDM name")
    return {key: value.detach().contiguous().clone() for key, value in state.items()}
