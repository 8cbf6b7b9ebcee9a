"""What the two benchmarks share: the guidance modes, timing, and the results table."""

from __future__ import annotations

import platform
import time
from typing import Callable, Dict, List, Optional, Tuple

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
}


def best_times(
    runs: Dict[str, Callable[[], object]], repeats: int, synchronize: Callable[[], None] = lambda: None
) -> Dict[str, float]:
    """Min wall time of each run over ``repeats`` rounds, after a warm-up round.

    The rounds go through all runs in turn, so a slow spell of the machine hits every mode alike.
    """
    seconds = {name: float("inf") for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
            if round_index:
                seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds


TABLE_HEAD = ["| mode | s/image | ratio | target | verdict | note |", "|---|---|---|---|---|---|"]


def ratio_rows(
    seconds: Dict[str, float], baseline: str, targets: Dict[str, float], notes: Optional[Dict[str, str]] = None
) -> Tuple[List[str], List[str]]:
    """Markdown rows under ``TABLE_HEAD`` (mode, s/image, ratio, target, verdict, note) and the missed targets."""
    rows, misses = [], []
    for mode, value in seconds.items():
        ratio = value / seconds[baseline]
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
