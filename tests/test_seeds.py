"""Per-image seeds: with one generator per image, each image equals the image generated alone with its generator."""

import pytest
import torch

from conftest import SIZE

PROMPTS = ["a red circle", "a blue square"]
SEEDS = [5, 6]


def run(pipe, prompt, generator, **kwargs):
    settings = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent", guidance_scale=5.0,
                    tpg_scale=3.0, do_nag=True)  # fmt: skip
    settings.update(kwargs)
    return pipe(prompt, generator=generator, **settings).images


def generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", None])
def test_each_image_equals_the_image_made_alone(pipe, sampler):
    batch = run(pipe, PROMPTS, generators(SEEDS), sampler=sampler)
    assert pipe._last_denoiser.permutations.per_image
    alone = torch.cat([run(pipe, prompt, generators([seed])[0], sampler=sampler) for prompt, seed in zip(PROMPTS, SEEDS)])
    print(f"{sampler}: max |batch - alone| = {float((batch - alone).abs().max()):.2e}")
    assert torch.allclose(batch, alone, atol=1e-4, rtol=1e-4)


def test_images_per_prompt_with_their_own_generators(pipe):
    batch = run(pipe, PROMPTS[0], generators(SEEDS), num_images_per_prompt=2, sampler="euler_ancestral")
    second = run(pipe, PROMPTS[0], generators(SEEDS[1:])[0], sampler="euler_ancestral")
    assert torch.allclose(batch[1:], second, atol=1e-4, rtol=1e-4)


def test_one_generator_keeps_one_shared_permutation_stream(pipe):
    first = run(pipe, PROMPTS, torch.Generator().manual_seed(5), sampler="euler")
    assert not pipe._last_denoiser.permutations.per_image
    again = run(pipe, PROMPTS, torch.Generator().manual_seed(5), sampler="euler")
    assert torch.equal(first, again)
