"""Guidance math against hand-computed tensors."""

import math

import pytest
import torch

from dualguide.guidance import guided_prediction, nag_extrapolate, rescale_guidance


def test_cfg_alone_matches_hand_computation():
    cond, uncond = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0])
    # D_u + w (D_c - D_u) = 1 + 3 * (1, 3)
    assert torch.equal(guided_prediction(cond, uncond, guidance_scale=3.0), torch.tensor([4.0, 10.0]))


def test_perturbation_alone_and_with_cfg():
    cond, uncond, perturbed = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.5])
    # D_c + s (D_c - D_p) = 2 + 2 * 1.5
    assert torch.equal(guided_prediction(cond, None, 7.0, [(2.0, perturbed)]), torch.tensor([5.0]))
    # D_c + (w-1)(D_c-D_u) + s (D_c-D_p) = 2 + 2 * 1 + 2 * 1.5
    assert torch.allclose(guided_prediction(cond, uncond, 3.0, [(2.0, perturbed)]), torch.tensor([7.0]))


def test_two_perturbed_branches_add_up():
    cond = torch.tensor([1.0])
    out = guided_prediction(cond, None, 1.0, [(1.0, torch.tensor([0.0])), (0.5, torch.tensor([3.0]))])
    assert torch.allclose(out, torch.tensor([1.0 + 1.0 - 1.0]))


def test_rescale_matches_definition():
    torch.manual_seed(0)
    guided, cond = torch.randn(2, 3, 4) * 3, torch.randn(2, 3, 4)
    expected = guided * (cond.std(dim=(1, 2), keepdim=True) / guided.std(dim=(1, 2), keepdim=True))
    out = rescale_guidance(guided, cond, 0.7)
    assert torch.allclose(out, 0.7 * expected + 0.3 * guided)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)


def _nag_by_hand(positive, negative, scale, tau, alpha, p):
    """Element-wise reference for one token."""
    extrapolated = [scale * a - (scale - 1) * b for a, b in zip(positive, negative)]
    norm = (lambda v: sum(abs(x) for x in v)) if p == 1 else (lambda v: math.sqrt(sum(x * x for x in v)))
    ratio = norm(extrapolated) / norm(positive)
    factor = min(ratio, tau) / ratio
    return [alpha * e * factor + (1 - alpha) * a for e, a in zip(extrapolated, positive)]


@pytest.mark.parametrize("use_l1", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_nag_no_clipping(use_l1, alpha):
    positive, negative = [1.0, 2.0], [0.5, 1.5]  # ratio below tau
    expected = _nag_by_hand(positive, negative, 3.0, 2.5, alpha, 1 if use_l1 else 2)
    out = nag_extrapolate(torch.tensor([positive]), torch.tensor([negative]), 3.0, 2.5, alpha, use_l1)
    assert torch.allclose(out, torch.tensor([expected]))
    if alpha == 0.0:
        assert torch.allclose(out, torch.tensor([positive]))


@pytest.mark.parametrize("use_l1", [True, False])
def test_nag_clipping_caps_norm_ratio_at_tau(use_l1):
    positive, negative = [1.0, 0.0], [-3.0, 2.0]  # Zt = (7, -4): ratio far above tau
    expected = _nag_by_hand(positive, negative, 2.0, 1.5, 1.0, 1 if use_l1 else 2)
    out = nag_extrapolate(torch.tensor([positive]), torch.tensor([negative]), 2.0, 1.5, 1.0, use_l1)
    assert torch.allclose(out, torch.tensor([expected]))
    order = 1 if use_l1 else 2
    ratio = torch.linalg.vector_norm(out, ord=order) / torch.linalg.vector_norm(torch.tensor(positive), ord=order)
    assert torch.isclose(ratio, torch.tensor(1.5))


def test_nag_guards_zero_norms():
    zero = torch.zeros(1, 4)
    out = nag_extrapolate(zero, zero, 3.0, 2.5, 0.5)
    assert torch.isfinite(out).all() and torch.equal(out, zero)


def test_nag_scale_one_is_identity():
    torch.manual_seed(1)
    positive, negative = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert torch.allclose(nag_extrapolate(positive, negative, 1.0, 2.5, 0.5), positive)


@pytest.mark.parametrize("use_l1", [True, False])
def test_nag_out_may_be_positive_itself(use_l1):
    torch.manual_seed(2)
    positive, negative = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = nag_extrapolate(positive.clone(), negative.clone(), 4.0, 2.5, 0.5, use_l1)
    target = positive.clone()
    negative_before = negative.clone()
    result = nag_extrapolate(target, negative, 4.0, 2.5, 0.5, use_l1, out=target)
    assert result.data_ptr() == target.data_ptr() and torch.equal(target, expected)
    assert not torch.equal(target, positive) and torch.equal(negative, negative_before)


def test_nag_out_of_another_shape_is_refused_before_any_work():
    positive, negative, out = torch.ones(2, 5, 8), torch.zeros(2, 5, 8), torch.full((1, 5, 8), 7.0)
    with pytest.raises(ValueError, match="out must have the shape of positive"):
        nag_extrapolate(positive, negative, 4.0, 2.5, 0.5, out=out)
    assert torch.equal(out, torch.full((1, 5, 8), 7.0)) and torch.equal(positive, torch.ones(2, 5, 8))


@pytest.mark.parametrize("use_l1", [True, False])
def test_nag_is_differentiable(use_l1):
    torch.manual_seed(3)
    positive = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    negative = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, n: nag_extrapolate(p, n, 4.0, 2.5, 0.5, use_l1), (positive, negative))
