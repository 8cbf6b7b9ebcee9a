"""Flux.1 image tasks: FluxTPGImg2ImgPipeline and FluxKontextTPGPipeline equal diffusers' FluxImg2ImgPipeline and
FluxKontextPipeline with the terms off (Kontext: true CFG too), the k-diffusion Euler path equals the scheduler loop,
true CFG + NAG is one transformer call per step; Kontext's reference tokens are never permuted or guided; a Kontext
call without an image fails before any transformer call; from_pipe between the Flux pipelines."""

import inspect

import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxKontextPipeline

from counting import rows_seen
from flux_inputs import embeds, nag_negative, negative
from dualguide import FluxKontextTPGPipeline, FluxTPGImg2ImgPipeline, FluxTPGPipeline
from dualguide.pipelines.flux_base import check_flux_call
from dualguide.pipelines.parameters import with_absent
from dualguide.tiny import build_tiny_flux

STEPS = 3


@pytest.fixture(scope="module")
def dev_components():
    return build_tiny_flux("dev")


@pytest.fixture(scope="module")
def kontext_components():
    return build_tiny_flux("kontext")


def run(pipe, seed=0, **kwargs):
    prompt_embeds, pooled = embeds(100)
    arguments = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, num_inference_steps=STEPS, output_type="latent",
                     max_sequence_length=16, height=32, width=32)  # fmt: skip
    return pipe(**{**arguments, **kwargs}, generator=torch.Generator().manual_seed(seed)).images


IMAGE = torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(5))  # resized to 32 x 32 by img2img


def img2img(pipe, **kwargs):
    return run(pipe, **{**dict(image=IMAGE, strength=0.7, num_inference_steps=4, guidance_scale=3.5), **kwargs})  # 4 steps: 3 run


REFERENCE = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(6))  # 12 x 20 latents: 6 x 10 reference tokens
GENERATED_TOKENS, REFERENCE_TOKENS = 16 * 16 // 4, 12 * 20 // 4


def kontext(pipe, **kwargs):
    return run(pipe, **{**dict(image=REFERENCE, max_area=32 * 32, _auto_resize=False, guidance_scale=2.5), **kwargs})


def test_img2img_terms_off_equal_diffusers(dev_components):
    ours = img2img(FluxTPGImg2ImgPipeline(**dev_components), tpg_scale=0.0)
    theirs = img2img(FluxImg2ImgPipeline(**dev_components))
    assert (ours - theirs).abs().max() <= 1e-4
    assert ours.shape == (1, GENERATED_TOKENS, 64)


def test_img2img_true_cfg_nag_one_call_per_step_and_euler_equals_the_scheduler_loop(dev_components):
    pipe = FluxTPGImg2ImgPipeline(**dev_components)
    options = dict(tpg_scale=0.0, true_cfg_scale=3.0, nag_scale=4.0, **negative(), **nag_negative())
    with rows_seen(pipe.transformer) as rows:
        scheduled = img2img(pipe, **options)
    assert rows == [2] * STEPS  # [uncond, cond], NAG inside: one call per step
    assert (img2img(pipe, sampler="euler", **options) - scheduled).abs().max() <= 1e-5
    assert (scheduled - img2img(pipe, tpg_scale=0.0)).abs().max() > 1e-3  # the terms acted


