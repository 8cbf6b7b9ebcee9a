"""The Modular Diffusers guiders on a tiny SDXL built in code: parity with the project's pipeline, diffusers' CFG guider,
the UNet left as it was, and bad input refused before any backbone call."""

import json

import pytest
import torch
from conftest import SIZE, modular_pipeline, unet_snapshot
from counting import rows_seen
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

from dualguide.callstate import current_call
from dualguide.guiders import NormalizedAttentionGuidance, TokenPerturbationGuidance
from dualguide.hooks import installed_count
from dualguide.pipelines.guided import seeds_from

PROMPT = "a red circle"
STEPS = 3


@pytest.fixture(scope="module")
def modular(components):
    """diffusers' modular SDXL with the tiny components (no hub: the blocks' components are all given)."""
    return modular_pipeline(StableDiffusionXLAutoBlocks(), components)


def generator(seed):
    """A seeded generator, or one per image for a list of seeds."""
    if isinstance(seed, list):
        return [torch.Generator().manual_seed(s) for s in seed]
    return torch.Generator().manual_seed(seed)


def run_modular(pipeline, guider, seed=0, **kwargs):
    pipeline.update_components(guider=guider)
    images = len(seed) if isinstance(seed, list) else 1
    settings = dict(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, num_images_per_prompt=images)
    return pipeline(**settings, **kwargs, generator=generator(seed), output="latents")


def run_pipeline(pipe, seed=0, **kwargs):
    images = len(seed) if isinstance(seed, list) else 1
    settings = dict(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, num_images_per_prompt=images, output_type="latent")
    return pipe(generator=generator(seed), **settings, **kwargs).images


def pipeline_seed(seed, unet):
    """The permutation seed(s) ``StableDiffusionXLTPGPipeline`` takes from ``generator(seed)``: ``seeds_from`` of each
    generator after the initial noise (diffusers draws it first, [1, 4, h, w] per generator here)."""
    if isinstance(seed, list):
        return [pipeline_seed(s, unet) for s in seed]
    drawn = generator(seed)
    torch.randn((1, unet.config.in_channels, SIZE // 2, SIZE // 2), generator=drawn)
    return seeds_from(drawn)


@pytest.mark.parametrize(
    "guidance_scale, rescale, seed",
    [(5.0, 0.7, 0), (1.0, 0.0, 0), (5.0, 0.0, [0, 1])],
    ids=["cfg-rescale", "tpg-alone", "per-image-seeds"],
)
def test_tpg_guider_equals_pipeline(modular, pipe, unet, guidance_scale, rescale, seed):
    guider = TokenPerturbationGuidance(guidance_scale=guidance_scale, tpg_scale=3.0, guidance_rescale=rescale, seed=pipeline_seed(seed, unet))
    images = len(seed) if isinstance(seed, list) else 1
    before = unet_snapshot(unet)
    with rows_seen(unet) as rows:
        latents = run_modular(modular, guider, seed)
    assert rows == [images] * (3 if guidance_scale > 1 else 2) * STEPS  # diffusers' loop: one call per branch
    assert unet_snapshot(unet) == before and current_call() is None
    assert not any(installed_count(m) for m in unet.modules())
    settings = dict(guidance_scale=guidance_scale, guidance_rescale=rescale)
    assert (latents - run_pipeline(pipe, seed, tpg_scale=3.0, **settings)).abs().max() <= 1e-4
    assert (latents - run_pipeline(pipe, seed, tpg_scale=0.0, **settings)).abs().max() > 0.1  # the TPG branch moved it


def test_tpg_seed(modular):
    """Another seed draws other permutations; the same seed gives the same run again (the streams restart)."""
    guider = TokenPerturbationGuidance(guidance_scale=1.0, seed=5)
    latents = run_modular(modular, guider)
    assert (run_modular(modular, guider.new(seed=6)) - latents).abs().max() > 1e-3
    assert torch.equal(run_modular(modular, guider), latents)


def test_tpg_scale_zero_is_cfg(modular):
    expected = run_modular(modular, ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.5))
    guider = TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=0.0, guidance_rescale=0.5, tpg_layers="d99")
    assert guider.num_conditions == 2
    assert (run_modular(modular, guider) - expected).abs().max() <= 1e-6


