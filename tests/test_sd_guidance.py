"""Guidance on Stable Diffusion 1.x / 2.x UNets: TPG against a hook-free reference, one UNet call per step,
NAG against its formula, SoftPAG / PAG, k-diffusion samplers, per-image seeds, bad layer ids."""

import pytest
import torch

from conftest import unet_snapshot
from test_nag import reference_nag_attention
from dualguide import CFG, NAG, TPG, GuidedDenoiser, StableDiffusionTPGPipeline, StableDiffusionTPGImg2ImgPipeline
from dualguide.conditioning import encode_nag_negative, encode_sd
from dualguide.denoiser import to_denoised
from dualguide.families import SD, family_of
from dualguide.tiny import build_tiny_sd

SIZE = 32
SIGMAS = torch.tensor([6.0, 2.0, 0.5, 0.0])


@pytest.fixture(scope="module", params=[1, 2], ids=["sd1", "sd2"])
def pipe(request):
    pipeline = StableDiffusionTPGPipeline(**build_tiny_sd(version=request.param))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def conds(pipe):
    return encode_sd(pipe, ["a red circle", "a blue square"], ["blurry", "blurry"], with_negative=True)


def noise(seed: int = 3, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


class UNetRows:
    """The batch size of every UNet call."""

    def __init__(self, unet):
        self.rows = []
        self.handle = unet.register_forward_pre_hook(lambda module, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_family_and_layer_ids(pipe):
    assert family_of(pipe.unet) is SD
    assert set(SD.blocks(pipe.unet)) == {f"d{i}" for i in range(6)} | {"m0"} | {f"u{i}" for i in range(9)}
    assert SD.blocks(pipe.unet)["u0"][0] == "up_blocks.1.attentions.0.transformer_blocks.0"


@torch.no_grad()
def test_tpg_row_is_the_cond_row_with_the_blocks_input_tokens_permuted(pipe, conds):
    positive, negative = conds
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0, layers="d2-d5"), seed=7)
    x, sigma = noise() * SIGMAS[0], SIGMAS[:1].expand(2)
    denoiser(x, sigma, cond=positive, uncond=negative)
    # Hook-free reference: the same permutations (seed 7, one draw per block in the order the blocks run)
    # applied by wrapping the blocks' forward on a plain UNet call of the cond rows.
    generator = torch.Generator().manual_seed(7)
    blocks = [module for _, module in SD.resolve(pipe.unet, "d2-d5", "layers")]
    tokens = SD.token_counts(pipe.unet, SIZE // 2, SIZE // 2)
    permutations = {block: torch.randperm(tokens[block], generator=generator) for block in tokens if block in blocks}
    originals = {block: block.forward for block in blocks}
    for block in blocks:
        block.forward = lambda hidden_states, *args, _block=block, **kwargs: originals[_block](hidden_states[:, permutations[_block]], *args, **kwargs)
    try:
        c_in = (sigma**2 + 1).rsqrt().view(-1, 1, 1, 1)
        output = pipe.unet(x * c_in, denoiser.sigma_to_t(sigma), encoder_hidden_states=positive.prompt_embeds).sample
    finally:
        for block in blocks:
            del block.forward
    expected = to_denoised(x, sigma, output, denoiser.prediction_type)
    assert torch.allclose(denoiser.last_predictions["tpg"], expected, atol=1e-5)
    assert not torch.allclose(denoiser.last_predictions["tpg"], denoiser.last_predictions["cond"], atol=1e-3)


@torch.no_grad()
def test_cfg_and_tpg_is_one_unet_call_of_three_rows_per_step(pipe):
    with UNetRows(pipe.unet) as calls:
        pipe("a red circle", height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=5.0, output_type="latent")
    assert calls.rows == [3, 3, 3]
    with UNetRows(pipe.unet) as calls:
        pipe("a red circle", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0, pag_scale=3.0,
             do_nag=True, sampler="dpmpp_2m", output_type="latent")  # fmt: skip
    assert calls.rows == [4, 4]  # uncond, cond, TPG, PAG; NAG adds no rows


@torch.no_grad()
def test_controlnet_runs_on_the_uncond_and_cond_rows_only(pipe):
    from dualguide import StableDiffusionControlNetTPGPipeline
    from dualguide.tiny import build_tiny_controlnet

    control = StableDiffusionControlNetTPGPipeline.from_pipe(pipe, controlnet=build_tiny_controlnet(pipe.unet))
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with UNetRows(pipe.unet) as unet_calls, UNetRows(control.controlnet) as control_calls:
        control("a red circle", image=image, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    assert unet_calls.rows == [3, 3] and control_calls.rows == [2, 2]  # the TPG rows reuse the cond rows' residuals


def test_nag_scale_one_is_exactly_nag_off(pipe):
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    off = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    one = pipe("a red circle", generator=torch.Generator().manual_seed(0), do_nag=True, nag_scale=1.0, **kwargs).images
    assert torch.equal(off, one)


@torch.no_grad()
def test_nag_extrapolates_the_cross_attention_outputs_by_the_formula(pipe, conds):
    positive, negative = conds
    nag_negative = encode_sd(pipe, ["green"] * 2, with_negative=False)[0].prompt_embeds
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    seen = {}
    handle = attn.register_forward_hook(
        lambda module, args, kwargs, output: seen.update(hidden=args[0], context=kwargs["encoder_hidden_states"], output=output),
        with_kwargs=True,
    )
    try:
        denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), nag=NAG(3.0, tau=2.5, alpha=0.5))
        denoiser(noise() * SIGMAS[1], SIGMAS[1:2].expand(2), cond=positive, uncond=negative, nag_negative=nag_negative)
    finally:
        handle.remove()
    expected = reference_nag_attention(attn, seen["hidden"], seen["context"], nag_negative, slice(2, 4), 3.0, 2.5, 0.5, 1)
    assert torch.allclose(seen["output"], expected, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "heun", "dpmpp_sde"])
