"""FC-HarDNet: the network (:mod:`.hardnet`), its factory and pretrained loading (:mod:`.factory`), BN folding
(:mod:`.fusion`), the input contract (:mod:`.preprocessing`) and the model package format (:mod:`.package`)."""

from segmentation.models.factory import ARCHITECTURES, LoadReport, build_model, load_pretrained
from segmentation.models.fusion import fuse_bn
from segmentation.models.hardnet import MIN_INPUT_SIDE, ConvLayer, FCHarDNet, HarDBlock

__all__ = [
    "ARCHITECTURES",
    "MIN_INPUT_SIDE",
    "ConvLayer",
    "FCHarDNet",
    "HarDBlock",
    "LoadReport",
    "build_model",
    "fuse_bn",
    "load_pretrained",
]
