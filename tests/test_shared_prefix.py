"""Shared prefix rows (issue 22): the TPG / PAG rows run as the cond row until their term's first perturbed block.
The output equals the unshared path (``share_prefix=False``) within 1e-5 in float32 for every mode (each branch's
backbone output; a pipeline's latents, of size ~15, relative to their size), the prefix modules see the cond row
once, and without sharing nothing is hooked and every module sees every row.

The differences are float32 rounding: kernels sum in a different order for a different number of rows (two CPU
threads split a batch of 2 rows otherwise than one of 4), about 1e-6 per backbone output."""

import pytest
import torch

from conftest import SIZE, generate, unet_snapshot
from dualguide import (
    CFG, NAG, PAG, TPG, GuidedDenoiser, StableDiffusionTPGPipeline, StableDiffusionXLControlNetTPGPipeline, StableDiffusionXLTPGPipeline,
    build_tiny_sdxl,
)  # fmt: skip
from dualguide.callstate import current_call
from dualguide.conditioning import encode_sd, encode_sdxl
from dualguide.hooks import installed_count
from dualguide.tiny import build_tiny_controlnet, build_tiny_sd
from test_ip_adapter import image_embeds, tiny_ip_adapter_state_dict
from test_task_pipelines import picture

TOLERANCE = 1e-5
MODES = {
    "cfg+tpg": dict(cfg=CFG(5.0), tpg=TPG(3.0)),
    "cfg+pag": dict(cfg=CFG(5.0), pag=PAG(3.0)),
    "cfg+tpg+pag": dict(cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(3.0)),
    "cfg+tpg+nag": dict(cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0)),
    "cfg+tpg+pag+nag": dict(cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(3.0), nag=NAG(3.0)),
    "tpg alone": dict(tpg=TPG(3.0)),
    "softpag before tpg": dict(cfg=CFG(5.0), tpg=TPG(3.0, layers="d6"), pag=PAG(3.0, layers="d5", beta=0.5)),
    "tpg before pag": dict(cfg=CFG(5.0), tpg=TPG(3.0, layers="d0"), pag=PAG(3.0)),
}
# PAG modes run PAG's own layers; SD's PAG and TPG layers are its family's defaults.
SD_MODES = {name: MODES[name] for name in ("cfg+tpg", "cfg+pag", "cfg+tpg+pag+nag", "tpg alone")}


def denoise(unet, scheduler, x, conds, share_prefix, **terms):
    """The guided x0 and each branch's backbone output of one call (per-image TPG seeds)."""
    positive, negative = conds
    denoiser = GuidedDenoiser(unet, scheduler, seed=list(range(1, x.shape[0] + 1)), share_prefix=share_prefix, **terms)
    guided = denoiser(x, torch.full((x.shape[0],), 5.0), cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)
    return guided, denoiser.last_outputs


def largest_difference(unet, scheduler, x, conds, **terms) -> float:
    """Largest difference, shared against unshared, of every branch's backbone output (the guided x0 combines them
    with the same arithmetic: at sigma 5 and CFG 5 it scales their differences by up to ~100)."""
    with torch.no_grad():
        _, shared = denoise(unet, scheduler, x, conds, True, **terms)
        _, whole = denoise(unet, scheduler, x, conds, False, **terms)
    assert shared.keys() == whole.keys()
    return max(float((shared[k] - whole[k]).abs().max()) for k in whole)


