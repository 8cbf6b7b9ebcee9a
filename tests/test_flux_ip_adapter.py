"""IP-Adapter on the guided Flux pipelines and Chroma: a tiny adapter built in code; with the terms off ours equals
diffusers' FluxPipeline / FluxImg2ImgPipeline / FluxKontextPipeline / ChromaPipeline (with and without true CFG, the negative image embeds on the
uncond row) in one transformer call per step; scale 0 equals no adapter; TPG with IP-Adapter (its shared prefix rows
included) in one call; PAG and NAG with IP-Adapter refused before any transformer call."""

from typing import Dict, Optional

import pytest
import torch
from diffusers import ChromaPipeline, FluxImg2ImgPipeline, FluxKontextPipeline, FluxPipeline

from counting import rows_seen
from dualguide import ChromaTPGPipeline, FluxKontextTPGPipeline, FluxTPGImg2ImgPipeline, FluxTPGPipeline
from dualguide.tiny import build_tiny_chroma, build_tiny_flux

TEXT, POOLED = 96, 32  # the tiny T5's width (joint_attention_dim), the pooled width (the image embeds' width)
IMAGE_TOKENS = 4  # the adapter's image tokens per image embed
STEPS = 3


def ip_adapter_state_dict(transformer, seed: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """A random IP-Adapter for ``transformer`` (Flux or Chroma) in the layout ``_load_ip_adapter_weights`` reads: the
    image projection (a linear map of the ``POOLED``-wide image embed to ``IMAGE_TOKENS`` text-width tokens, then a LayerNorm) and each double block's
    image key / value projections (text width to the attention width)."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    width, text = config.num_attention_heads * config.attention_head_dim, config.joint_attention_dim

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    projections = {}
    for index in range(len(transformer.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            projections[f"{index}.{name}.weight"], projections[f"{index}.{name}.bias"] = random(width, text), random(width)
    image_proj = {"proj.weight": random(IMAGE_TOKENS * text, POOLED), "proj.bias": random(IMAGE_TOKENS * text),
                  "norm.weight": 1 + random(text), "norm.bias": random(text)}  # fmt: skip
    return {"image_proj": image_proj, "ip_adapter": projections}


def with_ip_adapter(components: dict, seed: int = 7) -> dict:
    components["transformer"]._load_ip_adapter_weights(ip_adapter_state_dict(components["transformer"], seed))
    return components


@pytest.fixture(scope="module")
def dev_components():
    return with_ip_adapter(build_tiny_flux("dev", num_layers=4, num_single_layers=4))


@pytest.fixture(scope="module")
def kontext_components():
    return with_ip_adapter(build_tiny_flux("kontext", num_layers=4, num_single_layers=4))


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def image_embeds(positive: int = 10, negative: int = 11) -> dict:
    """One image embed per side, ``[images, 1, pooled width]`` as diffusers' Flux IP-Adapter test gives them."""
    return dict(ip_adapter_image_embeds=[randn(positive, 1, 1, POOLED)], negative_ip_adapter_image_embeds=[randn(negative, 1, 1, POOLED)])


def true_cfg() -> dict:
    return dict(true_cfg_scale=4.0, negative_prompt_embeds=randn(200, 1, 16, TEXT), negative_pooled_prompt_embeds=randn(201, 1, POOLED))


def generate(pipe, scale: Optional[float] = 1.0, seed: int = 0, **arguments):
    """A short latent run of 32 x 32; ``scale``: the adapters' scale (None: no adapter loaded)."""
    if scale is not None:
        pipe.set_ip_adapter_scale(scale)
    arguments = {**dict(output_type="latent", max_sequence_length=16, height=32, width=32), **arguments}
    return pipe(**arguments, generator=torch.Generator().manual_seed(seed)).images


def run(pipe, scale: Optional[float] = 1.0, seed: int = 0, **kwargs):
    """``generate`` with a Flux prompt's embeds, 3 steps, the distilled guidance 3.5."""
    arguments = dict(prompt_embeds=randn(100, 1, 16, TEXT), pooled_prompt_embeds=randn(101, 1, POOLED), num_inference_steps=STEPS,
                     guidance_scale=3.5)  # fmt: skip
    return generate(pipe, scale, seed, **{**arguments, **kwargs})


IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_ip_adapter_equals_diffusers_in_one_call_per_step(dev_components, cfg):
    options = {**image_embeds(), **(true_cfg() if cfg else {})}
    pipe = FluxTPGPipeline(**dev_components)
    with rows_seen(pipe.transformer) as rows:
        ours = run(pipe, **options)
    assert rows == [2 if cfg else 1] * STEPS
    theirs = run(FluxPipeline(**dev_components), **options)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (theirs - run(FluxPipeline(**dev_components), scale=0.0, **options)).abs().max() > 1e-3  # the adapter acted


def test_negative_image_embeds_act_on_the_uncond_row_only(dev_components):
    pipe = FluxTPGPipeline(**dev_components)
    base = run(pipe, **image_embeds(), **true_cfg())
    assert (run(pipe, **image_embeds(negative=12), **true_cfg()) - base).abs().max() > 1e-3
    assert torch.equal(run(pipe, **image_embeds()), run(pipe, **image_embeds(negative=12)))  # no CFG: no uncond row


def test_scale_zero_equals_no_adapter(dev_components):
    plain = FluxTPGPipeline(**build_tiny_flux("dev", num_layers=4, num_single_layers=4))  # the same seeded weights
    ours = run(FluxTPGPipeline(**dev_components), scale=0.0, **image_embeds(), **true_cfg())
    assert (ours - run(plain, scale=None, **true_cfg())).abs().max() <= 1e-5


def test_image_tasks_equal_diffusers(dev_components, kontext_components):
    options = {**image_embeds(), **true_cfg()}
    img2img = dict(image=IMAGE, strength=0.7, num_inference_steps=4)
    ours = run(FluxTPGImg2ImgPipeline(**dev_components), **img2img, **options)
    assert (ours - run(FluxImg2ImgPipeline(**dev_components), **img2img, **options)).abs().max() <= 1e-4
    kontext = dict(image=IMAGE, max_area=32 * 32, _auto_resize=False, guidance_scale=2.5)
    ours = run(FluxKontextTPGPipeline(**kontext_components), **kontext, **options)
    assert (ours - run(FluxKontextPipeline(**kontext_components), **kontext, **options)).abs().max() <= 1e-4


def test_chroma_cfg_equals_diffusers_in_one_call_per_step():
    pipe = ChromaTPGPipeline(**with_ip_adapter(build_tiny_chroma()))
    mask = torch.ones(1, 16)
    options = dict(prompt_embeds=randn(100, 1, 16, TEXT), prompt_attention_mask=mask, negative_prompt_embeds=randn(200, 1, 16, TEXT),
                   negative_prompt_attention_mask=mask, guidance_scale=4.0, num_inference_steps=2, **image_embeds())  # fmt: skip
    with rows_seen(pipe.transformer) as rows:
        ours = generate(pipe, **options)
    assert rows == [2, 2]  # [uncond, cond]
    theirs = generate(ChromaPipeline(**pipe.components), **options)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (theirs - generate(ChromaPipeline(**pipe.components), **{**options, **image_embeds(negative=12)})).abs().max() > 1e-3


@pytest.mark.parametrize("share_prefix", [True, False])
def test_tpg_with_ip_adapter_in_one_call(dev_components, share_prefix):
    pipe = FluxTPGPipeline(**dev_components)
    options = dict(tpg_scale=3.0, tpg_applied_layers_index=["j2", "j3"], **image_embeds(), **true_cfg())
    with rows_seen(pipe.transformer) as rows:
        guided = run(pipe, share_prefix=share_prefix, **options)
    assert rows == [3] * STEPS  # [uncond, cond, tpg]
    assert (guided - run(pipe, **image_embeds(), **true_cfg())).abs().max() > 1e-3
    if not share_prefix:
        assert (guided - run(pipe, share_prefix=True, **options)).abs().max() <= 1e-5


@pytest.mark.parametrize("term", ["pag", "nag"])
def test_pag_and_nag_with_ip_adapter_refused_before_any_call(dev_components, term):
    pipe = FluxTPGPipeline(**dev_components)
    options = dict(pag_scale=3.0, pag_applied_layers_index=["j2"]) if term == "pag" else dict(
        nag_scale=3.0, nag_negative_prompt_embeds=randn(300, 1, 16, TEXT), nag_negative_pooled_prompt_embeds=randn(301, 1, POOLED))
    with rows_seen(pipe.transformer) as rows, pytest.raises(ValueError, match=f"ip_adapter_image_embeds with {term.upper()}"):
        run(pipe, **options, **image_embeds())
    assert rows == []
