"""Image feature vectors for distribution and diversity metrics: the toy judge's pooled features."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..toy.judge import ShapeJudge, as_batch


def judge_features(images: Sequence, judge: Optional[ShapeJudge] = None, batch_size: int = 256) -> np.ndarray:
    """``[N, 2C]`` float64: the judge's mean- and max-pooled feature maps, i.e. the input of its heads."""
    import torch

    judge = judge or ShapeJudge.load()
    captured: List[torch.Tensor] = []
    hook = next(iter(judge.heads.values())).register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    was_training = judge.training
    judge.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                judge(as_batch(images[start : start + batch_size]))
    finally:
        hook.remove()
        judge.train(was_training)
    return torch.cat(captured).double().numpy()
