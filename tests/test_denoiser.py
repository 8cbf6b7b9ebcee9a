"""GuidedDenoiser: the batch it builds, the hooks it installs, and what it leaves behind."""

import pytest
import torch

from conftest import unet_snapshot
from counting import rows_seen
from dualguide import CFG, NAG, PAG, TPG, Conditioning, GuidedDenoiser, Interval
from dualguide.rows import TokenPermutations


@pytest.fixture(scope="module")
def conds(pipe):
    positive, negative = pipe_encode(pipe, ["a red circle", "a blue square"])
    return positive, negative


def pipe_encode(pipe, prompts):
    from dualguide.conditioning import encode_sdxl

    return encode_sdxl(pipe, prompts, size=(32, 32), with_negative=True)


@pytest.fixture
def x():
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))


def unet_by_hand(unet, scheduler, x, sigma, conditioning):
    """The eps prediction of a plain UNet call, scaled and timed exactly as diffusers' Euler does."""
    t = scheduler.timesteps[0]
    model_in = x / (sigma**2 + 1) ** 0.5
    return unet(
        model_in, t, encoder_hidden_states=conditioning.prompt_embeds,
        added_cond_kwargs={"text_embeds": conditioning.pooled_embeds, "time_ids": conditioning.time_ids},
    ).sample  # fmt: skip


@torch.no_grad()
def test_cfg_denoiser_matches_unet_called_by_hand(pipe, conds, x):
    positive, negative = conds
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    sigma = float(scheduler.sigmas[0])
    eps_c = unet_by_hand(pipe.unet, scheduler, x, sigma, positive)
    eps_u = unet_by_hand(pipe.unet, scheduler, x, sigma, negative)
    expected = x - sigma * (eps_u + 4.0 * (eps_c - eps_u))
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(4.0))
    out = denoiser(x, torch.full((2,), sigma), cond=positive, uncond=negative)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-4)
    assert torch.allclose(denoiser.last_predictions["cond"], x - sigma * eps_c, atol=1e-4)


@torch.no_grad()
def test_v_prediction_conversion(pipe, conds, x):
    positive, _ = conds
    sigma = torch.full((2,), 2.0)
    eps_model = GuidedDenoiser(pipe.unet, pipe.scheduler, prediction_type="epsilon")
    v_model = GuidedDenoiser(pipe.unet, pipe.scheduler, prediction_type="v_prediction")
    out_v = v_model(x, sigma, cond=positive)
    eps_model(x, sigma, cond=positive)
    raw = (x - eps_model.last_predictions["cond"]) / 2.0  # the UNet output, read as v below
    assert torch.allclose(out_v, x / 5 - 2 / 5**0.5 * raw, atol=1e-5)


@torch.no_grad()
def test_tpg_hooks_touch_only_perturbed_rows(pipe, conds, x):
    positive, negative = conds
    sigma = torch.full((2,), 3.0)
    plain = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0))
    plain(x, sigma, cond=positive, uncond=negative)
    guided = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(2.0), seed=1)
    guided(x, sigma, cond=positive, uncond=negative)
    assert guided.last_branches == ("uncond", "cond", "tpg", "pag")
    for branch in ("uncond", "cond"):
        assert torch.allclose(guided.last_predictions[branch], plain.last_predictions[branch], atol=1e-5)
    for branch in ("tpg", "pag"):
        assert not torch.allclose(guided.last_predictions[branch], plain.last_predictions["cond"], atol=1e-3)


class IdentityPermutations(TokenPermutations):
    def get(self, block, tokens, device, images):
        return torch.arange(tokens, device=device)


@torch.no_grad()
def test_identity_permutation_makes_tpg_term_vanish(pipe, conds, x):
    positive, negative = conds
    sigma = torch.full((2,), 3.0)
    cfg_only = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0))(x, sigma, cond=positive, uncond=negative)
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0))
    denoiser.permutations = IdentityPermutations(0)
    out = denoiser(x, sigma, cond=positive, uncond=negative)
    assert torch.allclose(denoiser.last_predictions["tpg"], denoiser.last_predictions["cond"], atol=1e-5)
    assert torch.allclose(out, cfg_only, atol=1e-4)


@torch.no_grad()
def test_softpag_beta_one_on_all_heads_equals_pag(pipe, conds, x):
    positive, negative = conds
    sigma = torch.full((2,), 3.0)
    pag = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), pag=PAG(3.0))(x, sigma, cond=positive, uncond=negative)
    heads = list(range(pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads))
    soft = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), pag=PAG(3.0, beta=1.0, heads=heads))
    assert torch.allclose(soft(x, sigma, cond=positive, uncond=negative), pag, atol=1e-5)
    softer = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), pag=PAG(3.0, beta=0.5))
    assert not torch.allclose(softer(x, sigma, cond=positive, uncond=negative), pag, atol=1e-4)


@torch.no_grad()
def test_softpag_beta_zero_is_plain_attention(pipe, conds, x):
    positive, _ = conds
    sigma = torch.full((2,), 3.0)
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, pag=PAG(3.0, beta=0.0, heads=[0, 1]))
    out = denoiser(x, sigma, cond=positive)
    assert torch.allclose(out, denoiser.last_predictions["cond"], atol=1e-5)


@torch.no_grad()
def test_same_seed_same_tpg_output_other_seed_differs(pipe, conds, x):
    positive, negative = conds
    sigma = torch.full((2,), 3.0)

    def run(seed):
        return GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), seed=seed)(
            x, sigma, cond=positive, uncond=negative
        )

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


