"""A long run stays flat: many guided calls on the embedded model (CFG + TPG + NAG, every per-call cache in use)
leave no hooks, processors, denoisers, tensors or cache entries behind, and the process's memory does not grow."""

import gc
import os
import weakref
from collections import Counter

import psutil
import pytest
import torch

from dualguide import hooks
from dualguide.families.unet import _structures
from dualguide.toy.model import EMBEDDED_DIR, load_pipeline

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(EMBEDDED_DIR, "model_index.json")), reason="no embedded model")

WARM, WINDOW = 10, 10  # calls before measuring; calls per measured window (two windows)


def _call(pipe, index: int):
    return pipe(
        prompt=[f"a red circle number {index}"], generator=[torch.Generator().manual_seed(index)], num_images_per_prompt=1,
        height=32, width=32, num_inference_steps=1, guidance_scale=5.0, tpg_scale=3.0, do_nag=True, nag_negative_prompt="blue",
    ).images  # fmt: skip


def _installed(unet):
    """Every hook and attention processor on the UNet, by module name."""
    hooked = {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in unet.named_modules()}
    return hooked, dict(unet.attn_processors)


def _objects() -> Counter:
    """Live objects by type name (gc-tracked), after a collection; holds none of them."""
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects())


def _tensor_bytes() -> int:
    gc.collect()
    return sum(o.untyped_storage().nbytes() for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type != "meta")


def _cache_sizes(pipe) -> tuple:
    structure = _structures[pipe.unet]
    live = sum(bool(entries) for entries in hooks._installed.values())
    return len(structure.token_counts), len(structure.prefixes), len(hooks._installed), live


def test_many_calls_leave_nothing_behind_and_memory_stays_flat(one_thread):
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    original = _installed(pipe.unet)
    for index in range(WARM):
        _call(pipe, index)
        assert _installed(pipe.unet) == original, f"call {index} left hooks or processors on the UNet"
    process = psutil.Process()
    counts, tensors, caches, rss = [_objects()], _tensor_bytes(), _cache_sizes(pipe), process.memory_info().rss
    previous = weakref.ref(pipe._last_denoiser)
    for index in range(WARM, WARM + 2 * WINDOW):
        _call(pipe, index)
        assert _installed(pipe.unet) == original, f"call {index} left hooks or processors on the UNet"
        gc.collect()
        assert previous() is None, f"the denoiser of call {index - 1} is still alive after call {index}"
        previous = weakref.ref(pipe._last_denoiser)
        assert _cache_sizes(pipe) == caches, f"a cache grew at call {index}"
        if (index + 1 - WARM) % WINDOW == 0:
            counts.append(_objects())
    # an object kept per call grows its type by >= WINDOW in each window; a one-time growth (pybind11 and torch
    # register a weakref per type they meet first) shows in one window only
    grown = {name: [later[name] - earlier[name] for earlier, later in zip(counts, counts[1:])] for name in counts[-1]}
    assert not {name: growth for name, growth in grown.items() if min(growth) >= WINDOW}, grown
    assert _tensor_bytes() - tensors < 2**20, "tensors kept between calls"
    growth = (process.memory_info().rss - rss) / rss
    assert growth < 0.05, f"RSS grew {100 * growth:.1f} % over {2 * WINDOW} calls"