def noise(batch: int) -> torch.Tensor:
    return torch.randn(batch, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def sdxl_conds(pipe):
    return encode_sdxl(pipe, ["a red circle", "a blue square"], ["blurry", "blurry"], size=(SIZE, SIZE), with_negative=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_sdxl_shared_equals_unshared(pipe, sdxl_conds, mode):
    difference = largest_difference(pipe.unet, pipe.scheduler, noise(2), sdxl_conds, **MODES[mode])
    print(f"SDXL {mode}: max |shared - unshared| = {difference:.2e}")
    assert difference <= TOLERANCE


@pytest.fixture(scope="module")
def sd_pipe():
    pipeline = StableDiffusionTPGPipeline(**build_tiny_sd(version=1))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("mode", list(SD_MODES))
def test_sd_shared_equals_unshared(sd_pipe, mode):
    conds = encode_sd(sd_pipe, ["a red circle", "a blue square"], ["blurry", "blurry"], with_negative=True)
    difference = largest_difference(sd_pipe.unet, sd_pipe.scheduler, noise(2), conds, **SD_MODES[mode])
    print(f"SD {mode}: max |shared - unshared| = {difference:.2e}")
    assert difference <= TOLERANCE


PIPELINE_RUNS = {
    "intervals that drop rows": dict(tpg_interval=(0.0, 0.5), pag_scale=3.0, pag_interval=(0.3, 1.0), do_nag=True),
    "max_batch_rows": dict(pag_scale=3.0, max_batch_rows=3),
}


@pytest.mark.parametrize("run", list(PIPELINE_RUNS))
def test_pipeline_runs_shared_equal_unshared(pipe, run):
    check(run, *(generate(pipe, share_prefix=share, guidance_scale=5.0, **PIPELINE_RUNS[run]) for share in (True, False)))


def test_per_image_generators_shared_equal_unshared(pipe):
    def run(share):
        generators = [torch.Generator().manual_seed(seed) for seed in (4, 5)]
        return pipe(["a red circle", "a blue square"], generator=generators, num_inference_steps=3, height=SIZE, width=SIZE,
                    output_type="latent", guidance_scale=5.0, pag_scale=3.0, do_nag=True, share_prefix=share).images  # fmt: skip

    check("per-image generators", run(True), run(False))


def check(label: str, shared: torch.Tensor, whole: torch.Tensor) -> None:
    """``shared`` equals ``whole`` within ``TOLERANCE`` of the latents' size."""
    difference, size = float((shared - whole).abs().max()), float(whole.abs().max())
    print(f"{label}: max |shared - unshared| = {difference:.2e} (latents up to {size:.1f})")
    assert difference <= TOLERANCE * max(size, 1.0)


def test_controlnet_shared_equals_unshared(components):
    controlnet = build_tiny_controlnet(components["unet"], seed=1)
    pipeline = StableDiffusionXLControlNetTPGPipeline(**components, controlnet=controlnet, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    images = [generate(pipeline, image=picture(7), guidance_scale=5.0, pag_scale=3.0, share_prefix=share) for share in (True, False)]
    check("ControlNet", *images)


def test_ip_adapter_shared_equals_unshared():
    adapted = build_tiny_sdxl(seed=0)
    adapted["unet"]._load_ip_adapter_weights([tiny_ip_adapter_state_dict(adapted["unet"])])
    pipeline = StableDiffusionXLTPGPipeline(**adapted, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    settings = dict(guidance_scale=5.0, pag_scale=3.0, do_nag=True)
    images = [generate(pipeline, ip_adapter_image_embeds=image_embeds(), share_prefix=share, **settings) for share in (True, False)]
    check("IP-Adapter", *images)


D5, D6 = (f"down_blocks.2.attentions.0.transformer_blocks.{i}" for i in (1, 2))
WATCHED = ["conv_in", "down_blocks.0", "down_blocks.2", "down_blocks.2.resnets.0", D5, D6, "mid_block.resnets.0", "mid_block.attentions.0",
           "up_blocks.0", "conv_out"]  # fmt: skip


def rows_entering(unet, denoiser, conds, batch=1):
    """Rows entering each watched module in one call (hooks registered after the denoiser's: they see what runs)."""
    modules = dict(unet.named_modules())
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            tensor = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(name, []).append(tensor.shape[0])

        return hook

    positive, negative = conds
    with denoiser.hooks(), torch.no_grad():
        handles = [modules[name].register_forward_pre_hook(record(name), with_kwargs=True) for name in WATCHED]
        try:
            denoiser(noise(batch), torch.full((batch,), 5.0), cond=positive, uncond=negative)
        finally:
            for handle in handles:
                handle.remove()
    return seen


def test_the_prefix_runs_once(pipe):
    conds = encode_sdxl(pipe, ["a red circle"], size=(SIZE, SIZE), with_negative=True)
    terms = dict(cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(3.0))  # rows [uncond, cond, tpg, pag]
    shared = rows_entering(pipe.unet, GuidedDenoiser(pipe.unet, pipe.scheduler, **terms), conds)
    assert shared == {
        "conv_in": [2], "down_blocks.0": [2],  # both perturbed rows share the cond row's
        "down_blocks.2": [3], "down_blocks.2.resnets.0": [2],  # PAG's row still shared; TPG's too, until d6
        D5: [2], D6: [3],  # TPG's first block, d6, takes its row
        "mid_block.resnets.0": [3], "mid_block.attentions.0": [4], "up_blocks.0": [4], "conv_out": [4],
    }  # fmt: skip
    whole = rows_entering(pipe.unet, GuidedDenoiser(pipe.unet, pipe.scheduler, share_prefix=False, **terms), conds)
    assert whole == {name: [4] for name in WATCHED}


def test_without_sharing_nothing_narrows_and_the_unet_is_restored(pipe, sdxl_conds):
    before = unet_snapshot(pipe.unet)
    off = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), share_prefix=False)
    on = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0))
    with off.hooks():
        assert installed_count(pipe.unet.conv_in) == 0 and installed_count(pipe.unet.down_blocks[0]) == 0
    with on.hooks():
        assert installed_count(pipe.unet.conv_in) == 2  # the narrowing pre-hook and the widening hook
        with torch.no_grad():
            on(noise(2), torch.full((2,), 5.0), cond=sdxl_conds[0], uncond=sdxl_conds[1])
    assert unet_snapshot(pipe.unet) == before and current_call() is None


def test_an_error_inside_a_narrowed_module_leaves_no_state(pipe, sdxl_conds, monkeypatch):
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0))
    before = unet_snapshot(pipe.unet)

    def fail(*args, **kwargs):
        raise RuntimeError("inside the prefix")

    monkeypatch.setattr(pipe.unet.down_blocks[1], "forward", fail)
    with pytest.raises(RuntimeError, match="inside the prefix"), torch.no_grad():
        denoiser(noise(2), torch.full((2,), 5.0), cond=sdxl_conds[0], uncond=sdxl_conds[1])
    assert current_call() is None and unet_snapshot(pipe.unet) == before


def test_a_compiled_unet_runs_every_row(pipe):
    denoiser = GuidedDenoiser(torch.compile(pipe.unet), pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(3.0))
    assert denoiser.shared_prefix_modules == ()  # its resident hooks only: no narrowing to break or recompile its graph
    assert GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(3.0)).shared_prefix_modules
