"""Train the shape / colour / background judge (a < 2 MB CNN) on procedural images, robust to blur and noise.

    python -m training.train_judge --export dualguide/embedded/judge      # about 5 minutes on 2 CPU cores

Images are drawn per step from (seed, step) and degraded at random (blur, down-up sampling, noise,
brightness) so that the judge also reads imperfect generated pictures. Held-out accuracy is logged;
``--export`` writes ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dualguide.toy.data import label_indices, make_dataset
from dualguide.toy.judge import HEADS, ShapeJudge, as_batch

from . import common

HELD_OUT_SEED = 20_000
MAX_JUDGE_BYTES = 2 * 1024 * 1024


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random per-image blur, down-up sampling, brightness change and Gaussian noise; ``images`` in [0, 1]."""
    n = len(images)
    coin = torch.rand(n, 4, generator=generator)
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    images = torch.where((coin[:, 0] < 0.3).view(-1, 1, 1, 1), blurred, images)
    small = F.interpolate(images, scale_factor=0.5, mode="bilinear", antialias=True)
    small = F.interpolate(small, scale_factor=2.0, mode="bilinear")
    images = torch.where((coin[:, 1] < 0.3).view(-1, 1, 1, 1), small, images)
    images = images * (1 + 0.1 * (coin[:, 2] - 0.5)).view(-1, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator) * (0.06 * coin[:, 3]).view(-1, 1, 1, 1)
    return (images + noise).clamp(0, 1)


def labelled_batch(seed: int, step: int, batch: int):
    images, _, labels = make_dataset(batch, int(common.step_rng(seed, step).integers(2**62)), empty_rate=0.0)
    return as_batch(images), {name: torch.from_numpy(value) for name, value in label_indices(labels).items()}


def judge_loss(judge: ShapeJudge, images: torch.Tensor, targets: Dict[str, torch.Tensor]) -> torch.Tensor:
    logits = judge(images)
    return sum(F.cross_entropy(logits[name], targets[name]) for name in HEADS)


@torch.no_grad()
def held_out_accuracy(judge: ShapeJudge, seed: int, count: int = 1024) -> Dict[str, float]:
    """Accuracy per head on clean and on degraded held-out images."""
    images, _, labels = make_dataset(count, seed + HELD_OUT_SEED, empty_rate=0.0)
    clean = as_batch(images)
    wanted = label_indices(labels)
    report = {}
    judge.eval()
    for kind, batch in (("clean", clean), ("degraded", degrade(clean, torch.Generator().manual_seed(seed)))):
        logits = judge(batch)
        for name in HEADS:
            report[f"{kind}_{name}"] = round(float(np.mean(logits[name].argmax(1).numpy() == wanted[name])), 4)
    judge.train()
    return report


def main(argv: Optional[List[str]] = None) -> None:
    p = common.parser(__doc__.splitlines()[0], out="outputs/training/judge", steps=2500, batch=64, lr=2e-3, minutes=8)
    p.add_argument("--export", default=None, help="folder for the trained judge (e.g. dualguide/embedded/judge)")
    p.set_defaults(sample_every=500)
    args = p.parse_args(argv)
    out = common.setup(args)
    torch.manual_seed(args.seed)
    judge = ShapeJudge().train()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=1e-4)
    step = common.resume(out, {"judge": judge}, optimizer)[0] if args.resume else 0
    budget = common.Budget(args.time_budget)
    while step < args.steps and not budget.spent():
        cosine = 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * common.warmup_factor(step, args.warmup) * cosine
        images, targets = labelled_batch(args.seed, step, args.batch)
        loss = judge_loss(judge, degrade(images, common.step_generator(args.seed, step, stream=1)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0:
            common.log(out, {"step": step, "loss": round(loss.item(), 4), "seconds": round(budget.elapsed(), 1)})
        if step % args.checkpoint_every == 0:
            common.save_checkpoint(out, common.training_state(step, {"judge": judge}, optimizer))
        if args.sample_every and step % args.sample_every == 0:
            common.log(out, {"step": step, **held_out_accuracy(judge, args.seed)})
    common.save_checkpoint(out, common.training_state(step, {"judge": judge}, optimizer))
    record = {"step": step, "done": step >= args.steps, **held_out_accuracy(judge, args.seed)}
    if args.export:
        judge.eval().save(args.export)
        size = sum(f.stat().st_size for f in Path(args.export).iterdir())
        if size > MAX_JUDGE_BYTES:
            raise RuntimeError(f"judge is {size / 2**20:.2f} MiB, over the 2 MiB limit")
        record.update(export=args.export, exported_bytes=size)
    common.log(out, record)


if __name__ == "__main__":
    main()
