"""SD3 / SD3.5 (MMDiT, flow matching): parity with diffusers' SD3 pipelines, TPG against a hook-free reference,
NAG's extra text rows, one transformer call per step, flow-matching samplers, bad input before any call."""

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline, StableDiffusion3PAGImg2ImgPipeline,
    StableDiffusion3PAGPipeline, StableDiffusion3Pipeline,
)  # fmt: skip
from PIL import Image

from counting import rows_seen
from dualguide import CFG, TPG, GuidedDenoiser, StableDiffusion3TPGImg2ImgPipeline, StableDiffusion3TPGPipeline
from dualguide.conditioning import Conditioning
from dualguide.tiny import build_tiny_sd3

SIZE = dict(height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module", params=["sd3", "sd3.5"])
def components(request):
    return build_tiny_sd3(request.param)


@pytest.fixture(scope="module")
def sd3_components():
    return build_tiny_sd3("sd3")


def latents(pipe, seed=0, **kwargs):
    arguments = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=5.0, output_type="latent", **SIZE)
    return pipe(**{**arguments, **kwargs}, generator=torch.Generator().manual_seed(seed)).images


def processors(transformer):
    return {name: processor for name, processor in transformer.attn_processors.items()}


def test_terms_off_equal_diffusers(components):
    ours = latents(StableDiffusion3TPGPipeline(**components), tpg_scale=0.0)
    assert (ours - latents(StableDiffusion3Pipeline(**components))).abs().max() <= 1e-4


def test_skip_layer_guidance_equals_diffusers(components):
    slg = dict(skip_guidance_layers=[1, 2], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    ours = latents(StableDiffusion3TPGPipeline(**components), tpg_scale=0.0, **slg)
    theirs = latents(StableDiffusion3Pipeline(**components), **slg)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - latents(StableDiffusion3Pipeline(**components))).abs().max() > 1e-3  # SLG acted


def test_pag_equals_diffusers_sd3_pag(sd3_components):
    # diffusers' joint PAG processors leave out the query / key norms, so SD3.5 layouts (qk_norm) differ by design.
    theirs = latents(StableDiffusion3PAGPipeline(**sd3_components, pag_applied_layers=["blocks.1"]), pag_scale=3.0)
    ours = latents(StableDiffusion3TPGPipeline(**sd3_components), tpg_scale=0.0, pag_scale=3.0, pag_applied_layers_index="j1")
    assert (ours - theirs).abs().max() <= 1e-4


def test_kdiffusion_euler_equals_flow_match_euler(components):
    pipe = StableDiffusion3TPGPipeline(**components)
    scheduler_run = latents(pipe, do_nag=True, nag_scale=4.0)
    assert (latents(pipe, sampler="euler", do_nag=True, nag_scale=4.0) - scheduler_run).abs().max() <= 1e-5


