"""Chroma: parity with diffusers' ChromaPipeline (terms off, CFG as uncond + cond rows of one transformer call), the
k-diffusion path equal to FlowMatchEulerDiscreteScheduler, T5's mask in the guided attentions (NAG against the
prompt itself changes nothing, PAG leaves the cond row as it is), TPG against a hook-free reference on double and
single blocks, every mode one call per step, bad input before any call, processors and hooks restored."""

import inspect

import pytest
import torch
from diffusers import ChromaPipeline

from counting import rows_seen
from dualguide import PAG, TPG, ChromaTPGPipeline, GuidedDenoiser
from dualguide.callstate import PAGCall
from dualguide.conditioning import Conditioning
from dualguide.families import CHROMA, FLUX, CallExtras, family_of
from dualguide.joint import perturbed_heads
from dualguide.tiny import build_tiny_chroma

SIZE = dict(height=32, width=32, max_sequence_length=16)
TEXT = 96  # the tiny T5's width


@pytest.fixture(scope="module")
def components():
    return build_tiny_chroma()


@pytest.fixture(scope="module")
def pipe(components):
    return ChromaTPGPipeline(**components)


def embeds(seed: int, kept: int):
    """Prompt embeds [1, 16, TEXT] and ChromaPipeline's float mask keeping the first ``kept`` tokens."""
    mask = torch.zeros(1, 16)
    mask[:, :kept] = 1.0
    return torch.randn(1, 16, TEXT, generator=torch.Generator().manual_seed(seed)), mask


def latents(pipe, seed=0, **kwargs):
    prompt_embeds, mask = embeds(100, 6)
    arguments = dict(prompt_embeds=prompt_embeds, prompt_attention_mask=mask, num_inference_steps=2, guidance_scale=1.0,
                     output_type="latent", **SIZE)  # fmt: skip
    return pipe(**{**arguments, **kwargs}, generator=torch.Generator().manual_seed(seed)).images


def negative():
    prompt_embeds, mask = embeds(200, 3)
    return dict(negative_prompt_embeds=prompt_embeds, negative_prompt_attention_mask=mask)


def untouched(transformer, before) -> bool:
    hooks = any(m._forward_pre_hooks or m._forward_hooks for m in transformer.modules())
    return dict(transformer.attn_processors) == before and not hooks


def test_chroma_has_its_own_adapter(components):
    assert family_of(components["transformer"]) is CHROMA and not FLUX.matches(components["transformer"])


def test_signature_is_chroma_pipelines_plus_the_guidance_parameters():
    ours = inspect.signature(ChromaTPGPipeline.__call__).parameters
    theirs = [name for name in inspect.signature(ChromaPipeline.__call__).parameters if name != "kwargs"]
    assert list(ours)[: len(theirs)] == theirs and ours["guidance_scale"].default == 5.0
    assert {"tpg_scale", "nag_scale", "nag_negative_prompt", "sampler"} <= set(ours) and "nag_negative_prompt_2" not in ours


def test_terms_off_equal_diffusers(components, pipe):
    ours = latents(pipe, tpg_scale=0.0)
    assert (ours - latents(ChromaPipeline(**components))).abs().max() <= 1e-4


