"""``dualguide.guiders.one_forward``: modular SDXL / SD3 with every guider branch in one backbone call per step equals
diffusers' per-branch loop with the same guider (and SD3's NAG equals StableDiffusion3TPGPipeline's), on tiny layouts."""

import pytest
import torch
from conftest import SIZE, modular_pipeline, unet_snapshot
from counting import rows_seen
from diffusers.guiders import ClassifierFreeGuidance, AdaptiveProjectedGuidance
from diffusers.modular_pipelines import StableDiffusion3AutoBlocks, StableDiffusionXLAutoBlocks

from dualguide.callstate import current_call
from dualguide.guiders import DualGuidance, NormalizedAttentionGuidance, TokenPerturbationGuidance, one_forward
from dualguide.hooks import installed_count

PROMPT = "a red circle"
STEPS = 2


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def modular(components):
    return modular_pipeline(StableDiffusionXLAutoBlocks(), components)


@pytest.fixture(scope="module")
def packed(modular):
    return one_forward(modular)


@pytest.fixture(scope="module")
def negative():
    return torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(5))


def run(pipeline, guider, seed=0, **kwargs):
    pipeline.update_components(guider=guider)
    return pipeline(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator(seed), output="latents", **kwargs)


def sdxl_guider(mode, negative):
    if mode == "cfg":
        return ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.5)
    if mode == "cfg+tpg":
        return TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=3.0, guidance_rescale=0.7, tpg_layers="d2-d5,m1", tpg_stop=0.5, seed=4)
    return NormalizedAttentionGuidance(guidance_scale=5.0, nag_scale=4.0, guidance_rescale=0.7, nag_stop=0.5, nag_negative_prompt_embeds=negative)


@pytest.mark.parametrize("mode, branches", [("cfg", [2] * STEPS), ("cfg+tpg", [3, 2]), ("cfg+nag", [2] * STEPS)])
def test_sdxl_one_forward_equals_per_branch_loop(modular, packed, unet, negative, mode, branches):
    guider = sdxl_guider(mode, negative)
    with rows_seen(unet) as per_branch:
        expected = run(modular, guider)
    before = unet_snapshot(unet)
    with rows_seen(unet) as one_call:
        latents = run(packed, guider)
    assert per_branch == [1] * sum(branches)  # diffusers' loop: one UNet call per branch
    assert one_call == branches  # one UNet call per step, a row per branch
    assert (latents - expected).abs().max() <= 1e-4
    assert unet_snapshot(unet) == before and current_call() is None
    assert not any(installed_count(m) for m in unet.modules())
    if mode != "cfg":
        assert (latents - run(packed, ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.7))).abs().max() > 1e-2


def test_one_forward_keeps_pipe_and_components(modular, packed):
    assert packed is not modular and packed.unet is modular.unet and packed.vae is modular.vae
    assert type(modular.blocks.sub_blocks["denoise"].sub_blocks["denoise"].sub_blocks["denoise"].sub_blocks["denoiser"]).__name__ == (
        "StableDiffusionXLLoopDenoiser"
    )  # the given pipeline still runs per branch


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_sdxl_image_tasks_one_forward(modular, packed, unet, task):
    """The image-to-image and (4-channel) inpainting loops keep the packing too, started part-way."""
    image = torch.rand(1, 3, SIZE, SIZE, generator=generator(3))
    inputs = dict(image=image, strength=0.7)
    if task == "inpaint":
        inputs["mask_image"] = (torch.rand(1, 1, SIZE, SIZE, generator=generator(4)) > 0.5).float()
    guider = TokenPerturbationGuidance(guidance_scale=4.0, tpg_scale=2.0, seed=1)
    expected = run(modular, guider, **inputs)
    with rows_seen(unet) as rows:
        latents = run(packed, guider, **inputs)
    assert rows == [3] * len(rows) and 1 <= len(rows) <= STEPS
    assert (latents - expected).abs().max() <= 1e-4


