"""The denoiser runs on the meta device (no weights, no data), so FLOPs of a full-size configuration can be
counted without a GPU: TPG's permutations included; shared prefix rows cost less than whole rows."""

import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from dualguide import CFG, NAG, PAG, TPG, Conditioning, GuidedDenoiser
from dualguide.tiny import tiny_unet_config


def flops(denoiser, x, cond, negative):
    counter = FlopCounterMode(display=False)
    with counter:
        out = denoiser(x, torch.full((1,), 5.0, device="meta"), cond=cond, uncond=cond, nag_negative=negative)
    assert out.device.type == "meta" and out.shape == x.shape
    return counter.get_total_flops()


@torch.no_grad()
def test_every_mode_runs_on_the_meta_device_and_rows_cost_what_they_should():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny_unet_config())
    scheduler = EulerDiscreteScheduler()
    width = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    cond = Conditioning(torch.zeros(1, 77, width, device="meta"), torch.zeros(1, pooled, device="meta"), torch.zeros(1, 6, device="meta"))
    negative = torch.zeros(1, 77, width, device="meta")
    x = torch.zeros(1, 4, 16, 16, device="meta")
    modes = {
        "cfg": dict(cfg=CFG(5.0)), "cfg+tpg": dict(cfg=CFG(5.0), tpg=TPG(3.0)), "cfg+pag": dict(cfg=CFG(5.0), pag=PAG(3.0)),
        "cfg+nag": dict(cfg=CFG(5.0), nag=NAG(3.0)), "tpg": dict(tpg=TPG(3.0)),
    }  # fmt: skip
    counts = {name: flops(GuidedDenoiser(unet, scheduler, share_prefix=False, **terms), x, cond, negative) for name, terms in modes.items()}
    assert counts["cfg+tpg"] * 2 == counts["cfg"] * 3  # a third row, the whole UNet
    assert counts["tpg"] == counts["cfg"]  # [cond, tpg]: two rows
    assert counts["cfg"] < counts["cfg+pag"] < counts["cfg+tpg"]  # the PAG row skips its blocks' attention maps
    assert counts["cfg"] < counts["cfg+nag"] < counts["cfg+tpg"]  # NAG: extra attention, no row
    shared = {name: flops(GuidedDenoiser(unet, scheduler, **modes[name]), x, cond, negative) for name in ("cfg", "cfg+tpg", "cfg+pag", "tpg")}
    assert shared["cfg"] == counts["cfg"]  # nothing to share
    assert counts["cfg"] < shared["cfg+tpg"] < counts["cfg+tpg"] and counts["cfg"] < shared["cfg+pag"] < counts["cfg+pag"]
    assert shared["tpg"] < counts["tpg"]  # the TPG row's prefix runs once
