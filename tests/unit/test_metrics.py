"""Confusion matrix and scores on a hand-computed 3-class case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segmentation.evaluation.metrics import confusion_matrix, scores

TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
PRED = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 0])
# rows = ground truth, columns = prediction
MATRIX = [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
# IoU = tp / (row + col - tp): 2/(3+3-2), 1/(2+2-1), 3/(4+4-3)
IOU = [0.5, 1 / 3, 0.6]


def test_confusion_matrix_3x3():
    matrix = confusion_matrix(PRED.view(1, 3, 3), TARGET.view(1, 3, 3), num_classes=3)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == MATRIX


def test_scores_hand_computed():
    result = scores(torch.tensor(MATRIX))
    assert result["iou"] == pytest.approx(IOU)
    assert result["mIoU"] == pytest.approx(sum(IOU) / 3)
    assert result["pixel_acc"] == pytest.approx(6 / 9)
    assert result["mean_acc"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert result["class_acc"] == pytest.approx([2 / 3, 1 / 2, 3 / 4])


def test_ignored_and_out_of_range_targets_are_excluded():
    pred = torch.cat([PRED, torch.tensor([0, 1, 2])])
    target = torch.cat([TARGET, torch.tensor([255, 255, 7])])
    assert confusion_matrix(pred, target, 3, ignore_index=255).tolist() == MATRIX


def test_absent_class_is_nan_and_skipped_by_the_mean():
    result = scores(confusion_matrix(PRED, TARGET, num_classes=4))
    assert math.isnan(result["iou"][3]) and math.isnan(result["class_acc"][3])
    assert result["mIoU"] == pytest.approx(sum(IOU) / 3)


def test_class_only_predicted_has_zero_iou():
    result = scores(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), num_classes=2))
    assert result["iou"] == pytest.approx([0.5, 0.0])
    assert math.isnan(result["class_acc"][1])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(PRED, TARGET[:5], 3)
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[0, 5\]"):
        confusion_matrix(torch.tensor([5, 0]), torch.tensor([0, 0]), 3)


def test_empty_matrix_gives_nan():
    result = scores(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(result["mIoU"]) and math.isnan(result["pixel_acc"])
