"""Distribution and diversity metrics on feature vectors (from ``features`` or ``clip``)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000


@dataclass(frozen=True)
class KernelDistance:
    """Unbiased KID (mean over ``subsets`` random subsets of ``subset_size`` from each set) and its standard error."""

    value: float
    standard_error: float
    subset_size: int
    subsets: int


def _features(name: str, features) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite features [N >= 2, D], got shape {array.shape}")
    return array


def kid(features_a, features_b, subset_size: Optional[int] = None, subsets: int = KID_SUBSETS,
        seed: int = 0) -> KernelDistance:  # fmt: skip
    """Kernel inception distance between two feature sets ``[N, D]`` with torchmetrics' ``KernelInceptionDistance``.

    ``subset_size`` defaults to half the smaller set (at most 1000) and is capped at the smaller set.
    torchmetrics returns the spread (std) of the KID over its subsets; each subset holds ``m = subset_size`` of
    the ``n_a`` and ``n_b`` features, so that spread is the sampling error of a KID from ``m`` draws shrunk by
    sampling without replacement. The standard error of the value from all features is then (delete-d
    jackknife, which it equals for ``n_a = n_b``) ``std * sqrt((1/n_a + 1/n_b) / (2/m - 1/n_a - 1/n_b))``:
    about ``std`` at the default ``m``, NaN when ``m`` is both whole sets (no spread to measure). The sets
    should be independent samples: a set against itself reads slightly below 0, as each feature then also
    meets itself across the sets.
    """
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b differ in width: {a.shape[1]} and {b.shape[1]}")
    if subset_size is not None and subset_size < 2:
        raise ValueError(f"subset_size must be at least 2, got {subset_size}")
    smallest = min(len(a), len(b))
    m = max(2, min(subset_size or min(smallest // 2, KID_MAX_SUBSET_SIZE), smallest))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=m)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        value, spread = (float(x) for x in metric.compute())
    inverse_sizes = 1 / len(a) + 1 / len(b)
    remaining = 2 / m - inverse_sizes
    error = spread * math.sqrt(inverse_sizes / remaining) if remaining > 0 else float("nan")
    return KernelDistance(value=value, standard_error=error, subset_size=m, subsets=subsets)


def kid_contributions(features, reference) -> np.ndarray:
    """Each feature's share of the unbiased KID between ``features`` ``[N, D]`` and ``reference`` ``[M, D]``: ``[N]``.

    Their mean is the whole-set unbiased KID (torchmetrics' polynomial kernel, what ``kid`` averages over subsets):
    ``z_i = 2 g_i - 2 f_i - U_ff + U_rr`` with ``g_i`` the mean kernel of feature ``i`` with the other features,
    ``f_i`` its mean kernel with the reference, ``U_ff = mean(g)`` and ``U_rr`` the reference's own term. ``z_i``
    minus the mean is the first-order influence of feature ``i`` on the KID, so with the reference held fixed,
    a paired bootstrap over the ``z`` of two feature sets (same prompts and seeds) gives an interval for the
    difference of their KIDs.
    """
    import torch
    from torchmetrics.image.kid import poly_kernel

    x = torch.from_numpy(_features("features", features))
    y = torch.from_numpy(_features("reference", reference))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features and reference differ in width: {x.shape[1]} and {y.shape[1]}")
    n, m = len(x), len(y)
    within, across, reference_kernel = poly_kernel(x, x), poly_kernel(x, y), poly_kernel(y, y)
    own = (within.sum(dim=1) - within.diagonal()) / (n - 1)
    reference_term = (reference_kernel.sum() - reference_kernel.diagonal().sum()) / (m * (m - 1))
    return (2 * own - 2 * across.mean(dim=1) - own.mean() + reference_term).numpy()


def diversity(features) -> np.ndarray:
    """Per prompt, the mean Euclidean distance between the features of its seeds: ``[P, S, D]`` -> ``[P]``."""
    from scipy.spatial.distance import pdist

    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 3 or array.shape[1] < 2:
        raise ValueError(f"features must be [prompts, seeds >= 2, D], got shape {array.shape}")
    return np.array([pdist(group).mean() for group in array])
