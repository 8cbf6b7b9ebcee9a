"""A scheduler in use by one call, entered by a call from another thread: a RuntimeError at once that names the
scheduler and shows the fix; the running call is unaffected."""

import threading

import pytest
import torch
from PIL import Image

from conftest import SIZE, generate
from dualguide import StableDiffusionXLTPGImg2ImgPipeline, StableDiffusionXLTPGInpaintPipeline, StableDiffusionXLTPGPipeline


def second_call(kind, pipe):
    """A call of another pipeline object over ``pipe``'s components (its scheduler included)."""
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    if kind == "text2img":
        other = StableDiffusionXLTPGPipeline(**pipe.components)
        return lambda: generate(other, tpg_scale=2.0)
    if kind == "img2img":
        return lambda: generate(StableDiffusionXLTPGImg2ImgPipeline.from_pipe(pipe), image=image, strength=0.7)
    mask = Image.new("L", (SIZE, SIZE), 255)
    return lambda: generate(StableDiffusionXLTPGInpaintPipeline.from_pipe(pipe), image=image, mask_image=mask)


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint"])
def test_a_second_thread_on_a_scheduler_in_use_fails_at_once_and_the_first_run_is_unaffected(pipe, kind):
    alone = generate(pipe, num_inference_steps=3)
    inside, release, result = threading.Event(), threading.Event(), {}

    def pause(pipeline, step, timestep, tensors):
        if step == 0:
            inside.set()
            release.wait(timeout=60)
        return {}

    def first():
        result["latents"] = generate(pipe, num_inference_steps=3, callback_on_step_end=pause)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(timeout=60)
        with pytest.raises(RuntimeError) as failure:
            second_call(kind, pipe)()
    finally:
        release.set()
        thread.join()
    message = str(failure.value)
    assert f"pipe.scheduler ({type(pipe.scheduler).__name__}" in message and "another thread" in message
    assert "type(pipe.scheduler).from_config(pipe.scheduler.config)" in message
    assert torch.equal(result["latents"], alone)
    assert torch.equal(generate(pipe, num_inference_steps=3), alone)  # the scheduler is free again


def test_each_thread_with_its_own_scheduler_as_the_message_says(pipe):
    own = type(pipe)(**{**pipe.components, "scheduler": type(pipe.scheduler).from_config(pipe.scheduler.config)})
    results = {}
    threads = [threading.Thread(target=lambda p=p, k=k: results.__setitem__(k, generate(p, tpg_scale=2.0))) for k, p in (("a", pipe), ("b", own))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(results["a"], results["b"])
