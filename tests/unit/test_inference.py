"""The deployed inference path: every backend matches eager fp32 of the unfused model, at any size >= 64."""

import numpy as np
import pytest
import torch
from conftest import random_bn_model

from segmentation.inference.parity import ParityError, check_parity
from segmentation.inference.predictor import BACKENDS, Predictor
from segmentation.inference.tta import pad_to_min_side, predict_logits
from segmentation.models import FCHarDNet
from segmentation.models.preprocessing import to_input_tensor


@pytest.fixture(scope="module")
def model() -> FCHarDNet:
    return random_bn_model(num_classes=5).train()  # the Predictor must not depend on the caller having called eval()


@pytest.fixture(scope="module", params=BACKENDS)
def predictor(request, model) -> Predictor:
    return Predictor(model, backend=request.param)


def test_backend_matches_eager_at_odd_sizes(predictor, model):
    result = check_parity(predictor, model, sizes=((64, 128), (65, 97)), batch=2)
    assert result["max_abs_diff"] <= 1e-3
    assert result["argmax_agreement"] >= 0.999
    assert model.training, "check_parity must restore the reference's train mode"


def test_logits_and_mask_shapes(predictor, model):
    x = torch.randn(2, 3, 65, 97)
    logits = predictor.logits(x)
    assert logits.shape == (2, 5, 65, 97) and logits.dtype == torch.float32 and logits.is_contiguous()
    image = np.random.default_rng(0).integers(0, 256, (40, 97, 3), dtype=np.uint8)  # padded to 64 rows inside
    mask = predictor.predict_mask(image)
    assert mask.shape == (40, 97) and mask.dtype == np.uint8
    expected = predictor.logits(pad_to_min_side(to_input_tensor(image)))[0, :, :40].argmax(0)
    assert np.array_equal(mask, expected.numpy())


def test_auto_picks_onnxruntime_on_cpu(model):
    assert Predictor(model).backend == "onnxruntime"


def test_too_small_input_is_rejected_with_the_model_message(predictor):
    with pytest.raises(ValueError, match="too small"):
        predictor.logits(torch.zeros(1, 3, 32, 128))


def test_unknown_backend_lists_allowed():
    with pytest.raises(ValueError, match="channels_last"):
        Predictor(FCHarDNet(num_classes=2), backend="tensorrt")


def test_parity_check_fails_loudly_on_a_wrong_path(model):
    class Shifted:
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model.eval()(x) + 0.01

    with pytest.raises(ParityError, match="max\\|diff\\|"):
        check_parity(Shifted(), model, sizes=((64, 64),), batch=1)


def test_class_ids_of_a_batch_come_from_the_graph_and_equal_the_argmax_of_its_logits():
    predictor = Predictor(random_bn_model(num_classes=5), "onnxruntime")
    batch = torch.randn(2, 3, 40, 70, generator=torch.Generator().manual_seed(1))  # padded to 64, cropped back
    ids = predictor.predict_class_ids(batch)
    assert ids.dtype == torch.uint8 and ids.shape == (2, 40, 70)  # uint8: the session's class_ids output
    assert torch.equal(ids.long(), predict_logits(predictor, batch).argmax(1))
    flipped = predictor.predict_class_ids(batch, tta="flip")  # averaged logits: the argmax is taken here
    assert flipped.dtype == torch.int64 and torch.equal(
        flipped, predict_logits(predictor, batch, tta="flip").argmax(1)
    )