@torch.no_grad()
def test_cfg_tpg_nag_is_one_unet_call_with_three_row_groups(pipe, conds, x):
    positive, negative = conds
    with rows_seen(pipe.unet) as rows:
        denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0))
        denoiser(x, torch.full((2,), 3.0), cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)
    assert rows == [6]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_unet_restored_after_exception_inside_the_unet(pipe, conds, x, error):
    positive, negative = conds
    before = unet_snapshot(pipe.unet)
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(2.0), nag=NAG(3.0))

    def explode(module, args):
        raise error("injected")

    handle = pipe.unet.mid_block.register_forward_pre_hook(explode)
    try:
        with pytest.raises(error):
            with torch.no_grad():
                denoiser(x, torch.full((2,), 3.0), cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)
    finally:
        handle.remove()
    assert unet_snapshot(pipe.unet) == before


def test_hooks_session_installs_once_and_restores(pipe, conds, x):
    positive, negative = conds
    before = unet_snapshot(pipe.unet)
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0))
    with denoiser.hooks(), torch.no_grad():
        inside = unet_snapshot(pipe.unet)
        denoiser(x, torch.full((2,), 3.0), cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)
        assert unet_snapshot(pipe.unet) == inside
    assert inside != before
    assert unet_snapshot(pipe.unet) == before


@torch.no_grad()
def test_intervals_drop_rows(pipe, conds, x):
    positive, negative = conds
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    denoiser = GuidedDenoiser(
        pipe.unet, pipe.scheduler, cfg=CFG(5.0, interval=(0.0, 0.5)), tpg=TPG(3.0, interval=(0.25, 1.0)), sigmas=sigmas
    )
    with rows_seen(pipe.unet) as rows:
        for sigma in sigmas[:-1]:
            denoiser(x, sigma.expand(2), cond=positive, uncond=negative)
    # step 0: uncond + cond; steps 1: uncond + cond + tpg; steps 2-3: cond + tpg
    assert rows == [4, 6, 4, 4]
    sigma_interval = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0, interval=Interval(sigma_low=1.5, sigma_high=6.0)))
    assert sigma_interval.active_branches(5.0) == ("uncond", "cond")
    assert sigma_interval.active_branches(1.0) == ("cond",)


@torch.no_grad()
@pytest.mark.parametrize("max_rows", [1, 3, 4])
def test_memory_mode_matches_one_call(pipe, conds, x, max_rows):
    positive, negative = conds
    settings = dict(cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(2.0), nag=NAG(3.0), seed=4)
    sigma = torch.full((2,), 3.0)
    args = dict(cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)
    one_call = GuidedDenoiser(pipe.unet, pipe.scheduler, **settings)(x, sigma, **args)
    with rows_seen(pipe.unet) as rows:
        split = GuidedDenoiser(pipe.unet, pipe.scheduler, max_batch_rows=max_rows, **settings)(x, sigma, **args)
    assert max(rows) <= max_rows and sum(rows) == 8
    assert torch.allclose(split, one_call, atol=1e-4)


def test_bad_arguments_name_the_parameter(pipe, conds, x):
    positive, _ = conds
    before = unet_snapshot(pipe.unet)
    with pytest.raises(ValueError, match="tpg_applied_layers_index"):
        GuidedDenoiser(pipe.unet, pipe.scheduler, tpg=TPG(3.0, layers="d99"))
    with pytest.raises(ValueError, match="selected_heads"):
        GuidedDenoiser(pipe.unet, pipe.scheduler, pag=PAG(3.0, heads=[0, 99]))
    with pytest.raises(ValueError, match="max_batch_rows"):
        GuidedDenoiser(pipe.unet, pipe.scheduler, max_batch_rows=0)
    with pytest.raises(ValueError, match="prediction_type"):
        GuidedDenoiser(pipe.unet, pipe.scheduler, prediction_type="flow")
    with pytest.raises(ValueError, match="uncond"):
        GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0))(x, torch.full((2,), 1.0), cond=positive)
    with pytest.raises(ValueError, match="interval"):
        GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0, interval=(0.0, 0.5)))
    assert unet_snapshot(pipe.unet) == before


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: CFG(-1.0), "guidance_scale"),
        (lambda: CFG(5.0, rescale=1.5), "guidance_rescale"),
        (lambda: TPG(-0.5), "tpg_scale"),
        (lambda: TPG(3.0, layers=[]), "tpg_applied_layers_index"),
        (lambda: TPG(3.0, layers="q1"), "tpg_applied_layers_index"),
        (lambda: PAG(-1.0), "pag_scale"),
        (lambda: PAG(3.0, beta=1.5), "beta"),
        (lambda: PAG(3.0, heads=[-1]), "selected_heads"),
        (lambda: NAG(0.5), "nag_scale"),
        (lambda: NAG(3.0, tau=0.0), "nag_tau"),
        (lambda: NAG(3.0, alpha=1.5), "nag_alpha"),
        (lambda: NAG(3.0, interval=(0.0, 1.5)), "nag_interval"),
        (lambda: TPG(3.0, interval=(0.6, 0.2)), "tpg_interval"),
    ],
)
def test_term_validation_names_parameter(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_conditioning_checks_batch():
    with pytest.raises(ValueError, match="batch size"):
        Conditioning(torch.zeros(2, 3, 4), torch.zeros(1, 4), torch.zeros(2, 6))
