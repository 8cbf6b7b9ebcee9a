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
    assert own_pipe.pag_applied_layers == ["mid"]  # the family's default until set
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
    with pytest.raises(ValueError, match="pag_applied_layers: '\\(\\(' is neither"):
        text_only.set_pag_applied_layers("((")


# diffusers' PAG pipelines and the project's each: diffusers' fast tests build them with ``pag_applied_layers=``.
DIFFUSERS_PAG_PAIRS = [
    ("StableDiffusionXLTPGPipeline", "StableDiffusionXLPAGPipeline"),
    ("StableDiffusionXLTPGImg2ImgPipeline", "StableDiffusionXLPAGImg2ImgPipeline"),
    ("StableDiffusionXLTPGInpaintPipeline", "StableDiffusionXLPAGInpaintPipeline"),
    ("StableDiffusionXLControlNetTPGPipeline", "StableDiffusionXLControlNetPAGPipeline"),
    ("StableDiffusionXLControlNetTPGImg2ImgPipeline", "StableDiffusionXLControlNetPAGImg2ImgPipeline"),
    ("StableDiffusionTPGPipeline", "StableDiffusionPAGPipeline"),
    ("StableDiffusionTPGImg2ImgPipeline", "StableDiffusionPAGImg2ImgPipeline"),
    ("StableDiffusionTPGInpaintPipeline", "StableDiffusionPAGInpaintPipeline"),
    ("StableDiffusionControlNetTPGPipeline", "StableDiffusionControlNetPAGPipeline"),
    ("StableDiffusionControlNetTPGInpaintPipeline", "StableDiffusionControlNetPAGInpaintPipeline"),
]


@pytest.mark.parametrize("ours, theirs", DIFFUSERS_PAG_PAIRS, ids=[pair[0] for pair in DIFFUSERS_PAG_PAIRS])
def test_construction_takes_diffusers_pag_pipelines_parameters(ours, theirs):
    import inspect

    import diffusers

    import dualguide

    parameters = list(inspect.signature(getattr(dualguide, ours).__init__).parameters)
    assert parameters == list(inspect.signature(getattr(diffusers, theirs).__init__).parameters)
    assert parameters[-1] == "pag_applied_layers"
    assert inspect.signature(getattr(dualguide, ours).__init__).parameters["pag_applied_layers"].default is None


def test_pag_applied_layers_at_construction_is_the_calls_default(components, pipe):
    built = StableDiffusionXLTPGPipeline(**components, add_watermarker=False, pag_applied_layers=["down_blocks.1", "m0"])
    built.set_progress_bar_config(disable=True)
    assert built.pag_applied_layers == ["down_blocks.1", "m0"]
    before = unet_snapshot(built.unet)
    by_default = generate(built, tpg_scale=0.0, pag_scale=2.0)
    assert unet_snapshot(built.unet) == before
    assert torch.equal(by_default, generate(pipe, tpg_scale=0.0, pag_scale=2.0, pag_applied_layers_index="d0-d3,m0"))
    assert not torch.equal(by_default, generate(pipe, tpg_scale=0.0, pag_scale=2.0))
    assert StableDiffusionXLTPGPipeline(**components, add_watermarker=False).pag_applied_layers == ["mid"]
    one = StableDiffusionXLTPGPipeline(**components, add_watermarker=False, pag_applied_layers="d0-d3,m0")  # diffusers: a str is one
    assert one.pag_applied_layers == ["d0-d3,m0"]


def test_pag_applied_layers_as_diffusers_fast_tests_use_it(components):
    """diffusers' SDXL-PAG fast tests build the class with ``pag_applied_layers=["mid", "up", "down"]``: PAG off it is
    plain SDXL; on, it is diffusers' PAG pipeline with those layers."""
    from diffusers import StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline

    layers = ["mid", "up", "down"]
    ours = StableDiffusionXLTPGPipeline(**components, add_watermarker=False, pag_applied_layers=layers)
    theirs = StableDiffusionXLPAGPipeline(**components, add_watermarker=False, pag_applied_layers=layers)
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
    assert ours.pag_applied_layers == theirs.pag_applied_layers == layers
    run = dict(prompt="a red circle", num_inference_steps=3, height=64, width=64, output_type="latent", guidance_scale=5.0)
    plain = StableDiffusionXLPipeline(**components, add_watermarker=False)(generator=torch.Generator().manual_seed(0), **run).images
    off = ours(generator=torch.Generator().manual_seed(0), tpg_scale=0.0, pag_scale=0.0, **run).images
    assert torch.allclose(off, plain, atol=1e-4)
    on = ours(generator=torch.Generator().manual_seed(0), tpg_scale=0.0, pag_scale=3.0, **run).images
    expected = theirs(generator=torch.Generator().manual_seed(0), pag_scale=3.0, **run).images
    print(f"pag_applied_layers={layers}: max |ours - diffusers' PAG| = {(on - expected).abs().max().item():.2e}")
    assert torch.allclose(on, expected, atol=1e-4)
    assert not torch.allclose(on, off, atol=1e-2)


def test_from_pretrained_takes_pag_applied_layers(model_folder, pipe):
    loaded = StableDiffusionXLTPGPipeline.from_pretrained(model_folder, pag_applied_layers="down_blocks.1")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.pag_applied_layers == ["down_blocks.1"]
    expected = generate(pipe, tpg_scale=0.0, pag_scale=2.0, pag_applied_layers_index="d0-d3")
    assert torch.equal(generate(loaded, tpg_scale=0.0, pag_scale=2.0), expected)
    assert StableDiffusionXLTPGPipeline.from_pretrained(model_folder).pag_applied_layers == ["mid"]


@pytest.mark.parametrize(
    "value, kind, message",
    [
        (["down_blocks.0"], ValueError, "pag_applied_layers: no transformer block of this model has a self-attention matching 'down_blocks.0'"),
        (["m0", "d99"], ValueError, "pag_applied_layers: unknown layer id\\(s\\) d99"),
        ("((", ValueError, "pag_applied_layers: '\\(\\(' is neither a layer id nor a valid PAG layer name"),
        (3, TypeError, "pag_applied_layers must be layer ids"),
    ],
    ids=str,
)
def test_bad_pag_applied_layers_are_refused_naming_the_parameter(components, model_folder, value, kind, message):
    with pytest.raises(kind, match=message):
        StableDiffusionXLTPGPipeline(**components, add_watermarker=False, pag_applied_layers=value)
    with pytest.raises(kind, match=message):
        StableDiffusionXLTPGPipeline.from_pretrained(model_folder, pag_applied_layers=value)


@pytest.mark.parametrize("value", ["((", 3, [None]], ids=str)
def test_from_pretrained_refuses_a_malformed_value_before_loading(value):
    with pytest.raises((ValueError, TypeError), match="pag_applied_layers"):
        StableDiffusionXLTPGPipeline.from_pretrained("/nonexistent/model/folder", pag_applied_layers=value)
