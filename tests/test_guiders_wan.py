"""The Modular Diffusers guiders on Wan: diffusers' modular Wan text-to-video core denoise step with a tiny
``WanTransformer3DModel`` built in code (prompt embeds given, no text encoder or VAE). TPG moves the video, TPG at 0 is
diffusers' CFG, NAG runs with and without CFG, the transformer is left as it was, bad input is refused before any
transformer call; and the Wan NAG attention against the NAG authors' Wan rule restated here."""

import math

import pytest
import torch
from conftest import unet_snapshot
from counting import rows_seen
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

from dualguide.callstate import GuidedCall, NAGCall, current_call, guided_call
from dualguide.families import WAN, layout_of
from dualguide.guidance import nag_extrapolate_wan
from dualguide.guiders import DualGuidance, NormalizedAttentionGuidance, TokenPerturbationGuidance
from dualguide.hooks import HookSites, guidance_hooks, installed_count
from dualguide.rows import CallRows
from dualguide.tiny import WAN_TEXT_DIM, tiny_wan_transformer_config, wan_scheduler_config
from dualguide.wan_nag import TEXT_TOKENS, WanNAGProcessor

STEPS = 3
VIDEO = dict(height=32, width=32, num_frames=9)  # latents [B, 16, 3, 4, 4]: 3 x 2 x 2 = 12 video tokens per block
TOKENS = 12


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_wan_transformer_config()).eval()


@pytest.fixture(scope="module")
def modular(transformer):
    """diffusers' modular Wan core denoise step (text inputs, timesteps, latents, denoise loop) on the tiny transformer."""
    pipeline = WanCoreDenoiseStep().init_pipeline()
    pipeline.update_components(transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def embeds(seed, batch=1):
    return torch.randn(batch, 8, WAN_TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def run(pipeline, guider, batch=1, **kwargs):
    """Final latents of a seeded run; a fresh scheduler each run."""
    pipeline.update_components(guider=guider, scheduler=UniPCMultistepScheduler(**wan_scheduler_config()))
    inputs = dict(prompt_embeds=embeds(1, batch), negative_prompt_embeds=embeds(2, batch), num_inference_steps=STEPS, **VIDEO)
    return pipeline(**inputs, **kwargs, generator=torch.Generator().manual_seed(0), output="latents")


def untouched(transformer, before):
    """The transformer has exactly its processors of ``before``, no hooks anywhere, no call state or hook shares."""
    return (
        unet_snapshot(transformer) == before
        and all(not m._forward_pre_hooks and not m._forward_hooks for m in transformer.modules())
        and not any(installed_count(m) for m in transformer.modules())
        and current_call() is None
    )


def test_layout(transformer):
    assert layout_of(transformer) is WAN
    assert list(WAN.blocks(transformer)) == [f"b{i}" for i in range(30)]
    rows, tokens = WAN.branch_tokens(transformer, (), {"hidden_states": torch.zeros(2, 16, 3, 4, 4)})
    assert rows == 2 and tokens == {block: TOKENS for block in transformer.blocks}  # F * H/2 * W/2, frames included
    assert WAN.nag_attentions(transformer) == {block.attn2 for block in transformer.blocks}
    torch.manual_seed(0)
    deeper = WanTransformer3DModel(**tiny_wan_transformer_config(num_layers=40))
    for model in (transformer, deeper):  # the default exists on both released depths
        assert [name for name, _ in WAN.resolve(model, WAN.default_tpg_for(model), "tpg_layers")] == [f"blocks.{i}" for i in range(4, 11)]


def test_tpg_moves_the_video_and_zero_is_cfg(modular, transformer):
    before = unet_snapshot(transformer)
    cfg = run(modular, ClassifierFreeGuidance(guidance_scale=5.0))
    assert torch.equal(run(modular, TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=0.0)), cfg)
    with rows_seen(transformer) as rows:
        tpg = run(modular, TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=3.0))
    assert rows == [1] * 3 * STEPS  # cond, uncond, TPG: one call each
    assert (tpg - cfg).abs().max() > 0.5
    assert untouched(transformer, before)


