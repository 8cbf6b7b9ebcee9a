"""Layer ids <-> UNet transformer blocks."""

import pytest

from dualguide.layers import parse_layer_ids, resolve_layers, transformer_blocks


def test_sdxl_layout_has_24_10_36_blocks(unet):
    blocks = transformer_blocks(unet)
    counts = {p: sum(1 for k in blocks if k[0] == p) for p in "dmu"}
    assert counts == {"d": 24, "m": 10, "u": 36}


def test_ids_map_to_the_design_module_names(unet):
    blocks = transformer_blocks(unet)
    name = {k: v[0] for k, v in blocks.items()}
    assert name["d0"] == "down_blocks.1.attentions.0.transformer_blocks.0"
    assert name["d3"] == "down_blocks.1.attentions.1.transformer_blocks.1"
    assert name["d4"] == "down_blocks.2.attentions.0.transformer_blocks.0"
    assert name["d13"] == "down_blocks.2.attentions.0.transformer_blocks.9"
    assert name["d14"] == "down_blocks.2.attentions.1.transformer_blocks.0"
    assert name["d23"] == "down_blocks.2.attentions.1.transformer_blocks.9"
    assert name["m0"] == "mid_block.attentions.0.transformer_blocks.0"
    assert name["m9"] == "mid_block.attentions.0.transformer_blocks.9"
    assert name["u0"] == "up_blocks.0.attentions.0.transformer_blocks.0"
    assert name["u29"] == "up_blocks.0.attentions.2.transformer_blocks.9"
    assert name["u30"] == "up_blocks.1.attentions.0.transformer_blocks.0"
    assert name["u35"] == "up_blocks.1.attentions.2.transformer_blocks.1"


def test_parse_lists_and_ranges():
    assert parse_layer_ids("d6-d8") == ["d6", "d7", "d8"]
    assert parse_layer_ids(["m0", "u0-u2", "d1"]) == ["m0", "u0", "u1", "u2", "d1"]
    assert parse_layer_ids("d1,u3-4") == ["d1", "u3", "u4"]
    assert parse_layer_ids(["d1", "d1"]) == ["d1"]


@pytest.mark.parametrize("spec", ["x3", "d", "d6-u7", "dd1", "d5-d2", ""])
def test_malformed_ids_raise(spec, unet):
    with pytest.raises(ValueError, match="layers"):
        resolve_layers(unet, spec, "layers")


def test_unknown_id_lists_valid_ranges(unet):
    with pytest.raises(ValueError, match=r"tpg_applied_layers_index.*d24.*d0-d23, m0-m9, u0-u35"):
        resolve_layers(unet, "d20-d24", "tpg_applied_layers_index")


def test_sd15_layout_is_supported():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=16, sample_size=8,
    )  # fmt: skip
    blocks = transformer_blocks(unet)
    assert sorted(blocks) == ["d0", "m0", "u0", "u1"]
    assert [n for n, _ in resolve_layers(unet, "u0-u1")] == [
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.0",
    ]