def test_tpg_window_and_layers(modular, pipe, unet):
    """TPG on some layers for the first two steps of three equals the pipeline's tpg_interval (0, 2/3) there."""
    guider = TokenPerturbationGuidance(guidance_scale=4.0, tpg_scale=2.0, tpg_layers="d2-d5,m1", tpg_stop=0.7, seed=pipeline_seed(3, unet))
    with rows_seen(unet) as rows:
        latents = run_modular(modular, guider, seed=3)
    assert rows == [1] * (3 + 3 + 2)
    expected = run_pipeline(pipe, seed=3, guidance_scale=4.0, tpg_scale=2.0, tpg_applied_layers_index="d2-d5,m1", tpg_interval=(0.0, 0.7))
    assert (latents - expected).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "options, parameter",
    [
        (dict(tpg_layers="d2-x"), "tpg_layers"),
        (dict(tpg_layers=[]), "tpg_layers"),
        (dict(tpg_scale=-1.0), "tpg_scale"),
        (dict(tpg_scale=float("nan")), "tpg_scale"),
        (dict(tpg_start=0.6, tpg_stop=0.5), "tpg_start"),
        (dict(start=0.6, stop=0.5), "start"),
        (dict(guidance_rescale=1.5), "guidance_rescale"),
    ],
)
def test_bad_settings_refused_on_construction(options, parameter):
    with pytest.raises(ValueError, match=parameter):
        TokenPerturbationGuidance(**options)


@pytest.mark.parametrize("seed", [True, "0", [], [1, "2"]])
def test_bad_seed_refused(seed):
    with pytest.raises(TypeError, match="seed"):
        TokenPerturbationGuidance(seed=seed)


@pytest.mark.parametrize(
    "options, parameter",
    [(dict(tpg_layers="d2-d30"), "tpg_layers"), (dict(seed=[1, 2]), "seed")],
)
def test_bad_input_refused_before_any_backbone_call(modular, unet, options, parameter):
    before = unet_snapshot(unet)
    with rows_seen(unet) as rows, pytest.raises(ValueError, match=parameter):
        run_modular(modular, TokenPerturbationGuidance(**options))
    assert rows == [] and unet_snapshot(unet) == before


def test_raising_branch_call_leaves_no_state(unet):
    """A TPG branch whose backbone call raises resets its call state and hooks; ``cleanup_models`` removes the rest."""
    guider = TokenPerturbationGuidance(guidance_scale=1.0, tpg_layers="d6-d9")
    before = unet_snapshot(unet)
    guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    cond = torch.zeros(1, 77, 64)
    branches = guider.prepare_inputs({"prompt_embeds": (cond, None)})
    assert [getattr(b, "__guidance_identifier__") for b in branches] == ["pred_cond", "pred_cond_tpg"]
    guider.prepare_models(unet)
    guider.cleanup_models(unet)
    guider.prepare_models(unet)  # the TPG branch
    assert installed_count(unet.down_blocks[2].attentions[0].transformer_blocks[2]) == 1  # d6
    with pytest.raises(Exception):
        unet(torch.zeros(1, 4, 16, 16), 999, encoder_hidden_states=cond)  # no added_cond_kwargs: raises inside
    assert current_call() is None
    assert not any(installed_count(m) for m in unet.modules())
    guider.cleanup_models(unet)
    assert unet_snapshot(unet) == before


def test_interrupted_branch_call_state_ends_at_the_next_call(unet):
    """A KeyboardInterrupt inside the TPG branch's call skips torch's always_call hook; the next call of the UNet in
    this thread runs plain (equal to a call without the guider), and leaves no state and no hook behind."""
    guider = TokenPerturbationGuidance(guidance_scale=1.0, tpg_layers="d6-d9")
    before = unet_snapshot(unet)
    inputs = dict(encoder_hidden_states=torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(3)),
                  added_cond_kwargs={"text_embeds": torch.zeros(1, unet.config.projection_class_embeddings_input_dim - 48),
                                     "time_ids": torch.zeros(1, 6)})  # fmt: skip
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = unet(sample, 999, **inputs).sample
    guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    guider.prepare_inputs({"prompt_embeds": (inputs["encoder_hidden_states"], None)})
    guider.prepare_models(unet)
    guider.cleanup_models(unet)
    guider.prepare_models(unet)  # the TPG branch

    def interrupt(*_):
        raise KeyboardInterrupt

    handle = unet.up_blocks[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        unet(sample, 999, **inputs)
    handle.remove()
    assert current_call() is not None  # what torch leaves: the state outlives the interrupted call
    with torch.no_grad():
        after = unet(sample, 999, **inputs).sample
    assert torch.equal(after, plain)
    assert current_call() is None and not any(installed_count(m) for m in unet.modules())
    assert unet_snapshot(unet) == before and not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())


@pytest.fixture(scope="module")
def negative():
    """A NAG negative's prompt embeds, one row, the tiny text encoders' width."""
    return torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_nag_guider_equals_pipeline(modular, pipe, unet, negative, guidance_scale):
    guider = NormalizedAttentionGuidance(guidance_scale=guidance_scale, guidance_rescale=0.7, nag_negative_prompt_embeds=negative)
    before = unet_snapshot(unet)
    with rows_seen(unet) as rows:
        latents = run_modular(modular, guider)
    assert rows == [1] * (2 if guidance_scale > 1 else 1) * STEPS  # NAG adds no branch
    assert unet_snapshot(unet) == before and current_call() is None
    assert not any(installed_count(m) for m in unet.modules())
    settings = dict(guidance_scale=guidance_scale, guidance_rescale=0.7, tpg_scale=0.0)
    expected = run_pipeline(pipe, do_nag=True, nag_negative_prompt_embeds=negative, **settings)
    assert (latents - expected).abs().max() <= 1e-4
    assert (latents - run_pipeline(pipe, **settings)).abs().max() > 0.1  # NAG moved it


