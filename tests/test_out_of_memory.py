"""Out-of-memory fallback: a step whose backbone call runs out of memory is rerun in halves, quarters, ... of its rows.

The equality with an unsplit run is measured with a float64 UNet: in float32, CPU kernels round differently for
different batch sizes (~2e-5 on these latents of magnitude ~12, the same as ``share_prefix`` on against off), which
would hide a real difference. In float32 the fallback's run equals the run with its ``max_batch_rows`` set exactly.
"""

import logging
from contextlib import ExitStack, contextmanager

import pytest
import torch
from conftest import SIZE
from counting import rows_seen

from dualguide import StableDiffusionXLTPGPipeline, build_tiny_sdxl
from dualguide.memory import add_line, halved_rows, is_out_of_memory

ROWS = 8  # uncond, cond, TPG and PAG rows of two images
RUN = dict(
    prompt=["a red circle", "a blue square"], guidance_scale=5.0, tpg_scale=3.0, pag_scale=2.0, do_nag=True,
    nag_negative_prompt="blurry", num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent",
)  # fmt: skip
MPS_ERROR = "MPS backend out of memory (MPS allocated: 17.2 GB, other allocations: 1.1 GB, max allowed: 18.1 GB)."


def run(pipe, **kwargs):
    """Latents of two images, each with its own seed (and so its own TPG permutations)."""
    return pipe(generator=[torch.Generator().manual_seed(seed) for seed in (1, 2)], **{**RUN, **kwargs}).images


@pytest.fixture(scope="module")
def pipe64():
    components = build_tiny_sdxl(seed=0)
    pipeline = StableDiffusionXLTPGPipeline(**{**components, "unet": components["unet"].to(torch.float64)}, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def unsplit(pipe64):
    with rows_seen(pipe64.unet) as rows:
        latents = run(pipe64)
    assert rows == [ROWS] * 3
    return latents


@contextmanager
def failing_over(unet, limit, make_error):
    """Every backbone call of more than ``limit`` rows raises ``make_error(rows)``; yields the rows of each call tried."""
    tried = []

    def refuse(module, args, kwargs):
        rows = next(value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)).shape[0]
        tried.append(rows)
        if rows > limit:
            raise make_error(rows)

    handle = unet.register_forward_pre_hook(refuse, with_kwargs=True)
    try:
        yield tried
    finally:
        handle.remove()


def out_of_memory(rows):
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB for {rows} rows")


def test_out_of_memory_errors_are_told_from_others():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("XPU out of memory"))
    assert is_out_of_memory(RuntimeError(MPS_ERROR))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x4 and 3x4)"))
    assert not is_out_of_memory(RuntimeError())
    assert not is_out_of_memory(ValueError("max_batch_rows: out of memory"))
    assert not is_out_of_memory(KeyboardInterrupt())
    assert [halved_rows(rows) for rows in (8, 4, 2, 6, 3, 5)] == [4, 2, 1, 3, 2, 3]
    error = add_line(RuntimeError("first"), "second")
    assert error.__notes__ == ["second"]


