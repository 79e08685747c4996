"""FC-HarDNet-70 (Chao et al., "HarDNet: A Low Memory Traffic Network", ICCV 2019), the PingoLH/FCHarDNet network.

Module names and registration order follow the released checkpoint (``base``, ``transUpBlocks``, ``denseBlocksUp``,
``conv1x1_up``, ``finalConv``), so its state_dict loads key for key. The encoder is a single ``base`` ModuleList of
18 entries: a 4-layer stem, then per stage a HarDBlock, a 1x1 transition and (for the first four) an AvgPool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_INPUT_SIDE = 64  # the bottleneck runs at stride 64; smaller inputs pool some side down to nothing
GROWTH_MULTIPLIER = 1.7

# (growth rate k, number of layers n, 1x1 transition width) per encoder stage; the decoder mirrors stages 3..0.
ENCODER_STAGES: tuple[tuple[int, int, int], ...] = (
    (10, 4, 64),
    (16, 4, 96),
    (18, 8, 160),
    (24, 8, 224),
    (32, 8, 320),
)
STEM_WIDTHS = (16, 24, 32, 48)


def harmonic_links(layer: int) -> list[int]:
    """Indices of the earlier layers that ``layer`` reads, newest first (layer 0 is the block input).

    Layer L reads L - 2^i for every 2^i that divides L; e.g. 8 -> [7, 6, 4, 0].
    """
    links = []
    step = 1
    while step <= layer and layer % step == 0:
        links.append(layer - step)
        step *= 2
    return links


def harmonic_width(growth_rate: int, num_links: int, multiplier: float = GROWTH_MULTIPLIER) -> int:
    """``k * m^(links-1)`` rounded to the largest even integer <= value + 1 (the reference's rounding)."""
    width = float(growth_rate)
    for _ in range(num_links - 1):  # repeated multiplication, as the reference does, to match its float rounding
        width *= multiplier
    return int(width + 1) // 2 * 2


class ConvLayer(nn.Sequential):
    """Conv2d (no bias, same padding) -> BatchNorm2d -> ReLU; children named ``conv``/``norm`` as in the checkpoint."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.add_module(
            "conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        )
        self.add_module("norm", nn.BatchNorm2d(out_channels))
        self.add_module("relu", nn.ReLU(inplace=True))


class HarDBlock(nn.Module):
    """Harmonic dense block: layer L concatenates the layers in ``links[L-1]`` (newest first) and applies a 3x3 conv.

    The output is the concat of the odd-numbered layers and the last layer, in ascending order; the block input is
    not part of it.

    Attributes:
        links: per layer (1..n), the indices it reads; 0 is the block input.
        layer_widths: output channels of layers 1..n.
        output_layers: the layer indices concatenated into the output.
        out_channels: sum of the widths of ``output_layers``.
    """

    def __init__(self, in_channels: int, growth_rate: int, num_layers: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.links = [harmonic_links(layer) for layer in range(1, num_layers + 1)]
        widths = [in_channels]  # widths[i] = channels of layer i; index 0 is the block input
        layers = []
        for link in self.links:
            width = harmonic_width(growth_rate, len(link))
            layers.append(ConvLayer(sum(widths[i] for i in link), width))
            widths.append(width)
        self.layers = nn.ModuleList(layers)
        self.layer_widths = widths[1:]
        self.output_layers = [i for i in range(1, num_layers + 1) if i % 2 == 1 or i == num_layers]
        self.out_channels = sum(widths[i] for i in self.output_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for layer, link in zip(self.layers, self.links, strict=True):
            inputs = [outputs[i] for i in link]
            outputs.append(layer(torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0]))
        return torch.cat([outputs[i] for i in self.output_layers], 1)


class TransitionUp(nn.Module):
    """Bilinear upsampling to the skip's exact size (align_corners=True), then concat [upsampled, skip]. No params."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([x, skip], 1)


class FCHarDNet(nn.Module):
    """FC-HarDNet-70: a U-Net of HarDBlocks with a stride-64 bottleneck; 4,119,257 parameters for 19 classes.

    Args:
        num_classes: number of output channels (logits per class).

    Shape:
        - Input: ``(N, 3, H, W)`` float, BGR normalised as in :mod:`segmentation.models.preprocessing`,
          with ``H, W >= 64`` (any size, not only multiples of 64).
        - Output: ``(N, num_classes, H, W)`` logits at the input size.

    Example:
        >>> model = FCHarDNet(num_classes=19).eval()
        >>> model(torch.zeros(1, 3, 96, 160)).shape
        torch.Size([1, 19, 96, 160])
    """

    output_stride = 64

    def __init__(self, num_classes: int = 19) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

        base: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(STEM_WIDTHS):
            base.append(ConvLayer(channels, width, kernel_size=3, stride=2 if i % 2 == 0 else 1))
            channels = width
        self.skip_channels: list[int] = []
        self.skip_indices: list[int] = []  # base indices whose outputs feed the decoder
        for stage, (growth_rate, num_layers, transition) in enumerate(ENCODER_STAGES):
            block = HarDBlock(channels, growth_rate, num_layers)
            if stage < len(ENCODER_STAGES) - 1:
                self.skip_indices.append(len(base))
                self.skip_channels.append(block.out_channels)
            base += [block, ConvLayer(block.out_channels, transition, kernel_size=1)]
            channels = transition
            if stage < len(ENCODER_STAGES) - 1:
                base.append(nn.AvgPool2d(kernel_size=2, stride=2))  # floor rounding; the decoder resizes exactly
        self.base = nn.ModuleList(base)

        trans_up, dense_up, conv_up = [], [], []
        for stage in reversed(range(len(ENCODER_STAGES) - 1)):
            growth_rate, num_layers, _ = ENCODER_STAGES[stage]
            concat = channels + self.skip_channels[stage]
            trans_up.append(TransitionUp())
            conv_up.append(ConvLayer(concat, concat // 2, kernel_size=1))
            dense_up.append(HarDBlock(concat // 2, growth_rate, num_layers))
            channels = dense_up[-1].out_channels
        # Registration order fixes the state_dict order: decoder blocks come before the decoder 1x1 convs.
        self.transUpBlocks = nn.ModuleList(trans_up)
        self.denseBlocksUp = nn.ModuleList(dense_up)
        self.conv1x1_up = nn.ModuleList(conv_up)
        self.finalConv = nn.Conv2d(channels, num_classes, kernel_size=1, bias=True)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)

    @property
    def blocks(self) -> list[HarDBlock]:
        """All HarDBlocks: the five encoder blocks, then the four decoder blocks (deepest first)."""
        return [m for m in self.base if isinstance(m, HarDBlock)] + list(self.denseBlocksUp)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(N, 3, H, W)`` with ``H, W >= MIN_INPUT_SIDE``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FCHarDNet expects an (N, 3, H, W) tensor, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height < MIN_INPUT_SIDE or width < MIN_INPUT_SIDE:
            raise ValueError(
                f"input of shape {tuple(x.shape)} is too small: FCHarDNet needs H and W >= {MIN_INPUT_SIDE} "
                f"(its bottleneck runs at stride {self.output_stride}); resize or pad the image to at least "
                f"{max(height, MIN_INPUT_SIDE)}x{max(width, MIN_INPUT_SIDE)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        out = x
        for i, module in enumerate(self.base):
            out = module(out)
            if i in self.skip_indices:
                skips.append(out)
        for trans_up, conv_up, dense_up in zip(self.transUpBlocks, self.conv1x1_up, self.denseBlocksUp, strict=True):
            out = dense_up(conv_up(trans_up(out, skips.pop())))
        logits = self.finalConv(out)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
