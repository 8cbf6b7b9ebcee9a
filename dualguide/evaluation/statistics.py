"""Paired comparison of one guidance mode against the baseline mode over the same prompts (and seeds).

Each prompt gives one value per mode (its mean over the seeds); the unit of analysis is the prompt, so the
statistics are on the per-prompt differences ``mode - baseline``:

* a 95% bootstrap interval of their mean: ``scipy.stats.bootstrap``, percentile method (robust for the
  small, tied, discrete samples that per-prompt shares give, where BCa can be undefined), 10,000 resamples
  from a fixed seed, so reruns give the same interval;
* a two-sided sign test on the number of positive against negative non-zero differences;
* a verdict, "better" or "worse" only when the interval excludes zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class PairedComparison:
    """A mode against the baseline on ``n`` prompts: means, mean difference with its interval, sign test, verdict."""

    n: int
    mean: float
    baseline_mean: float
    difference: float
    low: float
    high: float
    sign_test_p: float
    verdict: str


def _values(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) < 2:
        raise ValueError(f"{name} must be a 1-D sequence of at least 2 per-prompt values, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array[~np.isfinite(array)][:3].tolist()}")
    return array


def bootstrap_interval(differences: np.ndarray, seed: int = SEED) -> Tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` of the mean of ``differences``; ``(d, d)`` when they are all ``d``."""
    from scipy.stats import bootstrap

    if np.ptp(differences) == 0:
        return float(differences[0]), float(differences[0])
    result = bootstrap((differences,), np.mean, n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
                       method="percentile", random_state=np.random.default_rng(seed))  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def sign_test(differences: np.ndarray) -> float:
    """Two-sided sign-test p-value of positive against negative differences (zeros dropped); 1.0 when all are zero."""
    from scipy.stats import binomtest

    positive, negative = int((differences > 0).sum()), int((differences < 0).sum())
    return float(binomtest(positive, positive + negative).pvalue) if positive + negative else 1.0


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """"better" / "worse" when the interval of ``mode - baseline`` excludes zero, else "no difference"."""
    if low > 0 or high < 0:
        return "better" if (low > 0) == higher_is_better else "worse"
    return "no difference"


def paired_comparison(mode, baseline, higher_is_better: bool = True, seed: int = SEED) -> PairedComparison:
    """Compare aligned per-prompt values of a metric for ``mode`` against ``baseline``."""
    mode, baseline = _values("mode", mode), _values("baseline", baseline)
    if len(mode) != len(baseline):
        raise ValueError(f"mode and baseline must be aligned per prompt, got {len(mode)} and {len(baseline)} values")
    differences = mode - baseline
    low, high = bootstrap_interval(differences, seed)
    return PairedComparison(
        n=len(mode), mean=float(mode.mean()), baseline_mean=float(baseline.mean()),
        difference=float(differences.mean()), low=low, high=high, sign_test_p=sign_test(differences),
        verdict=verdict(low, high, higher_is_better),
    )  # fmt: skip
