"""Inference-time BatchNorm folding: the same function with fewer ops."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fuse_bn(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every ConvLayer's BatchNorm folded into its conv.

    The copy computes the same function as ``model.eval()`` (to float rounding) with fewer ops; its state_dict
    keys differ (``norm`` is gone, convs gain a bias), so save the unfused model, not this one.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        conv, norm = getattr(module, "conv", None), getattr(module, "norm", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(conv, norm)
            module.conv.bias.requires_grad_(conv.weight.requires_grad)  # torch leaves a new bias frozen
            module.norm = nn.Identity()
    return fused