def test_every_term_with_k_diffusion_samplers_and_per_image_seeds(pipe, sampler):
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0, pag_scale=2.0, do_nag=True,
                  sampler=sampler, sigma_schedule="karras", tpg_interval=(0.0, 0.5), output_type="latent")  # fmt: skip
    both = pipe(["a red circle", "a blue square"], generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kwargs).images
    second = pipe("a blue square", generator=torch.Generator().manual_seed(2), **kwargs).images
    assert torch.isfinite(both).all()
    # A random tiny UNet's latents grow large (to ~55) and amplify float rounding: a batch of two runs other kernel
    # blockings than one image (and, with shared prefix rows, other row counts), ~5e-4 apart after Heun's 3 evaluations.
    assert torch.allclose(both[1:], second, rtol=1e-4, atol=2e-3)


def test_from_pipe_between_tasks_and_to_diffusers(pipe):
    from diffusers import StableDiffusionPipeline

    img2img = StableDiffusionTPGImg2ImgPipeline.from_pipe(pipe)
    assert img2img.unet is pipe.unet and img2img.family is SD
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    out = img2img("a red circle", image=image, strength=0.5, num_inference_steps=4, output_type="latent")
    assert out.images.shape == (1, 4, SIZE // 2, SIZE // 2)
    assert out.nsfw_content_detected is None
    assert type(StableDiffusionPipeline.from_pipe(pipe)) is StableDiffusionPipeline


@pytest.mark.parametrize("name, spec", [("tpg_applied_layers_index", "d6"), ("pag_applied_layers_index", "m1")])
def test_a_wrong_layer_id_names_the_parameter_and_the_valid_range_before_any_unet_call(pipe, name, spec):
    before = unet_snapshot(pipe.unet)
    scales = {"tpg_scale": 3.0, "pag_scale": 3.0}
    with UNetRows(pipe.unet) as calls, pytest.raises(ValueError) as error:
        pipe("a red circle", height=SIZE, width=SIZE, num_inference_steps=2, **scales, **{name: spec})
    message = str(error.value)
    assert name in message and spec in message and "d0-d5, m0, u0-u8" in message
    assert calls.rows == []
    assert unet_snapshot(pipe.unet) == before
    with pytest.raises(ValueError, match="d0-d5, m0, u0-u8"):
        GuidedDenoiser(pipe.unet, pipe.scheduler, tpg=TPG(3.0, layers="d6"))


LONG = "a red circle on a blue square " * 4  # more than one 77-token window


@torch.no_grad()
def test_long_prompts_are_windowed_unless_truncated(pipe):
    windowed, negative = encode_sd(pipe, LONG, with_negative=True)
    cut, _ = encode_sd(pipe, LONG, with_negative=True, truncate_long_prompts=True)
    tokens = windowed.prompt_embeds.shape[1]
    assert tokens > 77 and tokens % 77 == 0 and negative.prompt_embeds.shape == windowed.prompt_embeds.shape
    assert cut.prompt_embeds.shape[1] == 77
    assert torch.equal(windowed.prompt_embeds[:, :77], cut.prompt_embeds)  # the first window is diffusers' encoding
    skipped = encode_sd(pipe, LONG, with_negative=False, clip_skip=1)[0].prompt_embeds
    ids = pipe.tokenizer(LONG, padding="max_length", truncation=True, return_tensors="pt").input_ids
    penultimate = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm  # transformers 4 / 5
    assert torch.allclose(skipped[:, :77], norm(penultimate), atol=1e-6)
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0, tpg_scale=2.0, output_type="latent")
    both = pipe([LONG, "a red circle"], generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kwargs).images
    alone = pipe("a red circle", generator=torch.Generator().manual_seed(2), **kwargs).images
    assert torch.allclose(both[1:], alone, rtol=1e-4, atol=1e-4)  # the short prompt's padding windows are masked
    nag_negative = encode_nag_negative(pipe, 1, 1, LONG)
    assert nag_negative.shape[1] == tokens  # NAG's negative is windowed on its own


def test_terms_without_layers_take_the_family_defaults_in_a_raw_denoiser(pipe):
    from dualguide import PAG

    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(3.0))
    blocks = SD.blocks(pipe.unet)
    assert set(denoiser._tpg_blocks) == {SD.tpg_module(blocks[i][1]) for i in ("d4", "d5")}
    assert denoiser._pag_attns == set(SD.pag_attentions(blocks["m0"][1]))
