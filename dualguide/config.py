"""Guidance terms and their settings, validated on construction.

Each term (CFG, TPG, PAG/SoftPAG, NAG) is a small frozen dataclass. Errors name the
parameter as the pipeline spells it (``tpg_scale``, ``nag_alpha``, ...) and the valid values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Tuple, Union

from torch import Tensor

from .layers import LayerSpec, parse_layer_spec
from .checks import check_bool, check_layer_spec, check_number
from .defaults import DEFAULT_LAYERS

DEFAULT_TPG_LAYERS = DEFAULT_LAYERS["sdxl"]["tpg"]  # "d6-d23"
DEFAULT_PAG_LAYERS = DEFAULT_LAYERS["sdxl"]["pag"]  # "mid": m0-m9 on SDXL base


@dataclass(frozen=True)
class Interval:
    """When a term is active: fractions ``[start, end)`` of the schedule's steps and sigmas ``(sigma_low, sigma_high]``.

    Fractions follow diffusers' guiders: step ``i`` of ``n`` is active when
    ``int(start*n) <= i < int(end*n)``; evaluations between two steps count with the
    earlier one. The defaults keep a term on for the whole schedule.
    """

    start: float = 0.0
    end: float = 1.0
    sigma_low: float = 0.0
    sigma_high: float = math.inf
    name: str = field(default="interval", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", check_number(self.start, f"{self.name} start", 0.0, 1.0))
        object.__setattr__(self, "end", check_number(self.end, f"{self.name} end", 0.0, 1.0))
        if self.end < self.start:
            raise ValueError(f"{self.name}: end ({self.end:g}) must not be before start ({self.start:g})")
        object.__setattr__(self, "sigma_low", check_number(self.sigma_low, f"{self.name} sigma_low", 0.0))
        # sigma_high = inf is the documented "no upper bound".
        object.__setattr__(
            self, "sigma_high", check_number(self.sigma_high, f"{self.name} sigma_high", self.sigma_low, allow_inf=True)
        )

    @property
    def uses_fractions(self) -> bool:
        return self.start > 0.0 or self.end < 1.0

    def sigma_bounds(self, schedule: Optional[Tensor]) -> Tuple[float, float]:
        """The active sigmas ``(low, high]`` given the run's schedule (needed only for fractions)."""
        low, high = self.sigma_low, self.sigma_high
        if not self.uses_fractions:
            return low, high
        if schedule is None:
            raise ValueError(
                f"{self.name} is given as fractions of the schedule; pass the run's sigmas to the denoiser "
                "(GuidedDenoiser(..., sigmas=sigmas) or denoiser.set_schedule(sigmas))"
            )
        steps = len(schedule) - 1
        first, stop = int(self.start * steps), int(self.end * steps)
        if first >= stop:
            return math.inf, -math.inf  # empty
        return max(low, float(schedule[stop])), min(high, float(schedule[first]))


IntervalLike = Union[Interval, Tuple[float, float], None]


def as_interval(value: IntervalLike, name: str) -> Interval:
    """Accept an ``Interval``, a ``(start, end)`` pair of fractions, or None (always on)."""
    if value is None:
        return Interval(name=name)
    if isinstance(value, Interval):
        return Interval(value.start, value.end, value.sigma_low, value.sigma_high, name=name)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Interval(value[0], value[1], name=name)
    raise TypeError(f"{name} must be an Interval or a (start, end) pair of fractions in [0, 1], got {value!r}")


class FamilyDefault:
    """The default of ``TPG.layers`` / ``PAG.layers``: the model family's default layers, chosen by the denoiser."""

    def __repr__(self) -> str:
        return "FAMILY_DEFAULT"


FAMILY_DEFAULT = FamilyDefault()


