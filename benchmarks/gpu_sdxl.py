"""The same guidance modes on the full-size SDXL UNet (random weights, float16, 1024x1024, 25 steps), on CUDA.

    python benchmarks/gpu_sdxl.py [--steps 25] [--repeats 3] [--out benchmarks/RESULTS_GPU.md]

No download: the UNet is built from SDXL base's public config (below) with random weights; text
encoders and VAE are left out (random prompt embeddings of SDXL's shapes, latent output), so the
figures are the denoising loop alone. Our pipeline runs with a plain Euler sampler passed as a
callable (the same arithmetic as k-diffusion's ``sample_euler``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from common import BASELINE, OUR_MODES, TABLE_HEAD, comparison_pipelines, comparison_runs, environment, paired_timings, ratio_rows

SDXL_BASE_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), center_input_sample=False,
    cross_attention_dim=2048, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=(1, 2, 10), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)  # fmt: skip


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
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sdxl.py needs a CUDA device (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from dualguide.loading import default_dtype
    from dualguide.tiny import sdxl_scheduler_config

    dtype = default_dtype(device)
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(**SDXL_BASE_UNET).to(dtype).eval()
    parts = dict(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
                 scheduler=EulerDiscreteScheduler(**sdxl_scheduler_config()))  # fmt: skip
    pipes = comparison_pipelines(parts)
    g = torch.Generator(device).manual_seed(1)

    def random(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    embeds = dict(prompt_embeds=random(1, 77, 2048), pooled_prompt_embeds=random(1, 1280),
                  negative_prompt_embeds=random(1, 77, 2048), negative_pooled_prompt_embeds=random(1, 1280))  # fmt: skip
    nag_negative = random(1, 77, 2048)
    common = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="latent", **embeds)

    def call(name, **kwargs):
        if name == "ours":
            kwargs = dict(kwargs, sampler=euler, nag_negative_prompt_embeds=nag_negative)
        return lambda: pipes[name](generator=torch.Generator(device).manual_seed(0), **common, **kwargs)

    runs = comparison_runs(call)
    runs["ours CFG+TPG+NAG, max_batch_rows=1"] = call("ours", **OUR_MODES["CFG+TPG+NAG"], max_batch_rows=1)
    peaks = {}
    for name, run in runs.items():  # one run each for the peak memory (also a warm-up)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    timings = paired_timings(runs, BASELINE, args.repeats, synchronize, warm_up=False)
    for name in runs:
        print(f"{name:40s} {timings.seconds[name]:.3f} s  ratio {timings.ratios[name]:.3f}  peak {peaks[name]:.2f} GiB", flush=True)
    rows, _ = ratio_rows(timings, {}, {name: f"peak {peak:.2f} GiB" for name, peak in peaks.items()})
    lines = ["# GPU benchmark: full-size SDXL UNet, random weights", "", f"Machine: {environment(device.type)}.", "",
             f"{args.size}x{args.size}, {args.steps} Euler steps, {dtype}, one image, denoising loop only; "
             f"{args.repeats} rounds after a warm-up, each mode in a pair with the baseline (diffusers' StableDiffusionXLPipeline with CFG): "
             "s/image is the median over rounds, the ratio the median of mode / baseline over rounds.", "",
             *TABLE_HEAD, *rows, ""]  # fmt: skip
    report = "\n".join(lines)
    print(report)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
