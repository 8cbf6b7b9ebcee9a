"""Guidance acts only on the calls it belongs to: threads, nested and overlapping hooks, exits in any order."""

import threading
from contextlib import ExitStack

import pytest
import torch

from conftest import generate, unet_snapshot
from dualguide import CFG, NAG, PAG, TPG, GuidedDenoiser, StableDiffusionXLTPGPipeline
from dualguide.conditioning import encode_sdxl
from dualguide.hooks import installed_count

SIGMAS = torch.tensor([8.0, 3.0, 1.0, 0.0])


@pytest.fixture(scope="module")
def conds(pipe):
    positive, negative = encode_sdxl(pipe, ["a red circle", "a blue square"], size=(32, 32), with_negative=True)
    return positive, negative


def start_noise(seed=3):
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]


def denoiser(pipe, **terms):
    return GuidedDenoiser(pipe.unet, pipe.scheduler, seed=5, **terms)


SETTINGS = {
    "dual": dict(cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0)),
    "pag": dict(cfg=CFG(4.0), pag=PAG(2.0), nag=NAG(4.0, alpha=1.0)),
    "plain": dict(cfg=CFG(5.0)),
}


@torch.no_grad()
def euler(model, conds, step_barrier=None, fail_at=None):
    """Three Euler steps; optionally waits on a barrier before every model call, or raises at a step."""
    positive, negative = conds
    x = start_noise()
    for i in range(len(SIGMAS) - 1):
        if step_barrier is not None:
            step_barrier.wait(timeout=60)
        if i == fail_at:
            raise RuntimeError("injected failure")
        sigma = SIGMAS[i].expand(2)
        denoised = model(x, sigma, cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)
        x = x + (x - denoised) / SIGMAS[i] * (SIGMAS[i + 1] - SIGMAS[i])
    return x


def test_pipeline_inside_another_denoisers_hooks_is_unchanged(pipe):
    alone = generate(pipe, tpg_scale=0.0, guidance_scale=5.0)
    other = denoiser(pipe, **SETTINGS["dual"], pag=PAG(3.0))
    with other.hooks():
        inside = generate(pipe, tpg_scale=0.0, guidance_scale=5.0)
    assert torch.equal(inside, alone)


def test_two_threads_in_lockstep_get_their_own_results(pipe, conds):
    expected = {name: euler(denoiser(pipe, **SETTINGS[name]), conds) for name in ("dual", "plain")}
    before = unet_snapshot(pipe.unet)
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def work(name):
        try:
            model = denoiser(pipe, **SETTINGS[name])
            with model.hooks():
                results[name] = euler(model, conds, step_barrier=barrier)
        except BaseException as error:  # reported below, the test must not hang
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(name,)) for name in ("dual", "plain")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for name in ("dual", "plain"):
        assert torch.equal(results[name], expected[name]), name
    assert not torch.allclose(results["dual"], results["plain"], atol=1e-3)
    assert unet_snapshot(pipe.unet) == before


def test_a_thread_that_raises_mid_run_leaves_the_other_and_the_unet_intact(pipe, conds):
    expected = euler(denoiser(pipe, **SETTINGS["pag"]), conds)
    before = unet_snapshot(pipe.unet)
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def work(name, fail_at):
        try:
            model = denoiser(pipe, **SETTINGS[name])
            with model.hooks():
                results[name] = euler(model, conds, step_barrier=barrier, fail_at=fail_at)
        except RuntimeError as error:
            errors.append((name, str(error)))
            barrier.abort()

    failing = threading.Thread(target=work, args=("dual", 1))
    healthy = threading.Thread(target=work, args=("pag", None))
    failing.start()
    healthy.start()
    failing.join(timeout=300)
    healthy.join(timeout=300)
    assert errors and errors[0] == ("dual", "injected failure")
    if "pag" in results:  # finished before the barrier was aborted
        assert torch.equal(results["pag"], expected)
    assert torch.equal(euler(denoiser(pipe, **SETTINGS["pag"]), conds), expected)
    assert unet_snapshot(pipe.unet) == before