def layer_ids(spec: object, name: str) -> Optional[Tuple[str, ...]]:
    """The ids of ``spec``; None for ``FAMILY_DEFAULT`` (the denoiser then takes the family's default layers)."""
    return None if spec is FAMILY_DEFAULT else tuple(parse_layer_spec(check_layer_spec(spec, name), name))


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance; active when ``scale > 1``."""

    scale: float = 5.0
    rescale: float = 0.0
    interval: IntervalLike = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_number(self.scale, "guidance_scale", 0.0))
        object.__setattr__(self, "rescale", check_number(self.rescale, "guidance_rescale", 0.0, 1.0))
        object.__setattr__(self, "interval", as_interval(self.interval, "cfg_interval"))

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0


@dataclass(frozen=True)
class TPG:
    """Token Perturbation Guidance: a branch whose tokens are shuffled in ``layers`` (by default the model
    family's default layers, ``d6-d23`` on SDXL; ``layers`` is then None after construction)."""

    scale: float = 3.0
    layers: Union[LayerSpec, FamilyDefault, None] = FAMILY_DEFAULT
    interval: IntervalLike = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_number(self.scale, "tpg_scale", 0.0))
        object.__setattr__(self, "layers", layer_ids(self.layers, "tpg_applied_layers_index"))
        if self.scale > 0 and self.layers == ():
            raise ValueError("tpg_applied_layers_index is empty while tpg_scale > 0; give ids such as 'd6-d23'")
        object.__setattr__(self, "interval", as_interval(self.interval, "tpg_interval"))

    @property
    def enabled(self) -> bool:
        return self.scale > 0.0


@dataclass(frozen=True)
class PAG:
    """Perturbed-Attention Guidance on ``layers`` (by default the model family's default layers, the mid block
    ``m0-m9`` on SDXL; ``layers`` is then None after construction); ``beta < 1`` or ``heads`` make it SoftPAG.
    ``adaptive_scale`` (diffusers' ``pag_adaptive_scale``) lowers the scale as the timestep falls: ``scale_at(t)``."""

    scale: float = 3.0
    layers: Union[LayerSpec, FamilyDefault, None] = FAMILY_DEFAULT
    beta: float = 1.0
    heads: Optional[Sequence[int]] = None
    interval: IntervalLike = None
    adaptive_scale: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_number(self.scale, "pag_scale", 0.0))
        object.__setattr__(self, "layers", layer_ids(self.layers, "pag_applied_layers_index"))
        if self.scale > 0 and self.layers == ():
            raise ValueError("pag_applied_layers_index is empty while pag_scale > 0; give ids such as 'm0-m9'")
        object.__setattr__(self, "beta", check_number(self.beta, "beta", 0.0, 1.0))
        if self.heads is not None:
            if isinstance(self.heads, (str, bytes)) or not isinstance(self.heads, Iterable):
                raise TypeError(f"selected_heads must be a list of head indices >= 0 or None, got {self.heads!r}")
            heads = tuple(check_number(h, "selected_heads", 0, integer=True) for h in self.heads)
            if not heads:
                raise ValueError("selected_heads must be a non-empty list of head indices >= 0 or None, got []")
            object.__setattr__(self, "heads", tuple(sorted(set(heads))))
        object.__setattr__(self, "interval", as_interval(self.interval, "pag_interval"))
        object.__setattr__(self, "adaptive_scale", check_number(self.adaptive_scale, "pag_adaptive_scale", 0.0))

    @property
    def enabled(self) -> bool:
        return self.scale > 0.0

    def scale_at(self, timestep: float) -> float:
        """The scale at the model timestep ``timestep`` (0..1000): ``max(scale - adaptive_scale * (1000 - t), 0)``
        with an adaptive scale (as diffusers' PAG pipelines), else ``scale``."""
        if self.adaptive_scale <= 0.0:
            return self.scale
        return max(self.scale - self.adaptive_scale * (1000.0 - timestep), 0.0)


@dataclass(frozen=True)
class NAG:
    """Normalized Attention Guidance; ``scale <= 1`` means off. SDXL defaults of the paper."""

    scale: float = 3.0
    tau: float = 2.5
    alpha: float = 0.5
    use_l1: bool = True
    interval: IntervalLike = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_number(self.scale, "nag_scale", 1.0))
        object.__setattr__(self, "tau", check_number(self.tau, "nag_tau", 0.0, low_open=True))
        object.__setattr__(self, "alpha", check_number(self.alpha, "nag_alpha", 0.0, 1.0))
        object.__setattr__(self, "use_l1", check_bool(self.use_l1, "nag_use_l1"))
        object.__setattr__(self, "interval", as_interval(self.interval, "nag_interval"))

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0
