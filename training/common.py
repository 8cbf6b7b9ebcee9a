"""What the training scripts share: flags, per-step seeding, atomic checkpoints, EMA, time budget, grids, logs."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CHECKPOINT = "checkpoint.pt"


def parser(description: str, out: str, steps: int, batch: int, lr: float, minutes: float) -> argparse.ArgumentParser:
    """Flags every script has, with the script's defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=out, help="work folder: checkpoint, logs, sample grids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=steps, help="total optimizer steps")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=50, help="linear learning-rate warmup steps")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=200, help="steps between sample grids (0: never)")
    p.add_argument("--time-budget", type=float, default=minutes, help="minutes this run may take, then stop cleanly")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def setup(args: argparse.Namespace) -> Path:
    """Create the work folder, set threads; returns the folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    return out


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """numpy RNG for one step: depends only on (seed, stream, step), so a resumed run draws what a whole run draws."""
    return np.random.default_rng([seed, stream, step])


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """torch generator for one step, seeded like ``step_rng``."""
    return torch.Generator().manual_seed(int(step_rng(seed, step, stream).integers(0, 2**62)))


def warmup_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(1, warmup))


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write ``folder/checkpoint.pt`` atomically (a crash never leaves a half-written checkpoint)."""
    path = folder / CHECKPOINT
    torch.save(state, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def load_checkpoint(folder: Path) -> Optional[dict]:
    path = folder / CHECKPOINT
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def training_state(step: int, modules: Dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, **extra) -> dict:
    """What a checkpoint holds: the step, each module's and the optimizer's state, and ``extra``."""
    weights = {name: module.state_dict() for name, module in modules.items()}
    return {"step": step, "optimizer": optimizer.state_dict(), **weights, **extra}


def resume(folder: Path, modules: Dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> Tuple[int, dict]:
    """Load ``folder``'s checkpoint into ``modules`` and ``optimizer``; returns ``(step, checkpoint)``, or (0, {})."""
    state = load_checkpoint(folder)
    if state is None:
        return 0, {}
    for name, module in modules.items():
        module.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state


class EMA:
    """Exponential moving average of parameters, with the usual warmup ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float) -> None:
        self.parameters = list(parameters)
        self.shadow = [p.detach().clone() for p in self.parameters]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1.0 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        for shadow, p in zip(self.shadow, self.parameters):
            tmp = p.detach().clone()
            p.copy_(shadow)
            shadow.copy_(tmp)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)
        self.updates = state["updates"]


class Budget:
    """Wall-clock budget of one run, in minutes."""

    def __init__(self, minutes: float) -> None:
        self.start = time.monotonic()
        self.seconds = minutes * 60.0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def spent(self) -> bool:
        return self.elapsed() >= self.seconds


def log(folder: Path, record: Dict[str, object]) -> None:
    """Append ``record`` to ``folder/log.jsonl`` and print it."""
    line = json.dumps(record)
    print(line, flush=True)
    with open(folder / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def image_grid(
    rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str] = (), column_labels: Sequence[str] = ()
) -> Image.Image:
    """Rows of equally sized uint8 ``[H, W, 3]`` images in one picture, with optional row / column captions."""
    h, w = rows[0][0].shape[:2]
    font = ImageFont.load_default()
    left = int(max(font.getlength(label) for label in row_labels)) + 8 if row_labels else 0
    top = 14 if column_labels else 0
    grid = Image.new("RGB", (left + w * max(len(r) for r in rows), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(Image.fromarray(image), (left + j * w, top + i * h))
        if row_labels:
            draw.text((4, top + i * h + h // 2 - 6), row_labels[i], fill="black", font=font)
    for j, label in enumerate(column_labels):
        draw.text((left + j * w + 2, 1), label, fill="black", font=font)
    return grid


def as_arrays(images: List[Image.Image]) -> List[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]
