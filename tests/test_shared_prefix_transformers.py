"""Shared prefix rows on the transformer families (SD3's MMDiT, Flux): the TPG / PAG rows run as the cond row through
the embedders and the blocks before their term's first perturbed block. Each branch's transformer output equals the
unshared path within 1e-5 (float32), the prefix modules see the cond row once, and with NAG's extra text rows every
row runs from the start."""

import pytest
import torch

from counting import rows_seen
from dualguide import CFG, NAG, PAG, TPG, GuidedDenoiser
from dualguide.conditioning import Conditioning
from dualguide.tiny import build_tiny_flux, build_tiny_sd3

MODES = {
    "cfg+tpg": dict(cfg=CFG(4.0), tpg=TPG(3.0)),
    "cfg+tpg+pag": dict(cfg=CFG(4.0), tpg=TPG(3.0), pag=PAG(2.0)),
    "pag before tpg": dict(cfg=CFG(4.0), tpg=TPG(3.0, layers="j6"), pag=PAG(2.0, layers="j3")),
}


def layout(family: str):
    """The transformer, its scheduler, a row's Conditioning maker and the latent shape of one tiny layout."""
    generator = torch.Generator().manual_seed(5)
    if family == "sd3":
        parts = build_tiny_sd3("sd3")

        def cond(seed):
            g = torch.Generator().manual_seed(seed)
            return Conditioning(torch.randn(2, 12, 96, generator=g), torch.randn(2, 64, generator=g))

        x = torch.randn(2, 16, 16, 16, generator=generator)
    else:
        parts = build_tiny_flux("dev")

        def cond(seed):
            g = torch.Generator().manual_seed(seed)
            return Conditioning(torch.randn(2, 12, 96, generator=g), torch.randn(2, 32, generator=g), guidance=torch.full((2,), 3.5))

        x = torch.randn(2, 16, 16, 16, generator=generator)
    return parts["transformer"], parts["scheduler"], cond, x


@pytest.fixture(scope="module", params=["sd3", "flux"])
def tiny(request):
    return layout(request.param)


def outputs(tiny, share_prefix, **terms):
    transformer, scheduler, cond, x = tiny
    denoiser = GuidedDenoiser(transformer, scheduler, seed=[1, 2], share_prefix=share_prefix, **terms)
    negative = cond(2)
    with torch.no_grad():
        denoiser(x, torch.full((2,), 0.6), cond=cond(1), uncond=negative, nag_negative=_nag_negative(denoiser, negative))
    return denoiser, denoiser.last_outputs


def _nag_negative(denoiser, negative):
    return negative if denoiser.family.pooled_nag_negative else negative.prompt_embeds


@pytest.mark.parametrize("mode", MODES)
def test_shared_rows_equal_the_unshared_path(tiny, mode):
    denoiser, shared = outputs(tiny, True, **MODES[mode])
    _, whole = outputs(tiny, False, **MODES[mode])
    assert denoiser.shared_prefix_modules  # the mode does share
    assert shared.keys() == whole.keys()
    assert max(float((shared[k] - whole[k]).abs().max()) for k in whole) <= 1e-5


def test_prefix_modules_see_the_cond_row_once(tiny):
    transformer = tiny[0]
    first = transformer.transformer_blocks[0].attn  # inside the block: a hook on the block itself runs before the narrowing
    with rows_seen(first) as shared_rows:
        outputs(tiny, True, **MODES["cfg+tpg+pag"])
    with rows_seen(first) as whole_rows:
        outputs(tiny, False, **MODES["cfg+tpg+pag"])
    assert shared_rows == [4] and whole_rows == [8]  # [uncond, cond] x 2 images instead of 4 branches x 2


def test_nag_extra_text_rows_run_every_row_from_the_start(tiny):
    transformer = tiny[0]
    terms = dict(MODES["cfg+tpg"], nag=NAG(4.0))
    with rows_seen(transformer.transformer_blocks[0].attn) as rows:
        outputs(tiny, True, **terms)
    assert rows == [6]