def test_unsupported_guider_and_pipe_refused(packed, unet):
    with rows_seen(unet) as rows, pytest.raises(TypeError, match="AdaptiveProjectedGuidance"):
        run(packed, AdaptiveProjectedGuidance())
    assert rows == []
    with pytest.raises(TypeError, match="ModularPipeline"):
        one_forward(unet)


def test_controlnet_loop_refused_naming_its_block(packed, unet):
    from diffusers.modular_pipelines.stable_diffusion_xl.denoise import StableDiffusionXLControlNetDenoiseStep

    blocks = packed.blocks.sub_blocks["denoise"].sub_blocks["denoise"].sub_blocks["controlnet_denoise"]
    step = blocks.sub_blocks["controlnet_denoise"]
    assert isinstance(step, StableDiffusionXLControlNetDenoiseStep)
    with pytest.raises(ValueError, match="StableDiffusionXLControlNetLoopDenoiser"):
        step.sub_blocks["denoiser"](packed, object(), 0, 999)


@pytest.fixture(scope="module")
def sd3():
    """The tiny SD3, its project pipeline, prompt embeds from it, and diffusers' modular SD3 core denoise step."""
    from dualguide import StableDiffusion3TPGPipeline
    from dualguide.tiny import build_tiny_sd3

    parts = build_tiny_sd3("sd3")
    pipe = StableDiffusion3TPGPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    embeds = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True, max_sequence_length=16)
    embeds = dict(zip(["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"], embeds))
    denoise = StableDiffusion3AutoBlocks().sub_blocks["denoise"].init_pipeline()
    denoise.update_components(transformer=parts["transformer"], scheduler=parts["scheduler"])
    denoise.set_progress_bar_config(disable=True)
    return parts["transformer"], pipe, embeds, denoise


def run_sd3(denoise, guider, embeds):
    denoise.update_components(guider=guider)
    # Without a VAE the step takes diffusers' factor 8: 4 * SIZE pixels are the pipeline's SIZE // 2 latents.
    return denoise(**embeds, num_inference_steps=STEPS, height=4 * SIZE, width=4 * SIZE, generator=generator(0), output="latents")


def test_sd3_one_forward_equals_per_branch_loop(sd3):
    transformer, _, embeds, denoise = sd3
    guider = TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=3.0, guidance_rescale=0.3, seed=2)
    with rows_seen(transformer) as per_branch:
        expected = run_sd3(denoise, guider, embeds)
    before = unet_snapshot(transformer)
    with rows_seen(transformer) as one_call:
        latents = run_sd3(one_forward(denoise), guider, embeds)
    assert per_branch == [1] * 3 * STEPS and one_call == [3] * STEPS
    assert (latents - expected).abs().max() <= 1e-4
    assert unet_snapshot(transformer) == before and not any(installed_count(m) for m in transformer.modules())


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_sd3_nag_one_forward_equals_pipeline(sd3, guidance_scale):
    """NAG on SD3 through the guider: the negative's text rows ride in the one transformer call (two rows per step
    with CFG off: the cond row and its negative partner); equals StableDiffusion3TPGPipeline's NAG."""
    transformer, pipe, embeds, denoise = sd3
    nag_negative = torch.randn(1, *embeds["prompt_embeds"].shape[1:], generator=generator(7))
    settings = dict(nag_scale=4.0, nag_tau=2.0, nag_alpha=0.25)
    guider = NormalizedAttentionGuidance(guidance_scale=guidance_scale, **settings, nag_negative_prompt_embeds=nag_negative)
    packed = one_forward(denoise)
    with rows_seen(transformer) as rows:
        latents = run_sd3(packed, guider, embeds)
    assert rows == [2 if guidance_scale > 1 else 1] * STEPS  # the rows of the call's latents; NAG's are text rows
    expected = pipe(**embeds, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator(0), output_type="latent",
                    guidance_scale=guidance_scale, tpg_scale=0.0, do_nag=True, nag_negative_prompt_embeds=nag_negative, max_sequence_length=16,
                    **settings).images  # fmt: skip
    assert (latents - expected).abs().max() <= 1e-4
    without = run_sd3(packed, ClassifierFreeGuidance(guidance_scale=guidance_scale), embeds)
    assert (latents - without).abs().max() > 1e-2
    with pytest.raises(ValueError, match="one_forward"):  # the per-branch loop refuses SD3's NAG, naming the way
        run_sd3(denoise, guider, embeds)


