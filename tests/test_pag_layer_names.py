"""diffusers' PAG layer names ("mid", "down_blocks.1", ...) in pag_applied_layers_index, and diffusers' PAGMixin API."""

import pytest
import torch
from conftest import generate, unet_snapshot
from diffusers.pipelines.pag.pag_utils import PAGMixin

from dualguide import StableDiffusionXLTPGPipeline
from dualguide.layers import parse_layer_spec, resolve_layers

PAG = "pag_applied_layers_index"
NAMES = [
    ["mid"], ["down"], ["up"], ["mid", "down", "up"], ["mid_block"], ["mid_block.attentions.0"], ["down_blocks.1"],
    ["down_blocks.1.attentions.1"], ["up_blocks.1.attentions.2.transformer_blocks.1"], ["blocks.1"], ["attn1"],
    ["transformer_blocks.(1|2)"], ["attentions.0.transformer_blocks.0.attn1"],
]  # fmt: skip
BAD_NAMES = [["mid_block.attentions.1"], ["down_blocks.0"], ["attn2"], ["nothing"], ["m0", "up_blocks.9"]]


@pytest.fixture(scope="module")
def diffusers_pag(components):
    from diffusers import StableDiffusionXLPAGPipeline

    return StableDiffusionXLPAGPipeline(**components, add_watermarker=False)


def diffusers_selection(pipeline, names):
    """The self-attention names diffusers' ``_set_pag_attn_processor`` gives its PAG processor; the UNet restored."""
    original = pipeline.unet.attn_processors
    try:
        pipeline._set_pag_attn_processor(pag_applied_layers=names, do_classifier_free_guidance=False)
        return {name.rsplit(".processor", 1)[0] for name in pipeline.pag_attn_processors}
    finally:
        pipeline.unet.set_attn_processor(dict(original))


def our_selection(unet, names):
    return {f"{name}.attn1" for name, _ in resolve_layers(unet, names, PAG)}


@pytest.mark.parametrize("names", NAMES, ids=str)
def test_names_select_what_diffusers_selects(names, diffusers_pag, unet):
    assert our_selection(unet, names) == diffusers_selection(diffusers_pag, names)


@pytest.mark.parametrize("names", BAD_NAMES, ids=str)
def test_names_diffusers_refuses_raise_naming_the_parameter(names, diffusers_pag, unet):
    with pytest.raises(ValueError):
        diffusers_selection(diffusers_pag, names)
    with pytest.raises(ValueError, match=f"{PAG}.*layer ids .*d0-d23.*PAG layer names"):
        resolve_layers(unet, names, PAG)


def test_ids_and_names_mix_in_one_list(unet):
    mixed = our_selection(unet, ["m0", "down_blocks.1", "u30-u31", "mid_block"])
    assert mixed == our_selection(unet, ["d0-d3", "m0-m9", "u30", "u31"])
    assert parse_layer_spec(["m0", "mid", "d1,d2", "mid"], PAG) == ["m0", "mid", "d1", "d2"]


def test_names_only_for_pag():
    assert parse_layer_spec("mid", PAG) == ["mid"]
    with pytest.raises(ValueError, match="tpg_applied_layers_index: malformed layer id 'mid'"):
        parse_layer_spec("mid", "tpg_applied_layers_index")
    with pytest.raises(ValueError, match=f"{PAG}: '\\(\\(' is neither a layer id nor a valid PAG layer name"):
        parse_layer_spec(["m0", "(("], PAG)


class UNetCalls:
    def __init__(self, unet):
        self.count = 0
        self.handle = unet.register_forward_pre_hook(self.seen)

    def seen(self, module, args):
        self.count += 1


@pytest.mark.parametrize("names", [BAD_NAMES[0], "((", ["m0", "nothing"]], ids=str)
def test_bad_names_raise_before_any_unet_call(names, pipe):
    before = unet_snapshot(pipe.unet)
    calls = UNetCalls(pipe.unet)
    try:
        with pytest.raises(ValueError, match=PAG):
            generate(pipe, pag_scale=2.0, pag_applied_layers_index=names)
    finally:
        calls.handle.remove()
    assert calls.count == 0
    assert unet_snapshot(pipe.unet) == before


