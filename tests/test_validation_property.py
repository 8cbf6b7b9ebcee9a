"""A property of the validation layer: any call of the SDXL pipeline either raises ValueError / TypeError naming
one of the arguments it was given, before any UNet call, or runs to finite latents.

The arguments are drawn from small, hostile pools (NaN, infinity, numpy scalars, bools, huge numbers, wrong
types, reversed intervals, wrong batches); the tiny model at 32 px and one or two steps keeps it fast.
"""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import SIZE

NAN, INF = math.nan, math.inf
# Each argument: (values a caller may mean, hostile values). A call takes some of the first and up to two of the second.
SCALE = ([0, 1, 2.5, np.float32(2), np.int64(3)], [-1, -0.5, NAN, INF, -INF, 1e30, 1e300, True, np.float64(NAN), np.bool_(True), "3", [1.0]])
FRACTION = ([0, 0.5, 1, np.float32(0.25)], [-0.1, 1.5, NAN, INF, True, "0.5", (0.5,)])
LAYERS = (["d6-d23", "u0-u3", "m0", "d0,u35", ["d0", "u1"]], ["d99", "u36", "x", "", "d3-d1", ["d99"], [1, 2], [], 5, None])
INTERVAL = ([None, (0, 1), (0.2, 0.6), [0.0, 0.5]], [(0.6, 0.2), (0.5, 0.5), (-0.5, 0.5), (0, 2), (0,), (0, 0.5, 1), (NAN, 1), "0:0.5", 0.5])
SIZE_ = ([SIZE, 16, 48, np.int64(SIZE), None], [33, 0, -32, 32.0, True, "32", 2**40])
NEGATIVE = ([None, "blurry", ["blurry"]], [["a", "b", "c"], [], 0, [None]])
ARGUMENTS = {
    "prompt": (["a red circle", "", ["a red circle", "a blue square"]], [[], ["a", 3], None, 3, b"a"]),
    "negative_prompt": NEGATIVE,
    "nag_negative_prompt": NEGATIVE,
    "num_inference_steps": ([1, 2, np.int64(1)], [0, -1, 1.5, np.float32(1), True, None, "1", 10**30]),
    "num_images_per_prompt": ([1, 2, np.int8(1)], [0, -1, 1.0, None, 10**30]),
    "height": SIZE_,
    "width": SIZE_,
    "guidance_scale": SCALE,
    "guidance_rescale": FRACTION,
    "tpg_scale": SCALE,
    "pag_scale": ([None, *SCALE[0]], SCALE[1]),
    "nag_scale": ([None, 1, 3.0, np.float32(5)], [0.5, *SCALE[1]]),
    "nag_tau": ([None, 2.5, np.float32(1e-3), 1e6], [0, *SCALE[1]]),
    "nag_alpha": ([None, *FRACTION[0]], FRACTION[1]),
    "nag_end": ([None, *FRACTION[0]], FRACTION[1]),
    "do_nag": ([None, True, False, np.bool_(True)], [1, "yes", 0.0]),
    "tpg_applied_layers_index": LAYERS,
    "pag_applied_layers_index": LAYERS,
    "cfg_interval": INTERVAL,
    "tpg_interval": INTERVAL,
    "pag_interval": INTERVAL,
    "nag_interval": INTERVAL,
    "sampler": ([None, "euler", "euler_ancestral", "dpmpp_2m"], ["nope", "", "EULER", 3]),
    "sigma_schedule": ([None, "karras", "exponential", "model"], ["nope", "", 1.0]),
    "sigma_min": ([None, 0.1, 1.0], [0, -1, NAN, INF, 50.0]),
    "sigma_max": ([None, 10.0, 14.6], [0.05, INF, NAN, -1, 1e300]),
    "sigmas": ([None, [14.6, 1.0], [5.0, 0.5, 0.0]], [[], [NAN], [-1.0], [1.0, 5.0], [1e300, 1.0], "1,0"]),
    "timesteps": ([None, [999, 500], [500]], [[], [2000], [-1], [500, 999], [1e30]]),
    "denoising_end": ([None, 0.5, 1.0], [0, 1.5, NAN]),
    "eta": ([0, 0.5], [-1, NAN, 1e300]),
    "max_batch_rows": ([None, 1, 3], [0, -1, 1.5, 10**30]),
    "clip_skip": ([None, 0, 1], [-1, 100, 1.0]),
    "prompt_2": ([None, "a square"], [[], ["a", "b", "c"], 3]),
    "output_type": (["latent"], ["nope", None, 3]),
}
MEANT = st.fixed_dictionaries({}, optional={name: st.sampled_from(pools[0]) for name, pools in ARGUMENTS.items()})
HOSTILE = st.dictionaries(
    st.sampled_from(sorted(ARGUMENTS)), st.integers(0, 1000), max_size=2
).map(lambda picks: {name: ARGUMENTS[name][1][draw % len(ARGUMENTS[name][1])] for name, draw in picks.items()})
CALLS = st.builds(lambda meant, hostile: {**meant, **hostile}, MEANT, HOSTILE)


def named(message: str, names) -> bool:
    """Whether ``message`` names one of ``names`` as a whole word (``nag_tau``, not the ``tau`` of it)."""
    return any(re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) for name in names)


@pytest.fixture(scope="module")
def unet_calls(pipe):
    """The number of UNet forward calls so far, counted by a forward pre-hook for this module's tests."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.usefixtures("one_thread")
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arguments=CALLS)
@example(arguments={"width": 2**40})  # found: torch failed to allocate the latents
@example(arguments={"num_inference_steps": 10**30})  # found: numpy's "Maximum allowed size exceeded", naming nothing
@example(arguments={"num_images_per_prompt": 10**30})
@example(arguments={"guidance_scale": 1e300})  # found: infinite latents
@example(arguments={"do_nag": True, "nag_scale": 1e300})  # found: a float overflow inside the UNet's attention
@example(arguments={"sigmas": [1e300, 1.0]})  # found: NaN latents (sigma squared overflows float32)
@example(arguments={"sampler": "euler", "sigma_schedule": "karras", "sigma_max": 1e30})
def test_any_call_is_refused_by_name_before_the_unet_or_gives_finite_latents(pipe, unet_calls, arguments):
    call = {"prompt": "a red circle", "height": SIZE, "width": SIZE, "num_inference_steps": 1, "output_type": "latent", **arguments}
    before = len(unet_calls)
    try:
        latents = pipe(generator=torch.Generator().manual_seed(0), **call).images
    except (ValueError, TypeError) as error:
        assert len(unet_calls) == before, f"{type(error).__name__} after {len(unet_calls) - before} UNet call(s): {error}"
        assert named(str(error), call), f"the message names none of {sorted(call)}: {error}"
        return
    assert torch.isfinite(latents).all(), f"non-finite latents from {arguments}"