def test_overlapping_hooks_exit_in_any_order_and_restore_exactly(pipe, conds):
    before = unet_snapshot(pipe.unet)
    first, second = denoiser(pipe, **SETTINGS["dual"]), denoiser(pipe, **SETTINGS["pag"])
    alone = euler(denoiser(pipe, **SETTINGS["pag"]), conds)
    outer, inner = first.hooks(), second.hooks()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the first one leaves before the second
    assert torch.equal(euler(second, conds), alone)
    inner.__exit__(None, None, None)
    assert unet_snapshot(pipe.unet) == before
    assert all(installed_count(module) == 0 for module in pipe.unet.modules())


def test_nested_hooks_of_one_denoiser_and_of_many(pipe, conds):
    before = unet_snapshot(pipe.unet)
    models = [denoiser(pipe, **SETTINGS[name]) for name in ("dual", "pag", "dual")]
    expected = euler(denoiser(pipe, **SETTINGS["dual"]), conds)
    with ExitStack() as stack:
        for model in models:
            stack.enter_context(model.hooks())
            stack.enter_context(model.hooks())
        assert torch.equal(euler(models[2], conds), expected)
    assert unet_snapshot(pipe.unet) == before


def test_pipelines_sharing_components_in_two_threads(components, pipe):
    """Two pipeline objects over the same weights (each with its own scheduler), in two threads at once."""
    settings = {
        "a": dict(tpg_scale=3.0, do_nag=True, guidance_scale=5.0),
        "b": dict(tpg_scale=0.0, guidance_scale=3.0, pag_scale=2.0),
    }
    expected = {name: generate(pipe, **kwargs) for name, kwargs in settings.items()}
    before = unet_snapshot(pipe.unet)
    results, errors = {}, []

    def work(name):
        try:
            scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
            own = StableDiffusionXLTPGPipeline(**{**components, "scheduler": scheduler}, add_watermarker=False)
            own.set_progress_bar_config(disable=True)
            results[name] = generate(own, **settings[name])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(name,)) for name in settings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for name in settings:
        assert torch.equal(results[name], expected[name]), name
    assert unet_snapshot(pipe.unet) == before


def test_one_denoiser_in_two_threads_at_once_is_refused(pipe, conds):
    positive, negative = conds
    model = denoiser(pipe, **SETTINGS["dual"])
    inside, release = threading.Event(), threading.Event()
    errors = []

    def block_mid_call(module, args):
        inside.set()
        release.wait(timeout=60)

    handle = pipe.unet.mid_block.register_forward_pre_hook(block_mid_call)
    try:
        thread = threading.Thread(target=lambda: euler(model, conds))
        thread.start()
        assert inside.wait(timeout=60)
        handle.remove()
        try:
            with torch.no_grad():
                model(start_noise(), SIGMAS[0].expand(2), cond=positive, uncond=negative, nag_negative=negative.prompt_embeds)
        except RuntimeError as error:
            errors.append(str(error))
        release.set()
        thread.join(timeout=300)
    finally:
        handle.remove()
        release.set()
    assert errors and "one denoiser per thread" in errors[0]


def test_processor_replaced_inside_a_session_is_wrapped_again_and_kept(pipe, conds):
    from diffusers.models.attention_processor import AttnProcessor2_0

    original = dict(pipe.unet.attn_processors)
    model = denoiser(pipe, **SETTINGS["dual"])
    expected = euler(denoiser(pipe, **SETTINGS["dual"]), conds)
    try:
        with model.hooks():
            pipe.unet.set_attn_processor(AttnProcessor2_0())  # as load_ip_adapter or a user would
            replaced = dict(pipe.unet.attn_processors)
            assert torch.equal(euler(model, conds), expected)  # NAG still applied
        assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
        assert {k: id(v) for k, v in pipe.unet.attn_processors.items()} == {k: id(v) for k, v in replaced.items()}
    finally:
        pipe.unet.set_attn_processor(original)