def test_nag_window_equals_pipeline_nag_end(modular, pipe, negative):
    guider = NormalizedAttentionGuidance(guidance_scale=3.0, nag_scale=4.0, nag_tau=2.0, nag_alpha=0.25, nag_stop=0.5,
                                         nag_negative_prompt_embeds=negative)  # fmt: skip
    latents = run_modular(modular, guider, seed=2)
    expected = run_pipeline(pipe, seed=2, guidance_scale=3.0, tpg_scale=0.0, do_nag=True, nag_scale=4.0, nag_tau=2.0, nag_alpha=0.25,
                            nag_end=0.5, nag_negative_prompt_embeds=negative)  # fmt: skip
    assert (latents - expected).abs().max() <= 1e-4
    assert (latents - run_modular(modular, guider.new(nag_stop=1.0), seed=2)).abs().max() > 1e-3  # the window matters


@pytest.mark.parametrize(
    "options, parameter",
    [
        (dict(nag_scale=float("inf")), "nag_scale"),
        (dict(nag_tau=0.0), "nag_tau"),
        (dict(nag_alpha=1.5), "nag_alpha"),
        (dict(nag_start=0.8, nag_stop=0.2), "nag_start"),
        (dict(nag_negative_prompt_embeds=torch.zeros(77, 64)), "nag_negative_prompt_embeds"),
    ],
)
def test_bad_nag_settings_refused_on_construction(options, parameter):
    with pytest.raises(ValueError, match=parameter):
        NormalizedAttentionGuidance(**options)


@pytest.mark.parametrize("embeds", [None, torch.zeros(2, 77, 64), torch.zeros(1, 77, 32)])
def test_bad_nag_negative_refused_before_any_backbone_call(modular, unet, embeds):
    before = unet_snapshot(unet)
    with rows_seen(unet) as rows, pytest.raises(ValueError, match="nag_negative_prompt_embeds"):
        run_modular(modular, NormalizedAttentionGuidance(nag_negative_prompt_embeds=embeds))
    assert rows == [] and unet_snapshot(unet) == before


def test_nag_refuses_a_family_with_negative_rows(negative):
    from diffusers import SD3Transformer2DModel

    from dualguide.tiny import tiny_sd3_transformer_config

    transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config())
    guider = NormalizedAttentionGuidance(guidance_scale=1.0, nag_negative_prompt_embeds=negative)
    guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    guider.prepare_inputs({"prompt_embeds": (torch.zeros(1, 77, 64), None)})
    with pytest.raises(ValueError, match="Stable Diffusion 3"):
        guider.prepare_models(transformer)
    assert not any(installed_count(m) for m in transformer.modules())


TPG_SETTINGS = dict(guidance_scale=4.5, tpg_scale=2.5, tpg_layers="d2-d5", tpg_start=0.1, tpg_stop=0.9, guidance_rescale=0.3, seed=[7, 8],
                    start=0.2, stop=0.8, enabled=False)  # fmt: skip
NAG_SETTINGS = dict(guidance_scale=4.5, nag_scale=2.5, nag_tau=1.5, nag_alpha=0.75, nag_use_l1=False, nag_start=0.1, nag_stop=0.9,
                    guidance_rescale=0.3, start=0.2, stop=0.8, enabled=False)  # fmt: skip


@pytest.mark.parametrize("kind, settings", [(TokenPerturbationGuidance, TPG_SETTINGS), (NormalizedAttentionGuidance, NAG_SETTINGS)])
def test_config_round_trip(modular, tmp_path, negative, kind, settings):
    runtime = {"nag_negative_prompt_embeds": negative} if kind is NormalizedAttentionGuidance else {}
    guider = kind(**settings, **runtime)
    guider.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "guider_config.json").read_text())
    assert {name: saved[name] for name in settings} == settings and "nag_negative_prompt_embeds" not in saved
    loaded = kind.from_pretrained(tmp_path, **runtime)
    assert type(loaded) is kind and {name: loaded.config[name] for name in settings} == settings
    assert loaded.new().config == guider.config
    if runtime:
        assert loaded.nag_negative_prompt_embeds is negative and loaded.new().nag_negative_prompt_embeds is negative
        assert kind.from_pretrained(tmp_path).nag_negative_prompt_embeds is None
    modular.update_components(guider=loaded)
    assert modular.guider is loaded