def test_kontext_terms_off_and_true_cfg_equal_diffusers(kontext_components):
    ours = FluxKontextTPGPipeline(**kontext_components)
    theirs = FluxKontextPipeline(**kontext_components)
    off = kontext(ours, tpg_scale=0.0)
    assert (off - kontext(theirs)).abs().max() <= 1e-4
    with rows_seen(ours.transformer) as rows:
        cfg = kontext(ours, tpg_scale=0.0, true_cfg_scale=3.0, **negative())
    assert rows == [2] * STEPS
    assert (cfg - kontext(theirs, true_cfg_scale=3.0, **negative())).abs().max() <= 1e-4
    assert (cfg - off).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [dict(num_images_per_prompt=2), dict(image=torch.randn(1, 16, 10, 14, generator=torch.Generator().manual_seed(7)), height=24, width=48,
                                         max_area=24 * 48)],  # fmt: skip
    ids=["two-images-per-prompt", "reference-latents-non-square"],
)
def test_kontext_batches_and_reference_latents_equal_diffusers(kontext_components, options):
    ours = kontext(FluxKontextTPGPipeline(**kontext_components), tpg_scale=0.0, num_inference_steps=2, **options)
    theirs = kontext(FluxKontextPipeline(**kontext_components), num_inference_steps=2, **options)
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1e-4


def test_kontext_euler_equals_the_scheduler_loop_in_one_call_per_step(kontext_components):
    pipe = FluxKontextTPGPipeline(**kontext_components)
    options = dict(true_cfg_scale=3.0, tpg_scale=3.0, nag_scale=4.0, pag_scale=2.0, **negative(), **nag_negative())
    with rows_seen(pipe.transformer) as rows:
        scheduled = kontext(pipe, **options)
    assert rows == [4] * STEPS  # [uncond, cond, tpg, pag]
    assert torch.isfinite(scheduled).all()
    assert (kontext(pipe, sampler="euler", **options) - scheduled).abs().max() <= 1e-5


def test_kontext_nag_ends_at_the_official_kontext_default(kontext_components):
    """The official NAG Kontext pipeline's nag_end is 0.25: NAG guides the steps whose timestep t >= 750."""
    pipe = FluxKontextTPGPipeline(**kontext_components)
    with rows_seen(pipe.transformer.context_embedder) as text_rows:
        kontext(pipe, tpg_scale=0.0, nag_scale=5.0, **nag_negative())
    official = [2 if float(t) >= 750 else 1 for t in pipe.scheduler.timesteps]
    assert text_rows == official and set(official) == {1, 2}


class FirstBlock:
    """The first call's image tokens entering the first double block (after the guidance hooks, at its norm) and the
    image-token output of its attention."""

    def __init__(self, transformer):
        self.block, self.inputs, self.outputs = transformer.transformer_blocks[0], [], []

    def __enter__(self):
        self.handles = [
            self.block.norm1.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0].clone())),
            self.block.attn.register_forward_hook(lambda _m, _args, output: self.outputs.append(output[0].clone())),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_kontext_reference_tokens_are_never_permuted_or_guided(kontext_components):
    """TPG permutes, PAG perturbs and NAG guides the generated tokens only: entering the first block, every row's
    reference tokens equal the unguided call's, and the guided rows' reference-token attention outputs stay the
    unguided ones, while their generated tokens change."""
    pipe = FluxKontextTPGPipeline(**kontext_components)
    generated, reference = slice(0, GENERATED_TOKENS), slice(GENERATED_TOKENS, GENERATED_TOKENS + REFERENCE_TOKENS)
    with FirstBlock(pipe.transformer) as plain:
        kontext(pipe, tpg_scale=0.0, num_inference_steps=1)
    options = dict(tpg_scale=3.0, tpg_applied_layers_index="j0", pag_scale=2.0, pag_applied_layers_index="j0", nag_scale=5.0, **nag_negative())
    with FirstBlock(pipe.transformer) as guided:
        kontext(pipe, num_inference_steps=1, **options)
    (plain_in,), (plain_out,), (guided_in,), (guided_out,) = plain.inputs, plain.outputs, guided.inputs, guided.outputs
    assert plain_in.shape[1] == GENERATED_TOKENS + REFERENCE_TOKENS and guided_in.shape[0] == 3  # [cond, tpg, pag]
    assert torch.equal(guided_in[:, reference], plain_in[:, reference].expand(3, -1, -1))
    tpg_tokens, cond_tokens = guided_in[1, generated], plain_in[0, generated]
    assert not torch.equal(tpg_tokens, cond_tokens)  # the TPG row's generated tokens are permuted among themselves
    assert torch.equal(tpg_tokens.sort(dim=0).values, cond_tokens.sort(dim=0).values)
    for row in (0, 2):  # cond (NAG) and pag (PAG + NAG): the reference outputs stay, the generated ones move
        assert (guided_out[row, reference] - plain_out[0, reference]).abs().max() <= 1e-5, row
        assert (guided_out[row, generated] - plain_out[0, generated]).abs().max() > 1e-3, row
    single = []  # a single-stream block's norm: the 16 text tokens, then the generated and the reference image tokens
    handle = pipe.transformer.single_transformer_blocks[0].norm.register_forward_pre_hook(lambda _m, args: single.append(args[0].clone()))
    try:
        kontext(pipe, tpg_scale=3.0, tpg_applied_layers_index="s0", num_inference_steps=1)
    finally:
        handle.remove()
    cond_and_tpg = single[0][:, 16:]
    assert torch.equal(cond_and_tpg[1, reference], cond_and_tpg[0, reference])
    assert not torch.equal(cond_and_tpg[1, generated], cond_and_tpg[0, generated])
    assert torch.equal(cond_and_tpg[1, generated].sort(dim=0).values, cond_and_tpg[0, generated].sort(dim=0).values)