def test_sdxl_cfg_tpg_nag(modular, packed, pipe, unet, negative, tmp_path):
    """DualGuidance (CFG + TPG + NAG): per branch, NAG inside the cond and the TPG branch's calls; equals
    StableDiffusionXLTPGPipeline's CFG + TPG + NAG, and one_forward equals it in one call per step."""
    from dualguide.pipelines.guided import seeds_from

    drawn = generator(0)
    torch.randn((1, unet.config.in_channels, SIZE // 2, SIZE // 2), generator=drawn)  # the pipeline's initial noise first
    settings = dict(guidance_scale=5.0, tpg_scale=3.0, nag_scale=4.0, guidance_rescale=0.7)
    guider = DualGuidance(**settings, seed=seeds_from(drawn), nag_negative_prompt_embeds=negative)
    with rows_seen(unet) as per_branch:
        expected = run(modular, guider)
    with rows_seen(unet) as one_call:
        latents = run(packed, guider)
    assert per_branch == [1] * 3 * STEPS and one_call == [3] * STEPS
    assert (latents - expected).abs().max() <= 1e-4
    assert not any(installed_count(m) for m in unet.modules()) and current_call() is None
    reference = dict(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent")
    project = pipe(**reference, **settings, do_nag=True, nag_negative_prompt_embeds=negative, generator=generator(0)).images
    assert (expected - project).abs().max() <= 1e-4
    assert (latents - run(packed, TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=3.0, guidance_rescale=0.7, seed=guider.seed))).abs().max() > 1e-2
    guider.save_pretrained(tmp_path)
    loaded = DualGuidance.from_pretrained(tmp_path, nag_negative_prompt_embeds=negative)
    assert {name: loaded.config[name] for name in settings} == settings and "nag_negative_prompt_embeds" not in loaded.config
    assert loaded.nag_negative_prompt_embeds is negative and loaded.nag_guidance.nag_scale == 4.0 and loaded.new().config == loaded.config


def test_dual_guidance_bad_negative_refused_before_any_backbone_call(packed, modular, unet):
    for pipeline in (modular, packed):
        with rows_seen(unet) as rows, pytest.raises(ValueError, match="nag_negative_prompt_embeds"):
            run(pipeline, DualGuidance(nag_negative_prompt_embeds=torch.zeros(2, 77, 64)))
        assert rows == []


def test_sd3_cfg_tpg_nag_one_forward_equals_pipeline(sd3):
    """DualGuidance on SD3 through one_forward (the per-branch loop refuses SD3's NAG): equals
    StableDiffusion3TPGPipeline with CFG + TPG + NAG, one transformer call per step."""
    from dualguide.pipelines.guided import seeds_from

    transformer, pipe, embeds, denoise = sd3
    drawn = generator(0)
    torch.randn((1, transformer.config.in_channels, SIZE // 2, SIZE // 2), generator=drawn)  # the pipeline's initial noise first
    nag_negative = torch.randn(1, *embeds["prompt_embeds"].shape[1:], generator=generator(7))
    settings = dict(guidance_scale=5.0, tpg_scale=3.0, nag_scale=4.0, nag_tau=2.0, nag_alpha=0.25)
    guider = DualGuidance(**settings, seed=seeds_from(drawn), nag_negative_prompt_embeds=nag_negative)
    with rows_seen(transformer) as rows:
        latents = run_sd3(one_forward(denoise), guider, embeds)
    assert rows == [3] * STEPS
    expected = pipe(**embeds, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator(0), output_type="latent",
                    do_nag=True, nag_negative_prompt_embeds=nag_negative, max_sequence_length=16, **settings).images  # fmt: skip
    assert (latents - expected).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="one_forward"):
        run_sd3(denoise, guider, embeds)