def test_other_threads_calls_pass_through(unet):
    """While a TPG branch is open, a call of the same UNet from another thread is a plain call; the branch's is not."""
    import threading

    inputs = dict(encoder_hidden_states=torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1)),
                  added_cond_kwargs={"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])})  # fmt: skip
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = unet(sample, 999, **inputs).sample
        guider = TokenPerturbationGuidance(guidance_scale=1.0)
        guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
        guider.prepare_inputs({"prompt_embeds": (inputs["encoder_hidden_states"], None)})
        guider.prepare_models(unet)
        guider.cleanup_models(unet)
        guider.prepare_models(unet)  # the TPG branch
        other = []
        thread = threading.Thread(target=lambda: other.append(unet(sample, 999, **inputs).sample))
        thread.start()
        thread.join()
        perturbed = unet(sample, 999, **inputs).sample
        guider.cleanup_models(unet)
    assert torch.equal(other[0], plain)
    assert (perturbed - plain).abs().max() > 1e-3
    assert not any(installed_count(m) for m in unet.modules()) and current_call() is None


def test_tpg_guider_on_sd3_equals_pipeline():
    """SD3 through its family adapter: diffusers' modular SD3 core denoise step, entered with the project pipeline's
    prompt embeds, equals StableDiffusion3TPGPipeline with CFG + TPG (its default j2-j8)."""
    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks

    from dualguide import StableDiffusion3TPGPipeline
    from dualguide.tiny import build_tiny_sd3

    parts = build_tiny_sd3("sd3")
    transformer = parts["transformer"]
    pipe = StableDiffusion3TPGPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    embeds = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True, max_sequence_length=16)
    embeds = dict(zip(["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"], embeds))
    denoise = StableDiffusion3AutoBlocks().sub_blocks["denoise"].init_pipeline()
    denoise.update_components(transformer=transformer, scheduler=parts["scheduler"])
    denoise.set_progress_bar_config(disable=True)
    denoise.update_components(guider=TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=3.0, seed=pipeline_seed(0, transformer)))
    before = unet_snapshot(transformer)
    with rows_seen(transformer) as rows:
        # Without a VAE the step takes diffusers' factor 8: 4 * SIZE pixels are the pipeline's SIZE // 2 latents.
        latents = denoise(**embeds, num_inference_steps=STEPS, height=4 * SIZE, width=4 * SIZE, generator=generator(0),
                          output="latents")  # fmt: skip
    assert rows == [1] * 3 * STEPS and unet_snapshot(transformer) == before
    expected = pipe(**embeds, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator(0),
                    output_type="latent", guidance_scale=5.0, tpg_scale=3.0).images  # fmt: skip
    assert (latents - expected).abs().max() <= 1e-4
    without_tpg = pipe(**embeds, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator(0),
                       output_type="latent", guidance_scale=5.0, tpg_scale=0.0).images  # fmt: skip
    assert (latents - without_tpg).abs().max() > 0.1


def test_block_state_inputs(negative):
    """The loops that hand the guider their block state (Wan, Z-Image, LTX) get the same branches, checked the same way."""
    from diffusers.modular_pipelines.modular_pipeline import BlockState

    cond, uncond = torch.ones(2, 7, 64), torch.zeros(2, 7, 64)
    state = BlockState(prompt_embeds=cond, negative_prompt_embeds=uncond)
    fields = {"encoder_hidden_states": ("prompt_embeds", "negative_prompt_embeds")}
    guider = TokenPerturbationGuidance(guidance_scale=3.0, seed=[1, 2])
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    batches = guider.prepare_inputs_from_block_state(state, fields)
    assert [(getattr(b, "__guidance_identifier__"), b.encoder_hidden_states is cond) for b in batches] == [
        ("pred_cond", True), ("pred_uncond", False), ("pred_cond_tpg", True)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="seed has 1 per-image seeds but the batch has 2"):
        guider.new(seed=[1]).prepare_inputs_from_block_state(state, fields)
    with pytest.raises(ValueError, match="nag_negative_prompt_embeds has batch 1"):
        NormalizedAttentionGuidance(nag_negative_prompt_embeds=negative).prepare_inputs_from_block_state(state, fields)


@pytest.mark.parametrize("kind", [TokenPerturbationGuidance, NormalizedAttentionGuidance])
def test_unknown_family_refused(kind, negative):
    guider = kind(guidance_scale=1.0, **({"nag_negative_prompt_embeds": negative} if kind is NormalizedAttentionGuidance else {}))
    guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    guider.prepare_inputs({"prompt_embeds": (torch.zeros(1, 77, 64), None)})
    with pytest.raises(TypeError, match="no guider layout for a Linear"):
        guider.prepare_models(torch.nn.Linear(2, 2))