def test_kontext_without_image_fails_before_any_transformer_call(kontext_components):
    pipe = FluxKontextTPGPipeline(**kontext_components)
    with rows_seen(pipe.transformer) as rows, pytest.raises(ValueError, match="image"):
        run(pipe, max_area=32 * 32)
    with pytest.raises(ValueError, match="max_area"):
        kontext(pipe, max_area=9)  # 3 x 3 pixels: 0 x 0 at the packed multiple (4 for the tiny VAE)
    assert rows == []


@pytest.mark.parametrize("options, parameter", [(dict(strength=0.0), "strength"), (dict(image=None), "image")])
def test_img2img_bad_input_fails_before_any_transformer_call(dev_components, options, parameter):
    pipe = FluxTPGImg2ImgPipeline(**dev_components)
    with rows_seen(pipe.transformer) as rows, pytest.raises((ValueError, TypeError), match=parameter):
        img2img(pipe, **options)
    assert rows == []


def test_default_size_is_diffusers(dev_components):
    """diffusers' Flux pipelines default to ``default_sample_size * vae_scale_factor`` pixels, not twice that."""
    pipe = FluxTPGImg2ImgPipeline(**dev_components)
    prompt_embeds, pooled = embeds(100)
    arguments = {name: p.default for name, p in inspect.signature(pipe.__call__).parameters.items()}
    checked = check_flux_call(pipe, with_absent({**arguments, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}))
    assert checked["height"] == checked["width"] == pipe.default_sample_size * pipe.vae_scale_factor


def test_from_pipe_between_the_flux_pipelines(dev_components, kontext_components):
    text2img = FluxTPGPipeline(**dev_components)
    converted = FluxTPGImg2ImgPipeline.from_pipe(text2img)
    assert type(converted) is FluxTPGImg2ImgPipeline and converted.transformer is text2img.transformer
    short = dict(tpg_scale=0.0, num_inference_steps=2)
    assert torch.equal(img2img(converted, **short), img2img(FluxTPGImg2ImgPipeline(**dev_components), **short))
    back = FluxTPGPipeline.from_pipe(converted)
    assert type(back) is FluxTPGPipeline and torch.equal(run(back, **short), run(text2img, **short))
    edit = FluxKontextTPGPipeline.from_pipe(FluxTPGPipeline(**kontext_components))
    assert type(edit) is FluxKontextTPGPipeline
    assert torch.equal(kontext(edit, **short), kontext(FluxKontextTPGPipeline(**kontext_components), **short))