@pytest.mark.parametrize(
    "limit, make_error",
    [(4, out_of_memory), (2, lambda rows: RuntimeError(MPS_ERROR)), (1, lambda rows: torch.cuda.OutOfMemoryError("out of memory"))],
    ids=["halves", "quarters-mps", "single-rows"],
)
def test_a_step_out_of_memory_reruns_split_and_keeps_the_split(pipe64, unsplit, caplog, limit, make_error):
    caplog.set_level(logging.WARNING)
    with failing_over(pipe64.unet, limit, make_error) as tried:
        latents = run(pipe64)
    splits = ROWS // limit
    attempts = [ROWS // 2**k for k in range(splits.bit_length() - 1)]  # 8, then 4, ... each failed once
    assert tried == attempts + [limit] * (splits * 3)
    difference = (latents - unsplit).abs().max().item()
    print(f"split to {limit} rows per call: max |latents - unsplit| = {difference:.2e}")
    assert difference <= 1e-5
    warnings = [record for record in caplog.records if "out of memory" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert f"max_batch_rows={limit}" in warnings[0].getMessage()


def test_in_float32_the_fallback_runs_as_its_max_batch_rows(pipe):
    with failing_over(pipe.unet, 2, out_of_memory):
        latents = run(pipe)
    assert torch.equal(latents, run(pipe, max_batch_rows=2))
    print(f"float32, split to 2 rows per call: max |latents - unsplit| = {(latents - run(pipe)).abs().max().item():.2e}")


def test_the_split_lasts_one_run(pipe):
    with failing_over(pipe.unet, 4, out_of_memory):
        run(pipe, num_inference_steps=1)
    with rows_seen(pipe.unet) as rows:
        run(pipe, num_inference_steps=1)
    assert rows == [ROWS]


def test_other_errors_are_never_retried(pipe, caplog):
    with failing_over(pipe.unet, 4, lambda rows: RuntimeError("mat1 and mat2 shapes cannot be multiplied")) as tried:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as raised:
            run(pipe)
    assert tried == [ROWS]
    assert not getattr(raised.value, "__notes__", [])
    assert not [record for record in caplog.records if "out of memory" in record.getMessage()]


def test_one_row_out_of_memory_raises_the_original_error_saying_so(pipe, caplog):
    original = out_of_memory(1)
    with failing_over(pipe.unet, 0, lambda rows: original if rows == 1 else out_of_memory(rows)) as tried:
        with pytest.raises(torch.OutOfMemoryError) as raised:
            run(pipe)
    assert tried == [8, 4, 2, 1]
    assert raised.value is original
    assert len(raised.value.__notes__) == 1 and "one row per backbone call" in raised.value.__notes__[0]
    assert not [record for record in caplog.records if "out of memory" in record.getMessage()]


def test_a_set_max_batch_rows_is_halved_from(pipe64, unsplit):
    with failing_over(pipe64.unet, 2, out_of_memory) as tried:
        latents = run(pipe64, max_batch_rows=3)
    assert tried == [3, 2, 2, 2, 2] + [2] * 8
    assert (latents - unsplit).abs().max().item() <= 1e-5


def test_dualguide_batch_falls_back_the_same_way(model_folder, tmp_path, monkeypatch, caplog):
    """``dualguide batch`` (as the ui) calls the pipeline, so its calls take the fallback: two images per call at CFG +
    TPG (recommended.json) are 6 rows; past 3 rows the backbone runs out of memory, and the images equal a clean run's."""
    import numpy as np
    from PIL import Image

    from dualguide import cli
    from dualguide.generation import models
    from dualguide.jobs import read_lines

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")

    def batch(out):
        assert cli.main(["batch", str(prompts), "--model", model_folder, "--out", str(out), "--seed", "5", "--batch-size", "2"]) == 0
        entries, _ = read_lines(str(out / "manifest.jsonl"))
        return {entry["id"]: np.asarray(Image.open(out / entry["file"]).convert("RGB")).astype(int) for entry in entries}

    clean = batch(tmp_path / "clean")
    tried, load_model, hooks = [], models.load_model, ExitStack()

    def load_failing_over_3_rows(*args, **kwargs):
        pipe = load_model(*args, **kwargs)
        tried.append(hooks.enter_context(failing_over(pipe.unet, 3, out_of_memory)))
        return pipe

    monkeypatch.setattr(models, "load_model", load_failing_over_3_rows)
    caplog.set_level(logging.WARNING)
    with hooks:
        split = batch(tmp_path / "split")
    assert tried[0][:2] == [6, 3] and set(tried[0][2:]) == {3}
    assert sorted(split) == sorted(clean) and len(clean) == 2
    difference = max(np.abs(split[name] - clean[name]).max() for name in clean)
    print(f"dualguide batch split to 3 rows per call: max PNG difference {difference}/255")
    assert difference <= 1
    assert len([record for record in caplog.records if "max_batch_rows=3" in record.getMessage()]) == 1
