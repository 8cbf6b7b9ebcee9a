"""A small CNN that judges a toy image's shape, foreground colour and background colour; prompt adherence.

Trained on ``dualguide.toy.data`` by ``training/train_judge.py`` and shipped in ``dualguide/embedded/judge``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import COLORS, SHAPES, Labels, parse_prompt

JUDGE_DIR = Path(__file__).resolve().parent.parent / "embedded" / "judge"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INPUT_SIZE = 64
HEADS: Dict[str, Sequence[str]] = {"shape": SHAPES, "color": tuple(COLORS), "background": tuple(COLORS)}


class ShapeJudge(nn.Module):
    """Stride-2 conv stack, global average and max pools, one linear head per attribute (shape, color, background)."""

    def __init__(self, widths: Sequence[int] = (32, 48, 64, 96)) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.widths = tuple(widths)
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * channels, len(classes)) for name, classes in HEADS.items()})

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        """Logits per head for float images ``[B, 3, 64, 64]`` in [0, 1]."""
        maps = self.features(images * 2.0 - 1.0)
        features = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images) -> List[Labels]:
        """Judged ``{shape, color, background}`` of each image (see ``as_batch`` for accepted inputs)."""
        was_training = self.training
        self.eval()
        try:
            logits = self(as_batch(images))
        finally:
            self.train(was_training)
        indices = {name: value.argmax(dim=1).tolist() for name, value in logits.items()}
        return [{name: HEADS[name][indices[name][i]] for name in HEADS} for i in range(len(indices["shape"]))]

    def save(self, folder: Union[str, os.PathLike]) -> None:
        """Write ``model.safetensors`` and ``config.json`` to ``folder``."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / WEIGHTS_FILE))
        with open(Path(folder) / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump({"widths": list(self.widths), "heads": {k: list(v) for k, v in HEADS.items()}}, f, indent=2)

    @classmethod
    def load(cls, folder: Union[str, os.PathLike] = JUDGE_DIR) -> "ShapeJudge":
        """A judge saved by ``save``, in eval mode."""
        from safetensors.torch import load_file

        with open(Path(folder) / CONFIG_FILE, encoding="utf-8") as f:
            config = json.load(f)
        if config["heads"] != {k: list(v) for k, v in HEADS.items()}:
            raise ValueError(f"judge in {folder} was trained for other classes: {config['heads']}")
        judge = cls(config["widths"])
        judge.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
        return judge.eval()


def as_batch(images) -> Tensor:
    """Float ``[B, 3, 64, 64]`` in [0, 1] for the judge.

    Accepts PIL images, uint8 arrays ``[H, W, 3]`` (a list) or ``[B, H, W, 3]``, or a float tensor
    ``[B, 3, H, W]`` in [0, 1]; other sizes are resized.
    """
    if isinstance(images, Tensor):
        batch = images.float()
    else:
        arrays = [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"images must be RGB, got a batch of shape {tuple(batch.shape)}")
    if batch.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        batch = F.interpolate(batch, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)
    return batch


@dataclass(frozen=True)
class Adherence:
    """Shares of images whose judged attributes equal the prompt's; ``adherence`` needs shape and colour both."""

    adherence: float
    shape: float
    color: float
    background: float
    count: int


def adherence(images, prompts: Sequence[str], judge: Optional[ShapeJudge] = None) -> Adherence:
    """Judge ``images`` (one per grammar prompt) against ``prompts``; the judge defaults to the embedded one.

    An attribute the prompt leaves open (``data.OPEN_ATTRIBUTES``) counts as shown.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one prompt per image")
    if not len(prompts):
        raise ValueError("adherence needs at least one image")
    wanted = [parse_prompt(prompt) for prompt in prompts]
    judged = (judge or ShapeJudge.load()).predict(images)
    hits = {name: np.array([not w[name] or j[name] == w[name] for j, w in zip(judged, wanted)]) for name in HEADS}
    return Adherence(
        adherence=float(np.mean(hits["shape"] & hits["color"])), shape=float(hits["shape"].mean()),
        color=float(hits["color"].mean()), background=float(hits["background"].mean()), count=len(prompts),
    )  # fmt: skip


def mean_pixel_difference(images: Sequence, reference: Sequence) -> float:
    """Mean absolute difference of two equally long image lists, in 0-255 pixel units."""
    if len(images) != len(reference):
        raise ValueError(f"got {len(images)} images against {len(reference)} reference images")
    pairs = zip(images, reference)
    return float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() for a, b in pairs]))
