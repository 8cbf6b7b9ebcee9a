"""Host work of guided calls: nothing installed per call inside a hooks() block, the UNet's tree walked once
per model, and few Python calls per step beyond the CFG path's (issue 22: at most 1.15x with TPG and NAG)."""

import cProfile
import pstats

import pytest
import torch

from dualguide import CFG, NAG, TPG, GuidedDenoiser
from dualguide.conditioning import encode_sdxl
from dualguide.families import SDXL
from dualguide.hooks import installed_count


@pytest.fixture(scope="module")
def conds(pipe):
    return encode_sdxl(pipe, ["a red circle"], size=(32, 32), with_negative=True)


@pytest.fixture
def x():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))


def python_calls(function) -> int:
    profile = cProfile.Profile()
    profile.runcall(function)
    return pstats.Stats(profile).total_calls


@torch.no_grad()
def test_a_call_inside_a_hooks_block_installs_nothing(pipe, conds, x):
    positive, negative = conds
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0, layers="d6"), nag=NAG(3.0))
    block = SDXL.blocks(pipe.unet)["d6"][1]
    attn = next(iter(SDXL.nag_attentions(pipe.unet)))
    seen = []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append((installed_count(block), installed_count(attn))))
    try:
        with denoiser.hooks():
            denoiser(x, torch.tensor([5.0]), cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)
        denoiser(x, torch.tensor([5.0]), cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)
    finally:
        handle.remove()
    assert seen == [(1, 1), (1, 1)]  # the block's share only, within the block and without it
    assert installed_count(block) == installed_count(attn) == 0


def test_the_module_tree_is_walked_once_per_model(unet, monkeypatch):
    blocks, tokens, attns, sites = SDXL.blocks(unet), SDXL.token_counts(unet, 16, 16), SDXL.nag_attentions(unet), SDXL.hook_sites(unet)

    def refuse(*args, **kwargs):
        raise AssertionError("walked the module tree again")

    monkeypatch.setattr(unet, "named_modules", refuse)
    monkeypatch.setattr(unet, "modules", refuse)
    again = SDXL.blocks(unet)
    again.clear()  # a caller's copy: the model's record stays whole
    assert SDXL.blocks(unet) == blocks and SDXL.token_counts(unet, 16, 16) == tokens
    assert SDXL.nag_attentions(unet) == attns and SDXL.hook_sites(unet) == sites


@torch.no_grad()
def test_tpg_and_nag_add_few_python_calls_per_step(pipe, conds, x):
    positive, negative = conds
    sigma = torch.tensor([5.0])

    def calls_per_step(**terms) -> int:
        denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), **terms)
        with denoiser.hooks():
            step = lambda: denoiser(x, sigma, cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)  # noqa: E731
            step()
            return python_calls(step)

    cfg = calls_per_step()
    assert calls_per_step(tpg=TPG(3.0), nag=NAG(3.0)) <= 1.15 * cfg