def test_a_name_runs_as_its_ids_and_restores_the_unet(pipe):
    before = unet_snapshot(pipe.unet)
    by_name = generate(pipe, tpg_scale=0.0, pag_scale=2.0, pag_applied_layers_index="mid")
    assert unet_snapshot(pipe.unet) == before
    assert torch.equal(by_name, generate(pipe, tpg_scale=0.0, pag_scale=2.0, pag_applied_layers_index="m0-m9"))
    mixed = generate(pipe, pag_scale=2.0, pag_applied_layers_index=["down_blocks.1", "m0"])
    assert torch.equal(mixed, generate(pipe, pag_scale=2.0, pag_applied_layers_index="d0-d3,m0"))


@pytest.fixture
def own_pipe(components):
    pipeline = StableDiffusionXLTPGPipeline(**components, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_set_pag_applied_layers_is_the_calls_default(own_pipe):
    assert isinstance(own_pipe, PAGMixin)
    assert own_pipe.pag_applied_layers == ["m0-m9"]  # the family's default until set
    own_pipe.set_pag_applied_layers(["down_blocks.1", "m0"])
    assert own_pipe.pag_applied_layers == ["down_blocks.1", "m0"]
    expected = generate(own_pipe, tpg_scale=0.0, pag_scale=2.0, pag_applied_layers_index="d0-d3,m0")
    assert torch.equal(generate(own_pipe, tpg_scale=0.0, pag_scale=2.0), expected)
    assert own_pipe.pag_scale == 2.0 and own_pipe.do_perturbed_attention_guidance
    explicit = generate(own_pipe, tpg_scale=0.0, pag_scale=2.0, pag_applied_layers_index="m0-m9")  # a call's own wins
    assert not torch.equal(explicit, expected)


def test_set_pag_applied_layers_refuses_unknown_layers_unchanged(own_pipe):
    own_pipe.set_pag_applied_layers("mid")
    with pytest.raises(ValueError, match="'down_blocks.0'"):
        own_pipe.set_pag_applied_layers(["down", "down_blocks.0"])
    assert own_pipe.pag_applied_layers == ["mid"]


def test_set_pag_attn_processor_installs_diffusers_processors_where_names_select(own_pipe, diffusers_pag):
    original = own_pipe.unet.attn_processors
    try:
        own_pipe._set_pag_attn_processor(["mid", "down_blocks.1.attentions.1"], do_classifier_free_guidance=True)
        ours = {name.rsplit(".processor", 1)[0] for name in own_pipe.pag_attn_processors}
    finally:
        own_pipe.unet.set_attn_processor(dict(original))
    assert ours == diffusers_selection(diffusers_pag, ["mid", "down_blocks.1.attentions.1"])
    assert own_pipe.pag_attn_processors == {}


def test_sd_pipelines_take_names_and_the_api_too():
    from diffusers import StableDiffusionPAGPipeline

    from dualguide import StableDiffusionTPGPipeline
    from dualguide.tiny import build_tiny_sd

    components = build_tiny_sd(version=1)
    ours = StableDiffusionTPGPipeline(**components)
    ours.set_progress_bar_config(disable=True)
    theirs = StableDiffusionPAGPipeline(**components)
    for names in (["mid"], ["down"], ["up_blocks.1"], ["mid", "down", "up"]):
        assert our_selection(ours.unet, names) == diffusers_selection(theirs, names)
    assert ours.pag_applied_layers == ["m0"]
    ours.set_pag_applied_layers("mid")
    run = dict(prompt="a red circle", num_inference_steps=2, output_type="latent", tpg_scale=0.0, pag_scale=2.0)
    by_name = ours(generator=torch.Generator().manual_seed(0), **run).images
    by_id = ours(generator=torch.Generator().manual_seed(0), pag_applied_layers_index="m0", **run).images
    assert torch.equal(by_name, by_id)


def test_set_pag_applied_layers_without_a_unet_checks_the_form(components):
    text_only = StableDiffusionXLTPGPipeline(**{**components, "unet": None, "vae": None}, add_watermarker=False)
    text_only.set_pag_applied_layers(["mid", "m0"])
    assert text_only.pag_applied_layers == ["mid", "m0"]
    with pytest.raises(ValueError, match=PAG):
        text_only.set_pag_applied_layers("((")
