"""Flux and Chroma prompt encoding: ``Conditioning``'s per-row guidance scale, ``encode_flux`` and ``encode_chroma``
equal to diffusers' own ``encode_prompt``, the NAG negative by the official NAG Flux pipeline's rule, bad input refused."""

import pytest
import torch

from dualguide.conditioning import Conditioning

# ---------------------------------------------------------------------------------------------------
# Conditioning.guidance


def test_guidance_travels_with_its_rows_and_keeps_float32():
    rows = Conditioning(torch.randn(2, 3, 4), torch.randn(2, 5), guidance=torch.tensor([3.5, 4.0]))
    assert rows.select(slice(1, 2)).guidance.tolist() == [4.0]
    assert rows.repeat(2).guidance.tolist() == [3.5, 3.5, 4.0, 4.0]
    assert Conditioning.cat([rows, rows.select(slice(0, 1))]).guidance.tolist() == [3.5, 4.0, 3.5]
    half = rows.to(dtype=torch.float16)
    assert half.prompt_embeds.dtype == half.pooled_embeds.dtype == torch.float16
    assert half.guidance.dtype == torch.float32 and half.guidance.tolist() == [3.5, 4.0]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Conditioning(torch.randn(2, 3, 4), guidance=torch.tensor([1.0])), "guidance must have the same batch size"),
        (lambda: Conditioning(torch.randn(2, 3, 4), guidance=torch.tensor(1.0)), "guidance must be one scale per row"),
        (
            lambda: Conditioning.cat([Conditioning(torch.randn(1, 3, 4), guidance=torch.ones(1)), Conditioning(torch.randn(1, 3, 4))]),
            "guidance is given for some parts",
        ),
    ],
)
def test_guidance_of_another_batch_is_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()