def dynamic_shifting(components):
    """The components with a scheduler that shifts by the image's token count (``mu``, as Flux-style configs do)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config, use_dynamic_shifting=True)
    return {**components, "scheduler": scheduler}


def test_kdiffusion_euler_passes_mu_to_a_dynamically_shifted_scheduler(sd3_components):
    pipe = StableDiffusion3TPGPipeline(**dynamic_shifting(sd3_components))
    scheduler_run = latents(pipe)
    assert (latents(pipe, sampler="euler") - scheduler_run).abs().max() <= 1e-5
    assert (latents(pipe, sampler="euler", mu=2.0) - latents(pipe, mu=2.0)).abs().max() <= 1e-5
    assert (latents(pipe, mu=2.0) - scheduler_run).abs().max() > 1e-3  # mu moved the schedule
    img2img = StableDiffusion3TPGImg2ImgPipeline(**dynamic_shifting(sd3_components))
    assert (image_latents(img2img, sampler="euler") - image_latents(img2img)).abs().max() <= 1e-5


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "euler_ancestral", "dpmpp_sde"])
def test_other_samplers_run_on_flow_models(sd3_components, sampler):
    pipe = StableDiffusion3TPGPipeline(**sd3_components)
    out = latents(pipe, sampler=sampler)
    assert torch.isfinite(out).all() and not torch.equal(out, latents(pipe, sampler="euler"))


def test_nag_with_the_prompt_as_its_negative_changes_nothing(components):
    # The extra text rows then equal the positive rows, Z- = Z+: any row or temb mix-up would show.
    pipe = StableDiffusion3TPGPipeline(**components)
    off = latents(pipe)
    assert (latents(pipe, do_nag=True, nag_scale=5.0, nag_negative_prompt="a red circle") - off).abs().max() <= 1e-5
    assert (latents(pipe, do_nag=True, nag_scale=5.0, nag_negative_prompt="blue") - off).abs().max() > 1e-3


def test_one_transformer_call_per_step_and_processors_restored(components):
    pipe = StableDiffusion3TPGPipeline(**components)
    before = processors(pipe.transformer)
    with rows_seen(pipe.transformer) as rows:
        out = latents(pipe, pag_scale=2.0, do_nag=True, nag_scale=3.0)
    assert len(rows) == 3 and torch.isfinite(out).all()
    assert processors(pipe.transformer) == before
    assert pipe._last_denoiser.last_branches == ("uncond", "cond", "tpg", "pag")


def _reference_forward(transformer, x, t, cond: Conditioning, permute):
    """SD3Transformer2DModel's forward written out, the image tokens entering block ``i`` replaced by
    ``permute(i, tokens)``: no hooks, no processors of ours."""
    height, width = x.shape[-2:]
    hidden = transformer.pos_embed(x)
    temb = transformer.time_text_embed(t, cond.pooled_embeds)
    text = transformer.context_embedder(cond.prompt_embeds)
    for index, block in enumerate(transformer.transformer_blocks):
        text, hidden = block(hidden_states=permute(index, hidden), encoder_hidden_states=text, temb=temb)
    hidden = transformer.proj_out(transformer.norm_out(hidden, temb))
    patch, channels = transformer.config.patch_size, transformer.out_channels
    hidden = hidden.reshape(x.shape[0], height // patch, width // patch, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(x.shape[0], channels, height, width)


def test_tpg_row_equals_hook_free_reference(components):
    transformer, scheduler = components["transformer"], components["scheduler"]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 16, 16, generator=generator)
    cond = Conditioning(torch.randn(2, 7, 96, generator=generator), torch.randn(2, 64, generator=generator))
    sigma = torch.tensor(0.6)
    denoiser = GuidedDenoiser(transformer, scheduler, cfg=CFG(scale=1.0), tpg=TPG(scale=3.0, layers="j2-j4,j7"), seed=11)
    with torch.no_grad():
        denoiser.predict(x, sigma * 1000, cond, sigma=sigma)
    draws = torch.Generator().manual_seed(11)
    permutations = {index: torch.randperm(64, generator=draws) for index in (2, 3, 4, 7)}  # 8x8 patches, block order

    def permute(index, hidden):
        return hidden[:, permutations[index]] if index in permutations else hidden

    with torch.no_grad():
        expected = _reference_forward(transformer, x, (sigma * 1000).expand(2), cond, permute)
        plain = _reference_forward(transformer, x, (sigma * 1000).expand(2), cond, lambda index, hidden: hidden)
    assert (denoiser.last_outputs["tpg"] - expected).abs().max() <= 1e-4
    assert (denoiser.last_outputs["cond"] - plain).abs().max() <= 1e-4
    assert (expected - plain).abs().max() > 1e-3


@pytest.mark.parametrize("arguments, parameter", [
    ({"tpg_applied_layers_index": "j10"}, "tpg_applied_layers_index"),
    ({"pag_scale": 2.0, "pag_applied_layers_index": "d3"}, "pag_applied_layers_index"),
    ({"do_nag": True, "nag_negative_prompt": ["a", "b"]}, "nag_negative_prompt"),
    ({"max_sequence_length": 513}, "max_sequence_length"),
])  # fmt: skip
def test_bad_input_fails_before_any_transformer_call(sd3_components, arguments, parameter):
    pipe = StableDiffusion3TPGPipeline(**sd3_components)
    before = processors(pipe.transformer)
    with rows_seen(pipe.transformer) as rows:
        with pytest.raises((ValueError, TypeError), match=parameter):
            latents(pipe, **arguments)
    assert len(rows) == 0 and processors(pipe.transformer) == before


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "model"
    StableDiffusion3Pipeline(**build_tiny_sd3("sd3.5")).save_pretrained(folder)
    return str(folder)


def test_the_command_runs_an_sd3_folder_and_refuses_its_missing_tasks(sd3_folder, tmp_path, capsys):
    from dualguide import cli

    common = ["--model", sd3_folder, "--steps", "2", "--size", "32"]
    assert cli.main(["generate", "a red circle", *common, "--nag", "3", "--out", str(tmp_path / "one")]) == 0
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    assert cli.main(["generate", "a red circle", *common, "--image", str(image), "--out", str(tmp_path / "img2img")]) == 0
    assert len(list((tmp_path / "one").glob("*.png"))) == 1 and len(list((tmp_path / "img2img").glob("*.png"))) == 1
    capsys.readouterr()
    arguments = ["--image", str(image), "--mask", str(image), "--out", str(tmp_path / "two")]
    assert cli.main(["generate", "a red circle", *common, *arguments]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inpaint" in err and "Stable Diffusion 3" in err


IMAGE = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))


def image_latents(pipe, **kwargs):
    return latents(pipe, image=IMAGE, strength=0.7, num_inference_steps=4, **kwargs)


def test_img2img_terms_off_equal_diffusers(components):
    ours = image_latents(StableDiffusion3TPGImg2ImgPipeline(**components), tpg_scale=0.0)
    assert (ours - image_latents(StableDiffusion3Img2ImgPipeline(**components))).abs().max() <= 1e-4


def test_img2img_pag_equals_diffusers(sd3_components):
    theirs = image_latents(StableDiffusion3PAGImg2ImgPipeline(**sd3_components, pag_applied_layers=["blocks.1"]), pag_scale=3.0)
    ours = image_latents(StableDiffusion3TPGImg2ImgPipeline(**sd3_components), tpg_scale=0.0, pag_scale=3.0, pag_applied_layers_index="j1")
    assert (ours - theirs).abs().max() <= 1e-4


def test_img2img_kdiffusion_euler_equals_the_scheduler_loop(components):
    pipe = StableDiffusion3TPGImg2ImgPipeline(**components)
    guided = dict(do_nag=True, nag_scale=3.0)
    assert (image_latents(pipe, sampler="euler", **guided) - image_latents(pipe, **guided)).abs().max() <= 1e-5


def test_eval_runs_on_an_sd3_folder(sd3_folder, clip_folder, tmp_path):
    from dualguide import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "run"
    argv = ["eval", str(prompts), "--model", sd3_folder, "--clip", str(clip_folder), "--modes", "off: cfg=1; nag: cfg=1,nag=3",
            "--baseline", "off", "--out", str(out), "--steps", "2", "--size", "32", "--seeds", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    assert (out / "results.json").is_file()