def test_tpg_permutations_reproducible_from_seed(modular, transformer):
    guider = TokenPerturbationGuidance(guidance_scale=1.0, tpg_scale=3.0, tpg_layers="b0-b29", seed=7)
    first = run(modular, guider)
    assert torch.equal(run(modular, guider), first)  # a run restarts the streams
    assert torch.equal(run(modular, TokenPerturbationGuidance(guidance_scale=1.0, tpg_scale=3.0, tpg_layers="b0-b29", seed=7)), first)
    assert (run(modular, TokenPerturbationGuidance(guidance_scale=1.0, tpg_scale=3.0, tpg_layers="b0-b29", seed=8)) - first).abs().max() > 1e-3


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "cfg-off"])
def test_nag_runs_with_and_without_cfg(modular, transformer, guidance_scale):
    before = unet_snapshot(transformer)
    plain = run(modular, ClassifierFreeGuidance(guidance_scale=guidance_scale))
    guider = NormalizedAttentionGuidance(guidance_scale=guidance_scale, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_negative_prompt_embeds=embeds(3))
    with rows_seen(transformer) as rows:
        nag = run(modular, guider)
    assert rows == [1] * (2 if guidance_scale > 1 else 1) * STEPS  # NAG adds no call
    assert torch.isfinite(nag).all() and (nag - plain).abs().max() > 0.05
    assert untouched(transformer, before)
    l2 = NormalizedAttentionGuidance(guidance_scale=guidance_scale, nag_scale=5.0, nag_use_l1=False, nag_negative_prompt_embeds=embeds(3))
    assert torch.isfinite(run(modular, l2)).all() and untouched(transformer, before)


def test_dual_guidance(modular, transformer):
    before = unet_snapshot(transformer)
    guider = DualGuidance(guidance_scale=5.0, tpg_scale=3.0, nag_scale=5.0, nag_negative_prompt_embeds=embeds(3))
    with rows_seen(transformer) as rows:
        dual = run(modular, guider)
    assert rows == [1] * 3 * STEPS
    tpg = run(modular, TokenPerturbationGuidance(guidance_scale=5.0, tpg_scale=3.0))
    assert (dual - tpg).abs().max() > 0.05 and untouched(transformer, before)


@pytest.mark.parametrize(
    "guider, batch, match",
    [
        (TokenPerturbationGuidance(tpg_layers="b30"), 1, r"tpg_layers.*b30.*b0-b29"),
        (TokenPerturbationGuidance(tpg_layers="d6-d23"), 1, r"tpg_layers.*d6.*b0-b29"),
        (NormalizedAttentionGuidance(nag_negative_prompt_embeds=torch.zeros(2, 8, WAN_TEXT_DIM)), 1, "nag_negative_prompt_embeds has batch 2"),
        (NormalizedAttentionGuidance(nag_negative_prompt_embeds=torch.zeros(1, 8, WAN_TEXT_DIM + 1)), 1, "nag_negative_prompt_embeds has width"),
        (NormalizedAttentionGuidance(), 1, "nag_negative_prompt_embeds"),
    ],
    ids=["unknown-layer", "unet-layers", "negative-batch", "negative-width", "negative-missing"],
)
def test_bad_input_refused_before_any_transformer_call(modular, transformer, guider, batch, match):
    before = unet_snapshot(transformer)
    with rows_seen(transformer) as rows, pytest.raises(ValueError, match=match):
        run(modular, guider, batch)
    assert rows == [] and untouched(transformer, before)


# -- the Wan NAG attention against the NAG authors' rule, restated --------------------------------------------------


