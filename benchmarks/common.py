"""What the benchmarks share: the guidance modes, timing, the results table, and writing their sections."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# This project's modes, as pipeline arguments (guidance_scale 5, scales 3 as the defaults).
OUR_MODES: Dict[str, dict] = {
    "CFG": dict(guidance_scale=5.0, tpg_scale=0.0),
    "CFG+TPG": dict(guidance_scale=5.0, tpg_scale=3.0),
    "TPG alone": dict(guidance_scale=1.0, tpg_scale=3.0),
    "CFG+NAG": dict(guidance_scale=5.0, tpg_scale=0.0, do_nag=True),
    "CFG+TPG+NAG": dict(guidance_scale=5.0, tpg_scale=3.0, do_nag=True),
    "CFG+PAG": dict(guidance_scale=5.0, tpg_scale=0.0, pag_scale=3.0),
    "CFG+TPG (TPG first half)": dict(guidance_scale=5.0, tpg_scale=3.0, tpg_interval=(0.0, 0.5)),
    "CFG+TPG+PAG": dict(guidance_scale=5.0, tpg_scale=3.0, pag_scale=3.0),
}
# The modes with perturbed rows again with shared prefix rows off: what the sharing saves, measured in the same run.
OUR_MODES.update({f"{mode}, no sharing": dict(OUR_MODES[mode], share_prefix=False) for mode in ("CFG+TPG", "CFG+PAG", "CFG+TPG+PAG")})


BASELINE = "diffusers SDXL (CFG)"

# SDXL base's UNet configuration (public), for the full-size benchmarks: built with random weights or on the meta device.
SDXL_BASE_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), center_input_sample=False,
    cross_attention_dim=2048, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=(1, 2, 10), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)  # fmt: skip


def comparison_pipelines(components: dict, names: Sequence[str] = ("sdxl", "pag", "ours")) -> Dict[str, object]:
    """Of diffusers' SDXL pipeline (``sdxl``), its PAG pipeline on the mid block (``pag``) and ours (``ours``),
    those in ``names``, all over the same components, progress bars off."""
    from diffusers import StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline

    from dualguide import StableDiffusionXLTPGPipeline

    makers = {
        "sdxl": lambda: StableDiffusionXLPipeline(**components, add_watermarker=False),
        "pag": lambda: StableDiffusionXLPAGPipeline(**components, add_watermarker=False, pag_applied_layers=["mid"]),
        "ours": lambda: StableDiffusionXLTPGPipeline(**components, add_watermarker=False),
    }
    pipes = {name: makers[name]() for name in names}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def comparison_runs(call: Callable[..., Callable[[], object]]) -> Dict[str, Callable[[], object]]:
    """The timed runs, by label: the baseline, diffusers' PAG and each of ``OUR_MODES``.

    ``call(pipe_name, **pipeline_arguments)`` gives one run; names as in ``comparison_pipelines``.
    """
    runs = {BASELINE: call("sdxl", guidance_scale=5.0), "diffusers PAG (CFG+PAG)": call("pag", guidance_scale=5.0, pag_scale=3.0)}
    runs.update({f"ours {mode}": call("ours", **kwargs) for mode, kwargs in OUR_MODES.items()})
    return runs


@dataclass(frozen=True)
class Timings:
    """Median seconds of each run, and the median over rounds of run / the baseline run paired with it."""

    seconds: Dict[str, float]
    ratios: Dict[str, float]


def paired_timings(
    runs: Dict[str, Callable[[], object]],
    baseline: str,
    repeats: int,
    synchronize: Callable[[], None] = lambda: None,
    warm_up: bool = True,
) -> Timings:
    """Time every run in a pair with ``baseline``, ``repeats`` rounds (after one warm-up call each).

    A slow spell of the machine hits both halves of a pair alike, so the median of the per-round
    ratios is steadier than a ratio of two figures taken at different times; the order within a
    pair alternates by round so that neither side always runs on a warmer machine.
    """
    if repeats < 1 or baseline not in runs or len(runs) < 2:
        raise ValueError(f"need repeats >= 1 and runs holding {baseline!r} and at least one other run")

    def seconds_of(run: Callable[[], object]) -> float:
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        return time.perf_counter() - start

    if warm_up:
        for run in runs.values():
            run()
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    ratios: Dict[str, List[float]] = {name: [] for name in runs if name != baseline}
    for round_index in range(repeats):
        for name in ratios:
            if round_index % 2:
                value, base = seconds_of(runs[name]), seconds_of(runs[baseline])
            else:
                base, value = seconds_of(runs[baseline]), seconds_of(runs[name])
            samples[baseline].append(base)
            samples[name].append(value)
            ratios[name].append(value / base)
    medians = {name: statistics.median(values) for name, values in ratios.items()}
    return Timings({name: statistics.median(values) for name, values in samples.items()}, {baseline: 1.0, **medians})


TABLE_HEAD = ["| mode | s/image (median) | ratio (median of pairs) | target | verdict | note |", "|---|---|---|---|---|---|"]


def ratio_rows(
    timings: Timings, targets: Dict[str, float], notes: Optional[Dict[str, str]] = None
) -> Tuple[List[str], List[str]]:
    """Markdown rows under ``TABLE_HEAD`` (mode, s/image, ratio, target, verdict, note) and the missed targets."""
    rows, misses = [], []
    for mode, value in timings.seconds.items():
        ratio = timings.ratios[mode]
        target = targets.get(mode)
        verdict = "" if target is None else ("ok" if ratio <= target else f"MISSED by {ratio - target:.3f}")
        if target is not None and ratio > target:
            misses.append(f"{mode}: {ratio:.3f} > {target:.2f} (missed by {ratio - target:.3f})")
        target_text = "" if target is None else f"<= {target:.2f}"
        note = (notes or {}).get(mode, "")
        rows.append(f"| {mode} | {value:.3f} | {ratio:.3f} | {target_text} | {verdict} | {note} |")
    return rows, misses


def environment(device: Optional[str] = None) -> str:
    """One line naming the machine and the versions that matter."""
    import diffusers

    where = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{where}; Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}"


def write_sections(path: str, sections: Sequence[str], preamble: Optional[str] = None) -> None:
    """Put each section (its ``## `` heading line, then its text) into the markdown file ``path``: it replaces
    the section with the same heading (up to the next ``## `` heading) or is appended. ``preamble`` replaces
    the text before the first heading. Everything else (other scripts' sections, notes) is kept."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    for section in sections:
        heading = section.split("\n", 1)[0]
        body = section.rstrip("\n") + "\n\n"
        pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
        text = pattern.sub(lambda _: body, text, count=1) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    if preamble is not None:
        first = re.search(r"^## ", text, re.M)
        text = preamble.rstrip("\n") + "\n\n" + (text[first.start() :] if first else "")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.strip("\n") + "\n")
