"""The same guidance modes on the full-size SDXL UNet (random weights, float16, 1024x1024, 25 steps), on CUDA.

    python benchmarks/gpu_sdxl.py [--steps 25] [--repeats 3] [--batch-size 1] [--compile] [--out benchmarks/RESULTS_GPU.md]

No download: the UNet is built from SDXL base's public config (below) with random weights; text
encoders and VAE are left out (random prompt embeddings of SDXL's shapes, latent output), so the
figures are the denoising loop alone. Our pipeline runs with a plain Euler sampler passed as a
callable (the same arithmetic as k-diffusion's ``sample_euler``). ``--batch-size B`` makes B images
per pipeline call (times are per image). ``--compile`` then times a few modes again with the UNet
compiled (``dualguide.compiled.compile_unet``): the first call (compiling included) and the median
per image after it. ``--device cpu --tiny`` is a quick dry run of the script on the tiny SDXL-layout
UNet. The results replace this script's sections of ``--out``; the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from common import (
    BASELINE, OUR_MODES, SDXL_BASE_UNET, TABLE_HEAD, Timings, comparison_pipelines, comparison_runs, environment, paired_timings, ratio_rows, write_sections,
)



@torch.no_grad()
def euler(model, x, sigmas, extra_args=None, callback=None, disable=None, seed=None):
    """Euler in k-diffusion's convention."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]), **(extra_args or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS_GPU.md"))
    parser.add_argument("--device", default="cuda", help="cpu only for a quick dry run of the script")
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL-layout UNet instead of SDXL's (dry runs)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    parser.add_argument("--compile", action="store_true", help="also time modes with the UNet compiled")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sdxl.py needs a CUDA device (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from dualguide.loading import default_dtype
    from dualguide.tiny import sdxl_scheduler_config, tiny_unet_config

    dtype = default_dtype(device)
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(**(tiny_unet_config() if args.tiny else SDXL_BASE_UNET)).to(dtype).eval()
    text_dim = unet.config.cross_attention_dim
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    parts = dict(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
                 scheduler=EulerDiscreteScheduler(**sdxl_scheduler_config()))  # fmt: skip
    pipes = comparison_pipelines(parts)
    g = torch.Generator(device).manual_seed(1)

    def random(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    embeds = dict(prompt_embeds=random(1, 77, text_dim), pooled_prompt_embeds=random(1, pooled_dim),
                  negative_prompt_embeds=random(1, 77, text_dim), negative_pooled_prompt_embeds=random(1, pooled_dim))  # fmt: skip
    nag_negative = random(1, 77, text_dim)
    common = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="latent",
                  num_images_per_prompt=args.batch_size, **embeds)  # fmt: skip

    def caller(pipes):
        def call(name, **kwargs):
            if name == "ours":
                kwargs = dict(kwargs, sampler=euler, nag_negative_prompt_embeds=nag_negative)
            return lambda: pipes[name](generator=torch.Generator(device).manual_seed(0), **common, **kwargs)

        return call

    call = caller(pipes)
    runs = comparison_runs(call)
    runs["ours CFG+TPG+NAG, max_batch_rows=1"] = call("ours", **OUR_MODES["CFG+TPG+NAG"], max_batch_rows=1)
    peaks = {}
    for name, run in runs.items():  # one run each for the peak memory (also a warm-up)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    timings = per_image(paired_timings(runs, BASELINE, args.repeats, synchronize, warm_up=False), args.batch_size)
    for name in runs:
        print(f"{name:40s} {timings.seconds[name]:.3f} s/image  ratio {timings.ratios[name]:.3f}  peak {peaks[name]:.2f} GiB", flush=True)
    rows, _ = ratio_rows(timings, {}, {name: f"peak {peak:.2f} GiB" for name, peak in peaks.items()})
    model = "tiny SDXL-layout UNet" if args.tiny else "full-size SDXL UNet"
    setup = f"{model}, {args.size}x{args.size}, {args.steps} Euler steps, {dtype}, {args.batch_size} image(s) per call, denoising loop only"
    sections = ["\n".join([f"## gpu_sdxl.py, batch size {args.batch_size}: guidance modes (last run)", "",
                           f"Machine: {environment(device.type)}. {setup}; {args.repeats} rounds after a warm-up, each mode in a pair "
                           "with the baseline (diffusers' StableDiffusionXLPipeline with CFG): s/image is the median over rounds, "
                           "the ratio the median of mode / baseline over rounds.", "", *TABLE_HEAD, *rows])]  # fmt: skip
    if args.compile:
        sections.append(compiled_section(parts, caller, timings, args, synchronize, setup))
    print(*sections, sep="\n\n")
    write_sections(args.out, sections)
    return 0


def per_image(timings: Timings, images: int) -> Timings:
    """Per-call timings as seconds per image (ratios unchanged)."""
    return Timings({name: seconds / images for name, seconds in timings.seconds.items()}, timings.ratios)


COMPILED_MODES = (BASELINE, "ours CFG", "ours CFG+TPG", "ours CFG+TPG+NAG")


def compiled_section(parts: dict, caller, eager: Timings, args, synchronize, setup: str) -> str:
    """Time ``COMPILED_MODES`` with the UNet compiled (after every eager run: the compiled UNet keeps
    pass-through hooks on the shared inner UNet): first call with compiling, then the median s/image."""
    from dualguide.compiled import compile_unet

    pipes = comparison_pipelines({**parts, "unet": compile_unet(parts["unet"])}, names=("sdxl", "ours"))
    runs = comparison_runs(caller(pipes))  # the runs of other pipelines are never called
    runs = {name: runs[name] for name in COMPILED_MODES}
    first = {}
    for name, run in runs.items():
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        first[name] = time.perf_counter() - start
        print(f"compiled {name:32s} first call {first[name]:.1f} s", flush=True)
    timings = per_image(paired_timings(runs, BASELINE, args.repeats, synchronize, warm_up=False), args.batch_size)
    rows = [f"| {name} | {first[name]:.1f} | {timings.seconds[name]:.3f} | {eager.seconds[name]:.3f} | "
            f"{eager.seconds[name] / timings.seconds[name]:.2f}x |" for name in runs]  # fmt: skip
    return "\n".join([f"## gpu_sdxl.py, batch size {args.batch_size}: compiled UNet (last run)", "",
                      f"The same {setup}, with `pipe.unet = compile_unet(pipe.unet)` (inductor, static shapes): the first call "
                      "compiles this mode's variant; s/image is the median over rounds after it, paired with the compiled baseline.", "",
                      "| mode | first call, s (compiling included) | s/image compiled | s/image eager | speed-up |",
                      "|---|---|---|---|---|", *rows])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
