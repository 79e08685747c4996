"""FC-HarDNet-70 against the reference facts (../shared/reference/hardnet_facts.md) and the released key list."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import random_bn_model
from torch import nn

from segmentation.config import ModelConfig
from segmentation.models import (
    MIN_INPUT_SIDE,
    FCHarDNet,
    build_model,
    fuse_bn,
    load_pretrained,
)
from segmentation.models.hardnet import HarDBlock, TransitionUp, harmonic_links

REFERENCE_KEYS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "fchardnet70_state_dict_keys.json"

# Facts tables 1.3 and 1.4: (block input, layer widths, layer input widths, block out), encoder 0-4 then decoder 0-3.
BLOCKS = [
    (48, [10, 18, 10, 28], [48, 58, 18, 76], 48),
    (64, [16, 28, 16, 46], [64, 80, 28, 108], 78),
    (96, [18, 30, 18, 52, 18, 30, 18, 88], [96, 114, 30, 144, 52, 70, 30, 196], 160),
    (160, [24, 40, 24, 70, 24, 40, 24, 118], [160, 184, 40, 224, 70, 94, 40, 294], 214),
    (224, [32, 54, 32, 92, 32, 54, 32, 158], [224, 256, 54, 310, 92, 124, 54, 402], 286),
    (267, [24, 40, 24, 70, 24, 40, 24, 118], None, 214),
    (187, [18, 30, 18, 52, 18, 30, 18, 88], None, 160),
    (119, [16, 28, 16, 46], None, 78),
    (63, [10, 18, 10, 28], None, 48),
]
LINKS_8 = [[0], [1, 0], [2], [3, 2, 0], [4], [5, 4], [6], [7, 6, 4, 0]]


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def model() -> FCHarDNet:
    torch.manual_seed(0)
    return FCHarDNet(num_classes=19).eval()


@pytest.fixture(scope="module")
def reference_keys() -> dict[str, list[int]]:
    if not REFERENCE_KEYS.is_file():
        pytest.skip(f"reference key list not found at {REFERENCE_KEYS} (only beside the team's checkout)")
    return json.loads(REFERENCE_KEYS.read_text())


def test_harmonic_links_are_newest_first():
    assert [harmonic_links(layer) for layer in range(1, 9)] == LINKS_8
    assert harmonic_links(16) == [15, 14, 12, 8, 0]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_widths_match_reference_tables(model, index):
    block = model.blocks[index]
    in_channels, widths, input_widths, out_channels = BLOCKS[index]
    assert block.in_channels == in_channels
    assert block.layer_widths == widths
    assert block.links == LINKS_8[: len(widths)]
    assert block.out_channels == out_channels
    assert [layer.conv.in_channels for layer in block.layers] == [
        sum(([in_channels] + widths)[i] for i in link) for link in block.links
    ]
    if input_widths is not None:
        assert [layer.conv.in_channels for layer in block.layers] == input_widths


def _record_outputs(block: HarDBlock, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    inputs, outputs = [], []

    def record(module, args, output):  # returns None, so the output is left as it is
        inputs.append(args[0])
        outputs.append(output)

    hooks = [layer.register_forward_hook(record) for layer in block.layers]
    out = block(x)
    for hook in hooks:
        hook.remove()
    return inputs, outputs, out


def test_block_concat_order_and_output_layers():
    torch.manual_seed(0)
    block = HarDBlock(48, 10, 4).eval()
    x = torch.randn(1, 48, 8, 8)
    with torch.no_grad():
        inputs, outputs, out = _record_outputs(block, x)
    layer = [x] + outputs
    # Layer 4 reads [3, 2, 0] newest first; the output is layers 1, 3 and 4 (odd ones plus the last), no input.
    torch.testing.assert_close(inputs[3], torch.cat([layer[3], layer[2], layer[0]], 1))
    torch.testing.assert_close(inputs[1], torch.cat([layer[1], layer[0]], 1))
    torch.testing.assert_close(out, torch.cat([layer[1], layer[3], layer[4]], 1))


def test_transition_up_resizes_to_skip_with_align_corners_and_puts_upsampled_first():
    x = torch.tensor([0.0, 3.0]).view(1, 1, 2, 1)
    skip = torch.full((1, 2, 4, 1), 7.0)
    out = TransitionUp()(x, skip)
    # align_corners=True samples the ends exactly: 0, 1, 2, 3 (align_corners=False would give 0, 0.75, 2.25, 3).
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(out[:, 1:], skip)


def test_parameter_count(model):
    assert num_parameters(model) == 4_119_257


@pytest.mark.parametrize("num_classes", [2, 8])
def test_parameter_count_formula(num_classes):
    assert num_parameters(FCHarDNet(num_classes)) == 4_118_326 + 49 * num_classes


def test_state_dict_matches_released_keys_and_shapes(model, reference_keys):
    state = model.state_dict()
    assert list(state) == list(reference_keys)
    assert {k: list(v.shape) for k, v in state.items()} == reference_keys
    released = {k: torch.zeros(shape) for k, shape in reference_keys.items()}
    FCHarDNet(19).load_state_dict(released, strict=True)


def test_conv_weights_are_xavier_normal(model):
    weight = model.base[17].conv.weight  # 320 x 286 x 1 x 1: ~91k samples
    expected_std = math.sqrt(2.0 / (286 + 320))
    assert abs(weight.std().item() / expected_std - 1) < 0.03
    assert model.finalConv.bias is not None


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (65, 97)])
def test_logits_have_input_size(model, size):
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 19, *size)


def test_bottleneck_uses_floor_pooling(model):
    # Facts 1.6: 96x160 -> pools 12x20, 6x10, 3x5, 1x2 (floor), so the bottleneck is 1x2.
    seen = {}
    hook = model.base[17].register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)) and None)
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 160))
    hook.remove()
    assert seen["shape"] == (1, 320, 1, 2)


@pytest.mark.parametrize("size", [(63, 64), (64, 40)])
def test_small_input_raises(model, size):
    assert MIN_INPUT_SIDE == 64
    with pytest.raises(ValueError, match=r"\(1, 3, \d+, \d+\).*>= 64"):
        model(torch.randn(1, 3, *size))


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    net = FCHarDNet(num_classes=3).train()
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_fused_model_matches_unfused():
    net = random_bn_model(num_classes=5)
    fused = fuse_bn(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules()), "fuse_bn must not modify its input"
    assert num_parameters(fused) == 4_115_535 - 14 * 49  # 4,115,535 for 19 classes; the head has 49 per class
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), atol=1e-4, rtol=0)


# --- load_pretrained ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained() -> FCHarDNet:
    torch.manual_seed(1)
    net = FCHarDNet(num_classes=19)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)  # differ from any freshly initialised model
    return net


def _assert_equal_states(a: dict, b: dict, keys) -> None:
    for key in keys:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_load_released_format(trained, tmp_path):
    path = tmp_path / "hardnet70_cityscapes_model.pkl"
    released = {"module." + k: v for k, v in trained.state_dict().items()}
    torch.save({"epoch": 90000, "model_state": released, "best_iou": 0.777}, path)
    net = FCHarDNet(19)
    report = load_pretrained(net, path)
    assert report.source == "released" and not report.kept
    _assert_equal_states(net.state_dict(), trained.state_dict(), trained.state_dict())


def test_load_plain_state_dict_and_build_model(trained, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    net = build_model(ModelConfig(arch="fchardnet70", num_classes=19, pretrained=str(path)))
    _assert_equal_states(net.state_dict(), trained.state_dict(), trained.state_dict())


def test_load_backbone_only(trained, tmp_path):
    path = tmp_path / "hardnet_petite_base.pth"
    torch.save(trained.base.state_dict(), path)
    net = FCHarDNet(19)
    decoder_before = net.finalConv.weight.clone()
    report = load_pretrained(net, path)
    assert report.source == "backbone" and "decoder" in report.message
    _assert_equal_states(net.base.state_dict(), trained.base.state_dict(), trained.base.state_dict())
    torch.testing.assert_close(net.finalConv.weight, decoder_before)


def test_load_other_num_classes_keeps_head(trained, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    net = FCHarDNet(num_classes=8)
    head_before = net.finalConv.weight.clone()
    report = load_pretrained(net, path)
    assert report.kept == ["finalConv.weight", "finalConv.bias"]
    assert "19 classes" in report.message and "8" in report.message
    torch.testing.assert_close(net.finalConv.weight, head_before)
    torch.testing.assert_close(net.base[0].conv.weight, trained.base[0].conv.weight)
    torch.testing.assert_close(
        net.denseBlocksUp[3].layers[3].norm.running_var, trained.denseBlocksUp[3].layers[3].norm.running_var
    )


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_pretrained(FCHarDNet(19), tmp_path / "nope.pkl")


def test_load_other_architecture(tmp_path):
    path = tmp_path / "resnetish.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).state_dict(), path)
    with pytest.raises(ValueError, match="not a checkpoint of FCHarDNet.*0.weight"):
        load_pretrained(FCHarDNet(19), path)


def test_load_whole_pickled_module_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="weights_only"):
        load_pretrained(FCHarDNet(19), path)


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_load_reports_mismatches_by_name(trained, tmp_path, defect):
    state = dict(trained.state_dict())
    if defect == "missing":
        del state["denseBlocksUp.1.layers.7.conv.weight"]
        expected = r"missing keys: denseBlocksUp\.1\.layers\.7\.conv\.weight"
    elif defect == "unexpected":
        state["aux_head.weight"] = torch.zeros(3)
        expected = r"unexpected keys: aux_head\.weight"
    else:
        state["base.4.layers.3.conv.weight"] = torch.zeros(28, 75, 3, 3)
        expected = r"base\.4\.layers\.3\.conv\.weight \(28, 75, 3, 3\) vs model \(28, 76, 3, 3\)"
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=expected):
        load_pretrained(FCHarDNet(19), path)


def test_build_model_unknown_arch_lists_valid():
    with pytest.raises(ValueError, match=r"Unknown model arch 'unet'.*fchardnet70"):
        build_model(ModelConfig(arch="unet"))
