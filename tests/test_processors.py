"""Every attention processor a diffusers user can install under each guidance term: the same result as
``AttnProcessor2_0`` (within 1e-4), the user's processors back afterwards."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0, SlicedAttnProcessor

from conftest import SIZE, unet_snapshot
from dualguide import StableDiffusionXLTPGPipeline, apply_softpag, build_tiny_sdxl

TERMS = {
    "terms off": dict(guidance_scale=4.0),
    "TPG": dict(guidance_scale=4.0, tpg_scale=3.0),
    "PAG": dict(guidance_scale=4.0, pag_scale=3.0, pag_applied_layers_index="m0-m9"),
    "SoftPAG": dict(guidance_scale=4.0, pag_scale=3.0, pag_applied_layers_index="m0-m9"),
    "NAG": dict(guidance_scale=4.0, do_nag=True, nag_scale=3.0, nag_negative_prompt="a blue square"),
    "all": dict(guidance_scale=4.0, tpg_scale=3.0, pag_scale=3.0, do_nag=True, nag_scale=3.0),
}


class UsersOwnProcessor:
    """A user's processor with diffusers' call convention only (no ``temb``, no extras): standard attention."""

    def __init__(self):
        self.inner = AttnProcessor2_0()
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        self.calls += 1
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


def install_standard(pipe):
    pipe.unet.set_attn_processor(AttnProcessor2_0())


def install_classic(pipe):
    pipe.unet.set_attn_processor(AttnProcessor())


def install_sliced(pipe):
    pipe.enable_attention_slicing(slice_size=1)


def install_fused(pipe):
    pipe.fuse_qkv_projections()


def install_custom(pipe):
    pipe.unet.set_attn_processor(UsersOwnProcessor())


def install_xformers(pipe):
    pytest.importorskip("xformers")
    if not torch.cuda.is_available():
        pytest.skip("xFormers attention needs CUDA")
    pipe.enable_xformers_memory_efficient_attention()


PROCESSORS = {
    "AttnProcessor": (install_classic, AttnProcessor),
    "SlicedAttnProcessor": (install_sliced, SlicedAttnProcessor),
    "FusedAttnProcessor2_0": (install_fused, FusedAttnProcessor2_0),
    "a user's own processor": (install_custom, UsersOwnProcessor),
    "xFormers": (install_xformers, object),
}


@pytest.fixture(scope="module")
def own_pipe():
    """A pipeline with its own UNet: the processors change here, never on the shared fixtures."""
    pipeline = StableDiffusionXLTPGPipeline(**build_tiny_sdxl(seed=0), add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents(pipe, term):
    pipe._softpag = None
    if term == "SoftPAG":
        apply_softpag(pipe, beta=0.6, selected_heads=[0])
    settings = dict(prompt="a red circle", num_inference_steps=2, height=SIZE, width=SIZE, output_type="latent")
    return pipe(generator=torch.Generator().manual_seed(0), **settings, **TERMS[term]).images


@pytest.fixture(scope="module")
def reference(own_pipe):
    install_standard(own_pipe)
    return {term: latents(own_pipe, term) for term in TERMS}


@pytest.mark.parametrize("processor", PROCESSORS)
def test_each_processor_gives_the_standard_result_under_each_term(own_pipe, reference, processor):
    install, kind = PROCESSORS[processor]
    install(own_pipe)
    try:
        before = unet_snapshot(own_pipe.unet)
        assert all(isinstance(p, kind) for p in own_pipe.unet.attn_processors.values())
        for term in TERMS:
            difference = (latents(own_pipe, term) - reference[term]).abs().max().item()
            assert difference <= 1e-4, f"{processor}, {term}: {difference}"
        assert unet_snapshot(own_pipe.unet) == before  # the user's processors are back, no hook left
        if processor == "a user's own processor":
            assert next(iter(own_pipe.unet.attn_processors.values())).calls > 0
    finally:
        if processor == "FusedAttnProcessor2_0":
            own_pipe.unfuse_qkv_projections()
        install_standard(own_pipe)
        own_pipe._softpag = None


def test_attention_slicing_with_pag_runs_through_diffusers_own_attention_call(own_pipe):
    """The reported failure: ``enable_attention_slicing`` with PAG raised a TypeError (temb passed to Sliced)."""
    own_pipe.enable_attention_slicing()
    try:
        out = latents(own_pipe, "PAG")
        assert torch.isfinite(out).all()
    finally:
        install_standard(own_pipe)
