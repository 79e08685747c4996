"""Losses on hand-made pixels whose cross-entropy is known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from segmentation.config import LossConfig
from segmentation.training.losses import BootstrappedCrossEntropy, CrossEntropy, bootstrapped_cross_entropy, build_loss

IGNORE = 255


def logits_with_losses(losses: list[list[float]], width: int = 3) -> torch.Tensor:
    """Two-class logits of shape (N, 2, H, width) whose CE against class 0 equals ``losses`` pixel by pixel.

    With logits [0, s] and target 0 the CE is log(1 + e^s), so s = log(e^L - 1).
    """
    s = torch.tensor([[math.log(math.expm1(v)) for v in image] for image in losses])
    n, pixels = s.shape
    return torch.stack([torch.zeros_like(s), s], 1).view(n, 2, pixels // width, width)


def zeros_target(n: int, pixels: int, width: int = 3) -> torch.Tensor:
    return torch.zeros(n, pixels // width, width, dtype=torch.long)


def test_threshold_branch():
    # Position 2 (the 3rd largest) is 0.5 > 0.3: the mean of all losses > 0.3 (the top-2 mean would be 1.5).
    logits = logits_with_losses([[2.0, 0.05, 1.0, 0.4, 0.1, 0.5]])
    loss = bootstrapped_cross_entropy(logits, zeros_target(1, 6), min_k=2, threshold=0.3, ignore_index=IGNORE)
    assert loss.item() == pytest.approx((2.0 + 1.0 + 0.5 + 0.4) / 4, abs=1e-5)


def test_top_k_branch():
    # Position 3 is 0.1 <= 0.3: the mean of the top 3 (the mean of all > 0.3 would be 1.5).
    logits = logits_with_losses([[0.01, 2.0, 0.1, 1.0, 0.05, 0.2]])
    loss = bootstrapped_cross_entropy(logits, zeros_target(1, 6), min_k=3, threshold=0.3, ignore_index=IGNORE)
    assert loss.item() == pytest.approx((2.0 + 1.0 + 0.2) / 3, abs=1e-5)


def test_per_image_then_batch_mean():
    logits = logits_with_losses([[2.0, 0.05, 1.0, 0.4, 0.1, 0.5], [0.01, 2.0, 0.1, 0.2, 0.05, 0.02]])
    loss = bootstrapped_cross_entropy(logits, zeros_target(2, 6), min_k=2, threshold=0.3, ignore_index=IGNORE)
    # image 0: threshold branch, 0.975; image 1: position 2 is 0.1, top-2 branch, (2 + 0.2) / 2.
    assert loss.item() == pytest.approx((0.975 + 1.1) / 2, abs=1e-5)


def test_ignored_pixels_count_as_zero_in_the_sorted_list():
    logits = logits_with_losses([[2.0, 1.0, 5.0, 5.0, 0.2, 0.1]])
    target = zeros_target(1, 6)
    target.view(-1)[2:4] = IGNORE
    # Sorted: 2, 1, 0.2, 0.1, 0, 0 -> position 3 is 0.1: top-3 mean. The two 5.0 losses are ignored.
    loss = bootstrapped_cross_entropy(logits, target, min_k=3, threshold=0.3, ignore_index=IGNORE)
    assert loss.item() == pytest.approx((2.0 + 1.0 + 0.2) / 3, abs=1e-5)
    # With K beyond the labelled pixels the zeros are averaged in (dropping them would give 1.5).
    target.view(-1)[4:] = IGNORE
    loss = bootstrapped_cross_entropy(logits, target, min_k=3, threshold=0.3, ignore_index=IGNORE)
    assert loss.item() == pytest.approx((2.0 + 1.0 + 0.0) / 3, abs=1e-5)


def test_k_at_least_the_pixel_count_averages_all_pixels():
    logits = logits_with_losses([[2.0, 1.0, 0.5, 0.4, 0.2, 0.1]])
    for min_k in (6, 100):
        loss = bootstrapped_cross_entropy(logits, zeros_target(1, 6), min_k=min_k, threshold=0.3)
        assert loss.item() == pytest.approx(4.2 / 6, abs=1e-5)


def test_logits_smaller_than_target_are_resized_and_gradients_flow():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 16, 16))
    loss = BootstrappedCrossEntropy(min_k=10)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0


def test_cross_entropy_with_class_weights_and_ignore():
    logits = logits_with_losses([[0.5, 2.0, 7.0]], width=3)
    target = torch.tensor([[[0, 1, IGNORE]]])
    # Pixel 1 has target 1: its CE is log(1 + e^-s) = L - s with s = log(e^2 - 1).
    loss_1 = math.log1p(1 / math.expm1(2.0))
    loss = CrossEntropy(class_weights=[1.0, 3.0])(logits, target)
    assert loss.item() == pytest.approx((1.0 * 0.5 + 3.0 * loss_1) / 4.0, abs=1e-5)
    assert CrossEntropy()(logits, target).item() == pytest.approx((0.5 + loss_1) / 2, abs=1e-5)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = CrossEntropy()(logits, torch.full((1, 2, 2), IGNORE))
    loss.backward()
    assert loss.item() == 0.0


def test_build_loss():
    assert isinstance(build_loss(LossConfig()), BootstrappedCrossEntropy)
    assert build_loss(LossConfig(min_k=7, threshold=0.5)).min_k == 7
    ce = build_loss(LossConfig(name="ce", class_weights=[1.0, 2.0]), num_classes=2)
    assert ce.class_weights.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    ("cfg", "num_classes", "message"),
    [
        (LossConfig(name="focal"), None, r"Unknown loss 'focal'.*bootstrapped_ce.*ce"),
        (LossConfig(class_weights=[1.0, 2.0]), None, "only used by loss.name=ce"),
        (LossConfig(name="ce", class_weights=[1.0, 2.0]), 19, "2 entries.*19"),
        (LossConfig(min_k=0), None, "min_k must be >= 1"),
    ],
)
def test_build_loss_errors(cfg, num_classes, message):
    with pytest.raises(ValueError, match=message):
        build_loss(cfg, num_classes=num_classes)
