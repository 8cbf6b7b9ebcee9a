"""Flux.1 (dev-like with the guidance embedding, schnell-like without): parity with diffusers' FluxPipeline (terms off,
true CFG), the k-diffusion path equal to FlowMatchEulerDiscreteScheduler, true CFG + NAG + TPG + PAG in one transformer
call per step, TPG against a hook-free reference, NAG's extra rows, bad input before any call, processors restored."""

import pytest
import torch
from diffusers import FluxPipeline

from counting import rows_seen
from flux_inputs import TEXT, embeds, nag_negative, negative
from dualguide import FluxTPGPipeline
from dualguide.families import FLUX
from dualguide.families.flux import image_ids, pack_latents, unpack_latents
from dualguide.tiny import build_tiny_flux

SIZE = dict(height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def components(request):
    return build_tiny_flux(request.param)


@pytest.fixture(scope="module")
def dev_components():
    return build_tiny_flux("dev")


def latents(pipe, seed=0, **kwargs):
    prompt_embeds, pooled = embeds(100)
    arguments = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, num_inference_steps=3, guidance_scale=3.5,
                     output_type="latent", **SIZE)  # fmt: skip
    return pipe(**{**arguments, **kwargs}, generator=torch.Generator().manual_seed(seed)).images


def processors(transformer):
    return dict(transformer.attn_processors)


def test_packing_round_trips_and_ids_follow_diffusers():
    x = torch.randn(2, 16, 6, 8)
    assert torch.equal(unpack_latents(pack_latents(x), 6, 8), x)
    ids = image_ids(6, 8, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[5].tolist() == [0.0, 1.0, 1.0] and ids[-1].tolist() == [0.0, 2.0, 3.0]


def test_terms_off_equal_diffusers(components):
    ours = latents(FluxTPGPipeline(**components))  # TPG, experimental on Flux, is off by default
    assert (ours - latents(FluxPipeline(**components))).abs().max() <= 1e-4


def test_true_cfg_equals_diffusers_in_one_call(components):
    pipe = FluxTPGPipeline(**components)
    with rows_seen(pipe.transformer) as rows:
        ours = latents(pipe, tpg_scale=0.0, true_cfg_scale=4.0, **negative())
    assert rows == [2, 2, 2]  # [uncond, cond] in one call per step
    theirs = latents(FluxPipeline(**components), true_cfg_scale=4.0, **negative())
    assert (ours - theirs).abs().max() <= 1e-4
    assert (theirs - latents(FluxPipeline(**components))).abs().max() > 1e-3  # true CFG acted


def test_sides_off_the_packing_are_resized_as_diffusers(dev_components):
    ours = latents(FluxTPGPipeline(**dev_components), tpg_scale=0.0, height=34, width=30)
    theirs = latents(FluxPipeline(**dev_components), height=34, width=30)
    assert ours.shape == theirs.shape == (1, 8 * 7, 64)  # 4 px a token (VAE factor 2, 2 x 2 packing): 32 x 28
    assert (ours - theirs).abs().max() <= 1e-4


def test_negative_embeds_of_another_length_refused_with_true_cfg_ignored_without(dev_components):
    pipe = FluxTPGPipeline(**dev_components)
    shorter = dict(negative_prompt_embeds=torch.randn(1, 12, TEXT), negative_pooled_prompt_embeds=torch.randn(1, 32))
    with rows_seen(pipe.transformer) as rows, pytest.raises(ValueError, match="must have the same shape when passed directly"):
        latents(pipe, tpg_scale=0.0, true_cfg_scale=2.0, **shorter)
    assert rows == []
    assert (latents(pipe, tpg_scale=0.0, true_cfg_scale=1.0, **shorter) - latents(pipe, tpg_scale=0.0)).abs().max() == 0


def test_diffusers_cache_hooks_run_as_in_diffusers(dev_components):
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, reference = FluxTPGPipeline(**dev_components), FluxPipeline(**dev_components)
    plain = latents(reference, num_inference_steps=4)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.8))  # the components share the transformer
    try:
        ours = latents(pipe, tpg_scale=0.0, num_inference_steps=4)  # needs a cache context around each call
        theirs = latents(reference, num_inference_steps=4)
    finally:
        pipe.transformer.disable_cache()
    assert (ours - theirs).abs().max() <= 1e-4
    assert (theirs - plain).abs().max() > 1e-4  # the cache skipped blocks


def test_step_end_callback_changing_guidance_scale_is_ignored_as_in_diffusers(dev_components):
    def raise_scale(pipe, step, timestep, tensors):
        pipe._guidance_scale += 1.0  # diffusers' Flux embeds guidance_scale once per run
        return tensors

    ours = latents(FluxTPGPipeline(**dev_components), tpg_scale=0.0, callback_on_step_end=raise_scale)
    theirs = latents(FluxPipeline(**dev_components), callback_on_step_end=raise_scale)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (theirs - latents(FluxPipeline(**dev_components))).abs().max() == 0


def test_kdiffusion_euler_equals_flow_match_euler(components):
    pipe = FluxTPGPipeline(**components)
    options = dict(true_cfg_scale=3.0, nag_scale=4.0, **negative(), **nag_negative())
    assert (latents(pipe, sampler="euler", **options) - latents(pipe, **options)).abs().max() <= 1e-5


