"""ControlNet for a guided call: residuals computed on the uncond and cond rows only.

The perturbed rows (TPG, PAG) reuse the cond rows' residuals: TPG and PAG perturb the UNet's
blocks, not the ControlNet, so running the ControlNet on them would give exactly the cond rows'
residuals again. In guess mode the ControlNet sees the cond rows only and the uncond rows get
zero residuals, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .conditioning import Conditioning

Scales = Union[float, Sequence[float]]


@dataclass(frozen=True)
class ControlNetInput:
    """A ControlNet (or ``MultiControlNetModel``) with its conditioning image(s) for one run.

    ``image`` is the preprocessed control image ``[images, 3, H, W]`` (a list for several ControlNets),
    one row per image of the batch. ``scale``, ``start`` and ``end`` are one value or one per
    ControlNet; ControlNet ``k`` acts on step ``i`` of ``n`` unless ``i/n < start_k`` or ``(i+1)/n > end_k``
    (diffusers' ``control_guidance_start`` / ``control_guidance_end``). ``n`` is the run's number of
    steps, or ``steps`` when given (diffusers counts the steps before ``denoising_end`` cuts the run).
    """

    model: nn.Module
    image: Union[Tensor, List[Tensor]]
    scale: Scales = 1.0
    start: Scales = 0.0
    end: Scales = 1.0
    guess_mode: bool = False
    steps: Optional[int] = None

    @property
    def count(self) -> int:
        return len(self.image) if isinstance(self.image, (list, tuple)) else 1

    def _per_net(self, value: Scales) -> List[float]:
        values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * self.count
        if len(values) != self.count:
            raise ValueError(f"got {len(values)} values for {self.count} ControlNets; give one per ControlNet")
        return values

    def scales_at(self, step: int, steps: int) -> Optional[Scales]:
        """The conditioning scale(s) at ``step`` of ``steps`` (or of ``self.steps``; diffusers' keep rule);
        None when all are off."""
        steps = self.steps or steps
        keep = [0.0 if step / steps < s or (step + 1) / steps > e else 1.0 for s, e in zip(self._per_net(self.start), self._per_net(self.end))]
        scales = [scale * k for scale, k in zip(self._per_net(self.scale), keep)]
        if not any(scales):
            return None
        return scales if isinstance(self.image, (list, tuple)) else scales[0]


def _repeat(image: Union[Tensor, List[Tensor]], times: int, dtype) -> Union[Tensor, List[Tensor]]:
    if isinstance(image, (list, tuple)):
        return [i.to(dtype).repeat(times, 1, 1, 1) for i in image]
    return image.to(dtype).repeat(times, 1, 1, 1)


def control_residuals(
    control: ControlNetInput,
    scales: Scales,
    branches: Tuple[str, ...],
    model_input: Tensor,
    timesteps: Tensor,
    cond: Conditioning,
    uncond: Optional[Conditioning],
) -> Tuple[List[Tensor], Tensor]:
    """Down and mid residuals for every row of the step (branches stacked in ``branches`` order).

    ``model_input`` and ``timesteps`` are one row per image; the ControlNet runs once, on
    ``[uncond, cond]`` rows (``[cond]`` in guess mode or without CFG).
    """
    run_uncond = "uncond" in branches and not control.guess_mode
    parts = ([uncond] if run_uncond else []) + [cond]
    stacked = Conditioning.cat(parts)
    rows = len(parts)
    down, mid = control.model(
        model_input.repeat(rows, 1, 1, 1),
        timesteps.repeat(rows),
        encoder_hidden_states=stacked.prompt_embeds,
        controlnet_cond=_repeat(control.image, rows, model_input.dtype),
        conditioning_scale=scales,
        guess_mode=control.guess_mode,
        added_cond_kwargs=stacked.added_cond_kwargs(),
        return_dict=False,
    )
    batch = model_input.shape[0]

    def per_branch(residual: Tensor) -> Tensor:
        cond_part = residual[-batch:]
        pieces = []
        for name in branches:
            if name == "uncond":
                pieces.append(residual[:batch] if run_uncond else torch.zeros_like(cond_part))
            else:
                pieces.append(cond_part)
        return torch.cat(pieces)

    return [per_branch(d) for d in down], per_branch(mid)