def test_cfg_equals_diffusers_in_one_call(components, pipe):
    """ChromaPipeline's CFG (guidance_scale > 1; text prompts, so T5's masks come from the tokenizer) as [uncond, cond]."""
    text = dict(prompt="a red cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=4.0, output_type="latent", **SIZE)
    with rows_seen(pipe.transformer) as rows:
        ours = pipe(**text, tpg_scale=0.0, generator=torch.Generator().manual_seed(0)).images
    assert rows == [2, 2]
    reference = ChromaPipeline(**components)
    theirs = reference(**text, generator=torch.Generator().manual_seed(0)).images
    assert (ours - theirs).abs().max() <= 1e-4
    plain = reference(**{**text, "guidance_scale": 1.0}, generator=torch.Generator().manual_seed(0)).images
    assert (theirs - plain).abs().max() > 1e-3  # CFG acted


def test_kdiffusion_euler_equals_flow_match_euler(pipe):
    options = dict(guidance_scale=3.0, nag_scale=4.0, nag_negative_prompt="ugly", **negative())
    assert (latents(pipe, sampler="euler", **options) - latents(pipe, **options)).abs().max() <= 1e-5


def test_nag_uses_the_negative_mask_on_its_text_rows(pipe):
    """NAG against the prompt itself (same embeds, same mask) leaves every attention as it is; another negative moves
    the output, through one extra text row per guided row and no extra image row."""
    text = dict(prompt="a red cat", num_inference_steps=2, guidance_scale=1.0, tpg_scale=0.0, output_type="latent", **SIZE)
    plain = pipe(**text, generator=torch.Generator().manual_seed(0)).images
    same = pipe(**text, nag_scale=5.0, nag_negative_prompt="a red cat", generator=torch.Generator().manual_seed(0)).images
    assert (same - plain).abs().max() <= 1e-5
    with rows_seen(pipe.transformer.context_embedder) as text_rows, rows_seen(pipe.transformer.x_embedder) as image_rows:
        guided = pipe(**text, nag_scale=5.0, nag_negative_prompt="blurry", generator=torch.Generator().manual_seed(0)).images
    assert text_rows == [2, 2] and image_rows == [1, 1]
    assert (guided - plain).abs().max() > 1e-3


def test_pag_keeps_the_cond_row_and_the_mask(components):
    """The guided attentions apply T5's mask: with PAG on double and single blocks the cond row equals the plain
    transformer's output; the PAG row moves."""
    transformer = components["transformer"]
    prompt_embeds, mask = embeds(100, 6)
    cond = Conditioning(prompt_embeds, attention_mask=mask)
    denoiser = GuidedDenoiser(transformer, components["scheduler"], pag=PAG(scale=3.0, layers="j7,s7"), share_prefix=False)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7])
    with denoiser.hooks():
        denoiser(x, sigma, cond)
    plain = CHROMA.call(transformer, x, sigma * 1000, cond, CallExtras()).float()
    assert (denoiser.last_outputs["cond"] - plain).abs().max() <= 1e-5
    assert (denoiser.last_outputs["pag"] - plain).abs().max() > 1e-3