def restated_wan_nag(attn, hidden, text, negative, scale, tau, alpha, image=None):
    """The NAG authors' Wan cross-attention with NAG, written out: per-head softmax attention, L1 norms, ratio with
    0/0 read as 10, tokens over tau rescaled to tau |Z+| with 1e-7 in the denominator, the blend, the image attention
    of the positive rows added, to_out."""

    def attend(query, context_key, context_value):
        heads = attn.heads
        q, k, v = (x.reshape(x.shape[0], x.shape[1], heads, -1).permute(0, 2, 1, 3) for x in (query, context_key, context_value))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (weights @ v).permute(0, 2, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    query = attn.norm_q(attn.to_q(hidden))
    positive = attend(query, attn.norm_k(attn.to_k(text)), attn.to_v(text))
    negative = attend(query, attn.norm_k(attn.to_k(negative)), attn.to_v(negative))
    guidance = positive * scale - negative * (scale - 1)
    norm_positive = positive.abs().sum(-1, keepdim=True).expand_as(positive)
    norm_guidance = guidance.abs().sum(-1, keepdim=True).expand_as(guidance)
    ratio = torch.nan_to_num(norm_guidance / norm_positive, 10)
    over = ratio > tau
    guidance[over] = guidance[over] / (norm_guidance[over] + 1e-7) * norm_positive[over] * tau
    out = guidance * alpha + positive * (1 - alpha)
    if image is not None:
        out = out + attend(query, attn.norm_added_k(attn.add_k_proj(image)), attn.add_v_proj(image))
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize(
    "tau, image",
    [(2.5, False), (1.02, False), (1.02, True)],
    ids=["tau-2.5", "clamping", "i2v-clamping"],
)
@torch.no_grad()
def test_wan_nag_attention_equals_the_authors_rule(tau, image):
    torch.manual_seed(0)
    attn = WanAttention(dim=24, heads=2, dim_head=12, eps=1e-6, cross_attention_dim_head=12, added_kv_proj_dim=24 if image else None,
                         processor=WanAttnProcessor()).eval()  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    hidden, text, negative = (torch.randn(2, n, 24, generator=generator) for n in (12, TEXT_TOKENS, 8))
    image_tokens = torch.randn(2, 5, 24, generator=generator) if image else None
    context = text if image_tokens is None else torch.cat([image_tokens, text], dim=1)
    plain = attn(hidden, context)
    nag = NAGCall(frozenset([attn]), 4.0, tau, 0.25, True, negative[1:])  # no cache: the processor computes the K/V
    with guidance_hooks(HookSites(wrappers=((attn, WanNAGProcessor),))), guided_call(GuidedCall(CallRows({"uncond": slice(0, 1), "cond": slice(1, 2)}), nag=nag)):
        guided = attn(hidden, context)
    expected = restated_wan_nag(attn, hidden[1:], text[1:], negative[1:], 4.0, tau, 0.25, None if image_tokens is None else image_tokens[1:])
    assert (guided[1:] - expected).abs().max() <= 1e-5
    assert torch.equal(guided[:1], plain[:1])  # the uncond row: the wrapped processor's output
    assert (guided[1:] - plain[1:]).abs().max() > 1e-2
    assert type(attn.processor) is WanAttnProcessor  # the wrapper is gone


def test_wan_rule_on_edge_tokens():
    """Zero tokens (0/0 and x/0 ratios), tokens under and over tau: the rule restated, in float64."""
    positive = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, -2.0], [1.0, 1.0]], dtype=torch.float64)
    negative = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.1, -2.1], [-3.0, 2.0]], dtype=torch.float64)
    scale, tau, alpha = 3.0, 2.5, 0.25
    result = nag_extrapolate_wan(positive, negative, scale, tau, alpha)
    guidance = positive * scale - negative * (scale - 1)
    norm_p, norm_g = positive.abs().sum(-1, keepdim=True), guidance.abs().sum(-1, keepdim=True)
    ratio = torch.nan_to_num(norm_g / norm_p, 10)
    expected = torch.where(ratio > tau, guidance / (norm_g + 1e-7) * norm_p * tau, guidance) * alpha + positive * (1 - alpha)
    assert torch.allclose(result, expected, rtol=0, atol=1e-12)
    assert torch.equal(result[:2], torch.zeros(2, 2))  # zero positive tokens stay zero
    assert (ratio[2] <= tau) and (ratio[3] > tau)
