"""Normalized Attention Guidance: processor numerics, composition, pipeline API."""

import pytest
import torch

from conftest import generate, unet_snapshot
from dualguide import StableDiffusionXLTPGPipeline, apply_nag
from dualguide.callstate import GuidedCall, NAGCall, guided_call
from dualguide.rows import CallRows
from dualguide.conditioning import encode_nag_negative
from dualguide.nag import NAGCrossAttnProcessor


def reference_nag_attention(attn, hidden, positive_context, negative_context, guided, scale, tau, alpha, p):
    """The paper's NAG written out independently: per guided row, same queries, two contexts."""
    heads = attn.heads

    def attend(q_in, ctx):
        q, k, v = attn.to_q(q_in), attn.to_k(ctx), attn.to_v(ctx)
        b, n, inner = q.shape
        d = inner // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        weights = (q @ k.transpose(-1, -2) / d**0.5).softmax(-1)
        return (weights @ v).transpose(1, 2).reshape(b, n, inner)

    z = attend(hidden, positive_context)
    z_pos = z[guided]
    z_neg = attend(hidden[guided], negative_context)
    z_t = scale * z_pos - (scale - 1) * z_neg
    ratio = z_t.norm(p=p, dim=-1, keepdim=True) / z_pos.norm(p=p, dim=-1, keepdim=True)
    z_t = z_t * torch.minimum(ratio, torch.full_like(ratio, tau)) / ratio
    z = z.clone()
    z[guided] = alpha * z_t + (1 - alpha) * z_pos
    return attn.to_out[1](attn.to_out[0](z))


@torch.no_grad()
@pytest.mark.parametrize("use_l1", [True, False])
@pytest.mark.parametrize("tau", [1.05, 2.5])
def test_processor_matches_reference(unet, use_l1, tau):
    attn = unet.mid_block.attentions[0].transformer_blocks[3].attn2
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 16, attn.to_q.in_features, generator=generator)
    positive = torch.randn(3, 7, attn.to_k.in_features, generator=generator)
    negative = torch.randn(2, 7, attn.to_k.in_features, generator=generator)
    rows = CallRows({"uncond": slice(0, 1), "cond": slice(1, 2), "tpg": slice(2, 3)})
    processor = NAGCrossAttnProcessor(attn.processor)
    with guided_call(GuidedCall(rows, nag=NAGCall(frozenset({attn}), 4.0, tau, 0.5, use_l1, negative))):
        ours = processor(attn, hidden, encoder_hidden_states=positive)
    expected = reference_nag_attention(attn, hidden, positive, negative, slice(1, 3), 4.0, tau, 0.5, 1 if use_l1 else 2)
    assert torch.allclose(ours, expected, atol=1e-5)
    plain = attn.processor(attn, hidden, encoder_hidden_states=positive)
    assert torch.allclose(ours[:1], plain[:1], atol=1e-6)  # uncond row untouched
    assert not torch.allclose(ours[1:], plain[1:], atol=1e-3)


@torch.no_grad()
def test_processor_with_qk_norm_and_a_new_negative_per_run():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8, qk_norm="layer_norm", processor=AttnProcessor2_0())
    attn.norm_k.weight.data.uniform_(0.5, 1.5)  # keys and queries normed differently
    hidden, positive = torch.randn(2, 9, 16), torch.randn(2, 5, 12)
    rows = CallRows({"uncond": slice(0, 1), "cond": slice(1, 2)})
    processor = NAGCrossAttnProcessor(attn.processor)
    cache = {}
    for _ in range(2):  # a new negative tensor (a new run) must not reuse the cached K/V of the last one
        negative = torch.randn(1, 5, 12)
        with guided_call(GuidedCall(rows, nag=NAGCall(frozenset({attn}), 3.0, 2.5, 0.5, True, negative, cache=cache))):
            ours = processor(attn, hidden, encoder_hidden_states=positive)
        expected = reference_nag_attention(attn, hidden, positive, negative, slice(1, 2), 3.0, 2.5, 0.5, 1)
        assert torch.allclose(ours, expected, atol=1e-5)