def test_pag_attention_adds_the_float_mask():
    """``perturbed_heads`` with a float mask: the scores plus the mask, the image-image block the identity."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 7, 4, generator=generator) for _ in range(3))
    mask = torch.ones(7)
    mask[2] = 0.0  # a padding token past the first: +0 instead of +1
    square = (mask[None, :] * mask[:, None])[None, None]
    image = slice(3, 7)
    ours = perturbed_heads(query, key, value, torch.zeros_like(query), image, PAGCall(frozenset(), 1.0, None), square)
    scores = query @ key.transpose(-1, -2) / 2 + square
    identity = torch.full((7, 7), float("-inf"))
    identity[:, :3] = 0
    identity[:3] = 0
    identity[3:, 3:].fill_diagonal_(0)
    assert torch.allclose(ours, torch.softmax(scores + identity, -1) @ value, atol=1e-6)


def test_tpg_row_equals_a_hook_free_permuted_reference(components):
    """The TPG row equals the transformer run with the chosen blocks' image tokens permuted by plain hooks: a double
    block's image stream, and a single block's image tokens after the text."""
    transformer = components["transformer"]
    prompt_embeds, mask = embeds(100, 6)
    cond = Conditioning(prompt_embeds, attention_mask=mask)
    denoiser = GuidedDenoiser(transformer, components["scheduler"], tpg=TPG(scale=3.0, layers="j5,s2-s3"), seed=7, share_prefix=False)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7])
    with denoiser.hooks():
        denoiser(x, sigma, cond)
    generator = torch.Generator().manual_seed(7)
    permutations = {name: torch.randperm(64, generator=generator) for name in ("transformer_blocks.5", "single_transformer_blocks.2", "single_transformer_blocks.3")}

    def shuffle(permutation):
        def hook(_module, args, kwargs):
            tokens = kwargs["hidden_states"]
            text = tokens.shape[1] - 64  # a single block's input is [text, image]
            return args, {**kwargs, "hidden_states": torch.cat([tokens[:, :text], tokens[:, text:][:, permutation]], dim=1)}

        return hook

    handles = [transformer.get_submodule(n).register_forward_pre_hook(shuffle(p), with_kwargs=True) for n, p in permutations.items()]
    try:
        reference = CHROMA.call(transformer, x, sigma * 1000, cond, CallExtras())
    finally:
        for handle in handles:
            handle.remove()
    assert (denoiser.last_outputs["tpg"] - reference.float()).abs().max() <= 1e-5
    assert (denoiser.last_outputs["tpg"] - denoiser.last_outputs["cond"]).abs().max() > 1e-3


def test_shared_prefix_rows_equal_the_unshared_call(pipe):
    """TPG and PAG rows run as the cond row until their first perturbed block, single blocks included (whose guided
    attention learns the text length at the block, not at the join, where the rows may be narrowed)."""
    options = dict(tpg_scale=3.0, tpg_applied_layers_index="s3", pag_scale=2.0, pag_applied_layers_index="s7")
    transformer = pipe.transformer
    with rows_seen(transformer.transformer_blocks[0].norm1) as first, rows_seen(transformer.single_transformer_blocks[5].norm) as fifth:
        shared = latents(pipe, **options)
    assert first == [1, 1] and fifth == [2, 2]  # [cond] before s3; [cond, tpg] before s7
    assert (shared - latents(pipe, share_prefix=False, **options)).abs().max() <= 1e-5


def test_every_mode_is_one_transformer_call_per_step(pipe):
    modes = {
        "tpg": (dict(tpg_scale=3.0), 2),
        "cfg + tpg on double and single blocks": (dict(guidance_scale=4.0, tpg_scale=3.0, tpg_applied_layers_index="j5,s3", **negative()), 3),
        "cfg + tpg + pag + nag": (dict(guidance_scale=4.0, tpg_scale=3.0, pag_scale=2.0, nag_scale=5.0, **negative()), 4),
    }
    plain = latents(pipe, tpg_scale=0.0)
    before = dict(pipe.transformer.attn_processors)
    for name, (options, rows_per_call) in modes.items():
        with rows_seen(pipe.transformer) as rows:
            out = latents(pipe, share_prefix=False, **options)
        assert rows == [rows_per_call] * 2, name
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3, name
        assert untouched(pipe.transformer, before), name


@pytest.mark.parametrize(
    "options, parameter",
    [
        (dict(tpg_scale=3.0, tpg_applied_layers_index="d6"), "tpg_applied_layers_index"),
        (dict(pag_scale=3.0, pag_applied_layers_index="s38"), "pag_applied_layers_index"),
        (dict(max_sequence_length=600), "max_sequence_length"),
        (dict(nag_scale=5.0, nag_negative_prompt_embeds=torch.randn(1, 16, TEXT)), "nag_negative_prompt_embeds"),
        (dict(prompt_attention_mask=torch.ones(1, 16, dtype=torch.long)), "prompt_attention_mask"),
        (dict(prompt_attention_mask=None), "prompt_attention_mask"),
        (dict(guidance_scale=4.0, negative_prompt="blurry", max_sequence_length=12), "max_sequence_length"),
        (dict(height=1), "height"),
    ],
)
def test_bad_input_fails_before_any_transformer_call(pipe, options, parameter):
    before = dict(pipe.transformer.attn_processors)
    with rows_seen(pipe.transformer) as rows, pytest.raises((ValueError, TypeError), match=parameter):
        latents(pipe, **options)
    assert rows == []
    assert untouched(pipe.transformer, before)
