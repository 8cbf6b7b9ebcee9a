"""Every registered sampler on the tiny model; seeds; schedules."""

import inspect

import pytest
import torch

import samplers
from conftest import generate


def test_registry_lists_every_k_diffusion_sampler():
    from k_diffusion import sampling

    available = {name[len("sample_") :] for name, f in inspect.getmembers(sampling, inspect.isfunction) if name.startswith("sample_")}
    assert set(samplers.names()) == available


def test_unknown_sampler_and_schedule_list_valid_names():
    with pytest.raises(ValueError, match="sampler must be one of .*euler"):
        samplers.get("eulerr")
    with pytest.raises(ValueError, match="sigma_schedule must be one of model, karras, exponential"):
        samplers.check_schedule_name("linear")


@pytest.mark.parametrize("name", samplers.names())
def test_every_sampler_runs_three_steps(pipe, name):
    out = generate(pipe, sampler=name, num_inference_steps=3, tpg_scale=0.0, sigma_schedule="karras")
    assert out.shape == (1, 4, 16, 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
def test_same_seed_same_output_other_seed_differs(pipe, name):
    first = generate(pipe, seed=11, sampler=name, tpg_scale=3.0)
    again = generate(pipe, seed=11, sampler=name, tpg_scale=3.0)
    other = generate(pipe, seed=12, sampler=name, tpg_scale=3.0)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_schedules(pipe):
    sigmas, scale = samplers.get_sigmas("model", 4, pipe.scheduler)
    assert len(sigmas) == 5 and sigmas[-1] == 0 and scale == pytest.approx(float((sigmas[0] ** 2 + 1) ** 0.5))
    karras, start = samplers.get_sigmas("karras", 4, pipe.scheduler)
    assert karras[0] == pytest.approx(14.6146, abs=1e-3) and karras[-2] == pytest.approx(0.0292, abs=1e-3)
    assert start == pytest.approx(float(karras[0]))
    exponential, _ = samplers.get_sigmas("exponential", 4, pipe.scheduler, sigma_max=5.0)
    assert exponential[0] == pytest.approx(5.0) and torch.all(exponential[:-2] > exponential[1:-1])
    with pytest.raises(ValueError, match="sigma_min"):
        samplers.get_sigmas("karras", 4, pipe.scheduler, sigma_min=3.0, sigma_max=2.0)


def test_karras_on_a_scheduler_without_a_trained_range_needs_both_ends():
    class NoRange:  # neither alphas_cumprod nor flow-matching sigmas
        config: dict = {}

    with pytest.raises(ValueError, match="NoRange has no trained sigma range; give sigma_min and sigma_max"):
        samplers.get_sigmas("karras", 4, NoRange(), sigma_max=10.0)
    sigmas, start = samplers.get_sigmas("karras", 4, NoRange(), sigma_min=0.1, sigma_max=10.0)
    assert sigmas[0] == pytest.approx(10.0) and sigmas[-2] == pytest.approx(0.1) and start == 10.0


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_karras_and_exponential_follow_a_dynamically_shifted_flow_scheduler(schedule):
    # diffusers shifts such a scheduler's range by the call's mu, then spaces it: the k-diffusion schedules must too.
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours_from = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    theirs = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **{f"use_{schedule}_sigmas": True})
    theirs.set_timesteps(6, mu=1.5)
    ours, start = samplers.get_sigmas(schedule, 6, ours_from, scheduler_options={"mu": 1.5})
    assert torch.allclose(ours, theirs.sigmas, atol=1e-6) and start == 1.0
    unshifted, _ = samplers.get_sigmas(schedule, 6, ours_from)
    assert ours[-2] > 2 * unshifted[-2]  # mu 1.5 lifts the smallest sigma e^1.5-fold
