"""The one numerical check that an optimised or exported inference path still computes the trained network.

Rule: on seeded random inputs of several sizes, max |logit diff| <= ``atol + rtol * max|logit|`` and argmax agreement
>= ``min_agreement`` at every size, against eager fp32 PyTorch. The relative part exists because fp32 sums over
thousands of products differ in the last bits between two correct implementations: a barely trained model whose
logits reach the hundreds can show a 1e-3 absolute difference that is a 1e-6 relative one. For a trained model
(|logits| < ~50) the tolerance is ``atol``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from segmentation.inference.onnx import INPUT_NAME, OUTPUT_NAME, create_session

PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-5
PARITY_MIN_AGREEMENT = 0.999
PARITY_SIZES = ((64, 128), (65, 97))
EXPORT_VERIFY_SIZES = ((64, 128), (96, 160), (200, 328))


class ParityError(ValueError):
    """An optimised or exported path disagrees with eager fp32 beyond the tolerance; ``result`` holds the numbers."""

    def __init__(self, message: str, result: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_parity(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    reference: nn.Module,
    sizes: Sequence[tuple[int, int]] = PARITY_SIZES,
    batch: int = 2,
    atol: float = PARITY_ATOL,
    min_agreement: float = PARITY_MIN_AGREEMENT,
    seed: int = 0,
    rtol: float = PARITY_RTOL,
) -> dict[str, float]:
    """Compare ``predictor`` with eager fp32 ``reference`` (in eval mode) on seeded random inputs.

    Args:
        predictor: the path under test (anything callable returning logits); its ``repr`` names it in errors.
        reference: the original, unfused module; its train/eval mode is restored afterwards.
        sizes: ``(H, W)`` input sizes to try.
        batch: batch size of each input.
        atol: largest allowed max |diff| on logits (plus ``rtol`` x the largest |logit|).
        min_agreement: smallest allowed fraction of pixels with the same argmax, at every size.
        seed: seed of the random inputs (given in the error message, to reproduce a failure).
        rtol: relative part of the logit tolerance.

    Returns:
        ``{"max_abs_diff", "argmax_agreement", "max_abs_logit"}``, the worst over ``sizes``.

    Raises:
        ParityError: a shape differs, or either tolerance is exceeded; the message gives the numbers per size.
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = reference.training
    reference.eval()
    worst_diff, worst_agreement, scale, per_size = 0.0, 1.0, 0.0, []
    try:
        for height, width in sizes:
            x = torch.randn(batch, 3, height, width, generator=generator).to(model_device(reference))
            with torch.inference_mode():
                expected = reference(x).float().cpu()
                got = predictor(x).float().cpu()
            if got.shape != expected.shape:
                raise ParityError(
                    f"{predictor!r}: output shape {tuple(got.shape)} for input {tuple(x.shape)}, eager gives "
                    f"{tuple(expected.shape)} (were the dynamic axes exported?)"
                )
            diff = (got - expected).abs().max().item()
            agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
            worst_diff, worst_agreement = max(worst_diff, diff), min(worst_agreement, agreement)
            scale = max(scale, expected.abs().max().item())
            per_size.append(f"{height}x{width}: max|diff| {diff:.3g}, argmax agreement {agreement:.5f}")
    finally:
        reference.train(was_training)
    result = {"max_abs_diff": worst_diff, "argmax_agreement": worst_agreement, "max_abs_logit": scale}
    allowed = atol + rtol * scale
    if not worst_diff <= allowed or worst_agreement < min_agreement:  # "not <=" also catches NaN
        raise ParityError(
            f"{predictor!r} disagrees with eager fp32 (seed {seed}): max|diff| {worst_diff:.3g} (allowed "
            f"{allowed:.3g} = {atol:g} + {rtol:g} x max|logit| {scale:.3g}), argmax agreement {worst_agreement:.5f} "
            f"(required {min_agreement:g}); per size: " + "; ".join(per_size),
            result,
        )
    return result


class _OnnxFile:
    """An ONNX file run by the serving logits session (:func:`create_session` with ``only="logits"``, as the
    Predictor runs it) as a logits callable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.session = create_session(self.path, only=OUTPUT_NAME)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: x.cpu().numpy()})[0])

    def __repr__(self) -> str:
        return f"ONNX file {self.path}"


def verify_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    sizes: Sequence[tuple[int, int]] = EXPORT_VERIFY_SIZES,
    batch_size: int = 2,
    atol: float = PARITY_ATOL,
    min_agreement: float = PARITY_MIN_AGREEMENT,
    seed: int | None = None,
    rtol: float = PARITY_RTOL,
) -> dict[str, float]:
    """:func:`check_parity` of an exported ``.onnx`` file, run by the same session serving uses, on fresh inputs.

    Raises:
        ParityError: see :func:`check_parity` (the message gives the seed that reproduces the inputs).
    """
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
    return check_parity(_OnnxFile(onnx_path), model, sizes, batch_size, atol, min_agreement, seed, rtol)
