"""A refusal costs next to no memory, measured against the largest valid request of the same kind.

Each request runs in a fresh child process that loads the pyfunc, warms it up on one 64 x 64 image, then reads its
own peak resident memory (VmHWM in /proc/self/status) before and after ``predict``. The child reads its own
status because ``ru_maxrss`` of a child inherits the parent's peak on Linux.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.models import FCHarDNet
from segmentation.models.package import save_model_package

pytestmark = pytest.mark.e2e

CHILD = r"""
import json, sys
import numpy as np, pandas as pd
from segmentation.mlops.serving import SegmentationModel
from segmentation.mlops.serving_requests import encode_image

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

def flat(height, width):
    return encode_image(np.zeros((height, width, 3), np.uint8))

KINDS = {"strip": lambda n: [flat(1, n)], "images": lambda n: [flat(512, 512)] * n, "rows": lambda n: [flat(1, 1)] * n}
package, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = SegmentationModel().setup(package)
model.predict(None, pd.DataFrame({"image": [flat(64, 64)]}))
request = pd.DataFrame({"image": KINDS[kind](n)})
before = peak_kib()
try:
    model.predict(None, request)
    refused = ""
except Exception as exc:
    refused = getattr(exc, "message", repr(exc))
print(json.dumps({"peak_growth_kib": peak_kib() - before, "refused": refused}))
"""

LIMITS = {
    "SEGMENTATION_MAX_PIXELS": str(64 * 4096),  # a 1 x 4096 strip computes 64 x 4096 pixels: the largest allowed
    "SEGMENTATION_MAX_REQUEST_PIXELS": str(4 * 512 * 512),
    "SEGMENTATION_MAX_ROWS": "16",
    "SEGMENTATION_INFERENCE_BACKEND": "eager",
}
# kind: (size of the largest valid request, size of a refused one, what the refusal says)
KINDS = {
    "strip": (4096, 200_000, "padded to 200000x64 = 12800000 pixels"),  # 1 x n; 200,000 pixels as stored
    "images": (4, 5, "5 image(s) take 1310720 pixels padded"),  # n flat 512 x 512 images
    "rows": (16, 17, "17 rows, more than the limit of 16"),  # n 1 x 1 images
}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = FCHarDNet(num_classes=19).eval()
    return save_model_package(model, ClassInfo.cityscapes(), ModelConfig(), tmp_path_factory.mktemp("memory") / "pkg")


def run_child(package, kind: str, n: int) -> dict:
    env = {**os.environ, **LIMITS, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(package), kind, str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_refusal_costs_less_memory_than_the_largest_valid_request_of_its_kind(package, kind):
    valid_n, refused_n, message = KINDS[kind]
    valid, refused = run_child(package, kind, valid_n), run_child(package, kind, refused_n)
    print(f"{kind}: valid {valid['peak_growth_kib']} KiB, refused {refused['peak_growth_kib']} KiB")
    assert valid["refused"] == ""
    assert message in refused["refused"]
    assert refused["peak_growth_kib"] < 4096, refused
    assert refused["peak_growth_kib"] <= valid["peak_growth_kib"], (valid, refused)