def test_nag_scale_one_gives_exactly_the_cfg_output(pipe):
    cfg = generate(pipe, guidance_scale=5.0, tpg_scale=0.0)
    nag_off = generate(pipe, guidance_scale=5.0, tpg_scale=0.0, do_nag=True, nag_scale=1.0)
    assert torch.equal(cfg, nag_off)
    nag_on = generate(pipe, guidance_scale=5.0, tpg_scale=0.0, do_nag=True)
    assert not torch.allclose(cfg, nag_on)


def test_nag_alone_without_cfg(pipe):
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        out = generate(pipe, guidance_scale=1.0, tpg_scale=0.0, do_nag=True, nag_negative_prompt="blurry")
    finally:
        handle.remove()
    assert rows == [1, 1, 1] and torch.isfinite(out).all()
    assert not torch.allclose(out, generate(pipe, guidance_scale=1.0, tpg_scale=0.0))


def test_two_prompts_with_two_nag_negatives(pipe):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    settings = dict(guidance_scale=5.0, tpg_scale=0.0, do_nag=True)
    batch = generate(pipe, prompt=["a red circle", "a blue square"], nag_negative_prompt=["green", "yellow"], latents=latents, **settings)
    first = generate(pipe, prompt="a red circle", nag_negative_prompt="green", latents=latents[:1], **settings)
    second = generate(pipe, prompt="a blue square", nag_negative_prompt="yellow", latents=latents[1:], **settings)
    assert torch.allclose(batch, torch.cat([first, second]), atol=1e-4)
    swapped = generate(pipe, prompt="a red circle", nag_negative_prompt="yellow", latents=latents[:1], **settings)
    assert not torch.allclose(first, swapped, atol=1e-4)


def test_cfg_tpg_nag_is_one_call_per_step(pipe):
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        generate(pipe, num_inference_steps=4, guidance_scale=5.0, tpg_scale=3.0, do_nag=True)
    finally:
        handle.remove()
    assert rows == [3, 3, 3, 3]


def test_nag_end_stops_nag(pipe):
    full = generate(pipe, num_inference_steps=4, tpg_scale=0.0, do_nag=True)
    half = generate(pipe, num_inference_steps=4, tpg_scale=0.0, do_nag=True, nag_end=0.5)
    none = generate(pipe, num_inference_steps=4, tpg_scale=0.0)
    assert not torch.allclose(half, full) and not torch.allclose(half, none)


def test_processors_restored_after_exception_mid_sampling(pipe):
    before = unet_snapshot(pipe.unet)
    calls = []

    def fail_at_third_call(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")

    handle = pipe.unet.register_forward_pre_hook(fail_at_third_call)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            generate(pipe, num_inference_steps=4, tpg_scale=3.0, do_nag=True)
    finally:
        handle.remove()
    assert unet_snapshot(pipe.unet) == before


def test_nag_negative_order(pipe):
    def embeds(**kwargs):
        return encode_nag_negative(pipe, 1, 1, **kwargs)

    empty = embeds()
    assert empty.abs().sum() > 0  # the encoded empty string, not force_zeros_for_empty_prompt's zeros
    assert torch.allclose(embeds(negative_prompt="blue"), embeds(nag_negative_prompt="blue"))
    assert torch.allclose(embeds(nag_negative_prompt="red", negative_prompt="blue"), embeds(nag_negative_prompt="red"))
    given = torch.randn(1, 77, 64)
    assert torch.equal(embeds(nag_negative_prompt_embeds=given, nag_negative_prompt="red"), given)


def test_apply_nag_makes_later_calls_use_nag(components):
    pipeline = StableDiffusionXLTPGPipeline(**components, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    explicit = generate(pipeline, tpg_scale=0.0, do_nag=True, nag_scale=4.0, nag_alpha=1.0)
    assert apply_nag(pipeline, nag_scale=4.0, nag_alpha=1.0) is pipeline
    assert torch.equal(generate(pipeline, tpg_scale=0.0), explicit)
    assert torch.equal(generate(pipeline, tpg_scale=0.0, do_nag=False), generate(pipeline, tpg_scale=0.0, nag_scale=1.0))
    with pytest.raises(ValueError, match="nag_tau"):
        apply_nag(pipeline, nag_tau=-1.0)
