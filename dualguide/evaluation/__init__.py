"""Evaluation of guidance modes against a baseline: metrics, paired statistics and report files.

Modules, one job each: ``statistics`` (paired comparison with a baseline), ``layout`` (position and size
measured from pixels), ``adherence`` (per-attribute hits on the toy model, and whether an image shows what its
negative prompt names), ``features`` (judge features), ``clip`` (CLIP score and image features from a local
folder), ``reference`` (reference images), ``metrics`` (KID and diversity on features) and ``report``
(results.md / .csv / .json, metrics.png, examples.png). Public names are imported lazily: ``import dualguide.evaluation`` loads no model and no torch.
Needs the ``eval`` extra (torchmetrics, scipy, matplotlib).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "PairedComparison": "statistics",
    "paired_comparison": "statistics",
    "Layout": "layout",
    "measure_layout": "layout",
    "ATTRIBUTES": "adherence",
    "attribute_hits": "adherence",
    "NEGATED": "adherence",
    "negated_hits": "adherence",
    "judge_features": "features",
    "check_clip_folder": "clip",
    "load_clip": "clip",
    "clip_scores": "clip",
    "clip_image_features": "clip",
    "load_reference_images": "reference",
    "KernelDistance": "metrics",
    "kid": "metrics",
    "kid_contributions": "metrics",
    "diversity": "metrics",
    "MetricResult": "report",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__():
    return __all__