def test_every_mode_is_one_transformer_call_per_step(dev_components):
    pipe = FluxTPGPipeline(**dev_components)
    modes = {
        "nag": (dict(tpg_scale=0.0, nag_scale=5.0, **nag_negative()), 1),
        "true cfg + nag": (dict(tpg_scale=0.0, true_cfg_scale=3.0, nag_scale=5.0, **negative(), **nag_negative()), 2),
        "tpg": (dict(tpg_scale=3.0), 2),
        "true cfg + tpg + pag + nag": (dict(true_cfg_scale=3.0, tpg_scale=3.0, pag_scale=2.0, nag_scale=5.0, **negative(), **nag_negative()), 4),
    }
    before = processors(pipe.transformer)
    for name, (options, rows_per_call) in modes.items():
        with rows_seen(pipe.transformer) as rows:
            out = latents(pipe, share_prefix=False, **options)
        assert rows == [rows_per_call] * 3, name
        assert torch.isfinite(out).all(), name
        assert processors(pipe.transformer) == before, name
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.transformer.modules()), name


def test_nag_acts_through_its_extra_text_rows(dev_components):
    pipe = FluxTPGPipeline(**dev_components)
    plain = latents(pipe, tpg_scale=0.0)
    with rows_seen(pipe.transformer.context_embedder) as text_rows, rows_seen(pipe.transformer.x_embedder) as image_rows:
        guided = latents(pipe, tpg_scale=0.0, nag_scale=5.0, **nag_negative())
    assert text_rows == [2, 2, 2] and image_rows == [1, 1, 1]  # one negative text row per guided row, no image row
    assert (guided - plain).abs().max() > 1e-3


@pytest.mark.parametrize("nag_end", [0.0, 0.35, 0.5, 1.0])
def test_nag_end_follows_the_official_timestep_rule(components, nag_end):
    """The official NAG Flux pipeline guides the steps whose timestep t >= (1 - nag_end) * 1000 (nag_end 0: the first)."""
    pipe = FluxTPGPipeline(**components)
    with rows_seen(pipe.transformer.context_embedder) as text_rows:
        latents(pipe, tpg_scale=0.0, nag_scale=5.0, nag_end=nag_end, num_inference_steps=4, **nag_negative())
    official = [2 if float(t) >= (1 - nag_end) * 1000 else 1 for t in pipe.scheduler.timesteps]
    assert text_rows == official
    if 0 < nag_end < 1:  # the rule cuts this run: some steps guided, some not
        assert set(official) == {1, 2}


def test_tpg_row_equals_a_hook_free_permuted_reference(dev_components):
    """The TPG row's output equals the transformer run with the chosen blocks' image tokens permuted by plain hooks."""
    pipe = FluxTPGPipeline(**dev_components)
    from dualguide import TPG, GuidedDenoiser
    from dualguide.conditioning import Conditioning

    transformer = pipe.transformer
    prompt_embeds, pooled = embeds(100)
    cond = Conditioning(prompt_embeds, pooled, guidance=torch.full((1,), 3.5))
    denoiser = GuidedDenoiser(transformer, pipe.scheduler, tpg=TPG(scale=3.0, layers="j5-j6,s2"), seed=7, share_prefix=False)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7])
    denoiser(x, sigma, cond)
    permutations = {}
    generator = torch.Generator().manual_seed(7)
    for name in ("transformer_blocks.5", "transformer_blocks.6", "single_transformer_blocks.2"):
        permutations[name] = torch.randperm(64, generator=generator)

    def shuffle(permutation):
        def hook(_module, args, kwargs):
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"][:, permutation]}

        return hook

    handles = [transformer.get_submodule(n).register_forward_pre_hook(shuffle(p), with_kwargs=True) for n, p in permutations.items()]
    try:
        reference = FLUX.call(transformer, x, sigma * 1000, cond, _no_extras())
    finally:
        for handle in handles:
            handle.remove()
    assert (denoiser.last_outputs["tpg"] - reference.float()).abs().max() <= 1e-5
    assert (denoiser.last_outputs["tpg"] - denoiser.last_outputs["cond"]).abs().max() > 1e-3


def _no_extras():
    from dualguide.families import CallExtras

    return CallExtras()


@pytest.mark.parametrize(
    "options, parameter",
    [
        (dict(tpg_scale=3.0, tpg_applied_layers_index="j19"), "tpg_applied_layers_index"),
        (dict(tpg_scale=3.0, tpg_applied_layers_index="d6-d23"), "tpg_applied_layers_index"),
        (dict(pag_scale=3.0, pag_applied_layers_index="s38"), "pag_applied_layers_index"),
        (dict(max_sequence_length=600), "max_sequence_length"),
        (dict(nag_scale=5.0, nag_negative_prompt_embeds=torch.randn(2, 16, TEXT), nag_negative_pooled_prompt_embeds=torch.randn(2, 32)),
         "nag_negative_prompt_embeds"),
        (dict(height=1), "height"),  # under the packed 2 x 2 (34 is resized to 32 with a warning, as FluxPipeline does)
    ],
)
def test_bad_input_fails_before_any_transformer_call(dev_components, options, parameter):
    pipe = FluxTPGPipeline(**dev_components)
    before = processors(pipe.transformer)
    with rows_seen(pipe.transformer) as rows, pytest.raises((ValueError, TypeError), match=parameter):
        latents(pipe, **options)
    assert rows == []
    assert processors(pipe.transformer) == before
