"""IP-Adapter under every guidance term: image embeds on every branch row, NAG wrapping the adapter's processor."""

import pytest
import torch

from conftest import SIZE
from dualguide import StableDiffusionXLTPGPipeline, build_tiny_sdxl

EXACT = dict(atol=1e-4, rtol=1e-4)
IMAGE_EMBED_DIM = 8


def tiny_ip_adapter_state_dict(unet, seed=0):
    """Random IP-Adapter weights in the layout diffusers' loader reads (image projection + per-attn2 K/V)."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    channels = unet.config.block_out_channels

    def random(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    image_proj = {"proj.weight": random(4 * cross, IMAGE_EMBED_DIM), "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}  # fmt: skip
    adapter, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[block]
        else:
            hidden = channels[block]
        adapter[f"{key}.to_k_ip.weight"] = random(hidden, cross)
        adapter[f"{key}.to_v_ip.weight"] = random(hidden, cross)
        key += 2
    return {"image_proj": image_proj, "ip_adapter": adapter}


@pytest.fixture(scope="module")
def adapted():
    components = build_tiny_sdxl(seed=0)
    components["unet"]._load_ip_adapter_weights([tiny_ip_adapter_state_dict(components["unet"])])
    return components


def pipeline(cls, components, **options):
    made = cls(**components, add_watermarker=False, **options)
    made.set_progress_bar_config(disable=True)
    return made


def run(pipe, embeds, **kwargs):
    settings = dict(prompt="a red circle", num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent", guidance_scale=5.0)
    settings.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(0), ip_adapter_image_embeds=embeds, **settings).images


def image_embeds(seed=1):
    return [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(seed))]  # [negative, positive]


def test_ip_adapter_with_cfg_equals_diffusers(adapted):
    from diffusers import StableDiffusionXLPipeline

    theirs = run(pipeline(StableDiffusionXLPipeline, adapted), image_embeds())
    ours = run(pipeline(StableDiffusionXLTPGPipeline, adapted), image_embeds(), tpg_scale=0.0)
    assert torch.allclose(ours, theirs, **EXACT)
    other = run(pipeline(StableDiffusionXLTPGPipeline, adapted), image_embeds(seed=2), tpg_scale=0.0)
    assert not torch.allclose(ours, other, atol=1e-3)  # the adapter really conditions the result


def test_ip_adapter_with_pag_equals_diffusers_pag(adapted):
    from diffusers import StableDiffusionXLPAGPipeline

    theirs = run(pipeline(StableDiffusionXLPAGPipeline, adapted, pag_applied_layers=["mid"]), image_embeds(), pag_scale=3.0)
    ours = run(pipeline(StableDiffusionXLTPGPipeline, adapted), image_embeds(), tpg_scale=0.0, pag_scale=3.0)
    assert torch.allclose(ours, theirs, **EXACT)


def test_nag_keeps_the_adapter_and_scale_one_is_exact(adapted):
    ours = pipeline(StableDiffusionXLTPGPipeline, adapted)
    with_nag = run(ours, image_embeds(), tpg_scale=3.0, do_nag=True)
    other_image = run(ours, image_embeds(seed=2), tpg_scale=3.0, do_nag=True)
    assert not torch.allclose(with_nag, other_image, atol=1e-3)
    assert torch.equal(run(ours, image_embeds(), tpg_scale=3.0, do_nag=True, nag_scale=1.0), run(ours, image_embeds(), tpg_scale=3.0))
    assert not torch.allclose(with_nag, run(ours, image_embeds(), tpg_scale=3.0), atol=1e-3)
