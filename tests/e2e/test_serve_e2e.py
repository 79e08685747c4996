"""A real `mlflow models serve` of registered models (alias `production`), PyTorch and ONNX, over real HTTP.

The server is started with the command written in docs/serving.md and queried with the client commands written
there; only the tracking URI, the model name and the port are substituted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from conftest import REPO, free_port, stop_process, tracking_store, wait_http
from mlflow import MlflowClient

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.mlops.model_store import log_pytorch_model
from segmentation.mlops.serving_requests import encode_image
from segmentation.models import FCHarDNet
from segmentation.steps.export import export_step

pytestmark = pytest.mark.e2e

DOC = REPO / "docs" / "serving.md"
DOC_TRACKING_URI, DOC_MODEL, DOC_PORT = "http://127.0.0.1:5000", "fchardnet-synthetic", "5001"
IMAGES = {"70x90": (70, 90), "64x128": (64, 128), "tiny": (30, 40)}
MAX_REFUSAL_BYTES = 4096  # a refusal never quotes the request back, whatever its size


def doc_commands() -> tuple[str, str]:
    """The serve command block and the client command block of docs/serving.md, in that order."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2, f"{DOC}: expected 2 bash blocks (serve, client), found {len(blocks)}"
    return blocks[0], blocks[1]


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _decode(text: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)


def post(url: str, body: dict | bytes) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def registered(mlflow_server) -> str:
    """A randomly initialised model registered with alias `production`, and its ONNX export as `<name>-onnx`."""
    with tracking_store(mlflow_server), pytest.MonkeyPatch.context() as mp:
        client = MlflowClient()
        name = f"serve-e2e-{uuid.uuid4().hex[:8]}"
        mp.setenv("MLFLOW_EXPERIMENT_ID", client.create_experiment(name))  # keep these runs out of Default
        torch.manual_seed(0)
        with mlflow.start_run():
            info = log_pytorch_model(
                FCHarDNet(num_classes=19).eval(), ClassInfo.cityscapes(), ModelConfig(), registered_model_name=name
            )
        client.set_registered_model_alias(name, "production", info.registered_model_version)
        exported = export_step(f"models:/{name}@production", registered_model=f"{name}-onnx", sizes=((64, 128),))
        # The export of the production version takes the ONNX model's production alias itself (registry companions).
        onnx_aliases = client.get_registered_model(f"{name}-onnx").aliases
        assert onnx_aliases == {"production": str(exported["registered_version"])}
        yield name


@contextlib.contextmanager
def serve_docs_command(name: str, mlflow_server: str, workdir: Path, options: str = ""):
    """`mlflow models serve` of `models:/<name>@production` started with the docs' command (plus ``options``)."""
    port = free_port()
    serve, _ = doc_commands()
    serve = (
        serve.replace(DOC_TRACKING_URI, mlflow_server)
        .replace(f"models:/{DOC_MODEL}@", f"models:/{name}@")
        .replace(f"-p {DOC_PORT}", f"-p {port} {options}".rstrip())
    )
    log = workdir / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(
        ["bash", "-euc", serve],
        cwd=workdir,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=240, proc=proc, log=log)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, log=log, proc=proc)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module", params=["pytorch", "onnx"])
def server(request, registered, mlflow_server, tmp_path_factory):
    """`mlflow models serve` started with the docs' command; yields its URL and the same model loaded in-process."""
    name = registered if request.param == "pytorch" else f"{registered}-onnx"
    with serve_docs_command(name, mlflow_server, tmp_path_factory.mktemp(f"serve-{request.param}")) as served:
        served.backend = request.param
        served.pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@production")
        yield served


def _requests(b64: list[str]) -> dict[str, dict]:
    return {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}},
        "dataframe_records": {"dataframe_records": [{"image": b} for b in b64]},
        "instances": {"instances": [{"image": b} for b in b64]},
        "inputs": {"inputs": {"image": b64}},
    }


def test_every_request_form_returns_the_in_process_masks(server):
    images = [_image(*size, seed=i) for i, size in enumerate(IMAGES.values())]
    b64 = [encode_image(image) for image in images]
    expected = server.pyfunc.predict(pd.DataFrame({"image": b64}))
    for form, body in _requests(b64).items():
        status, text = post(server.url, body)
        assert status == 200, f"{server.backend} {form}: {status} {text[:500]}"
        predictions = json.loads(text)["predictions"]
        assert len(predictions) == len(images)
        for got, want, size in zip(predictions, expected.to_dict("records"), IMAGES.values(), strict=True):
            mask = _decode(got["mask"])
            assert mask.shape == size and (got["height"], got["width"]) == size, form
            np.testing.assert_array_equal(mask, _decode(want["mask"]), err_msg=f"{server.backend} {form}")


def test_colorize_param_adds_a_colour_image(server):
    body = {**_requests([encode_image(_image(64, 96, seed=5))])["inputs"], "params": {"colorize": True}}
    status, text = post(server.url, body)
    assert status == 200, text[:500]
    prediction = json.loads(text)["predictions"][0]
    assert _decode(prediction["colorized"]).shape == (64, 96, 3)


def _bomb() -> str:
    """A PNG whose header announces 50000 x 50000 pixels (2.5 GP) in a few hundred bytes."""
    ihdr = b"IHDR" + (50_000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    body = b"IDAT" + zlib.compress(b"\x00" * 5000)
    chunks = b"".join(len(c[4:]).to_bytes(4, "big") + c + zlib.crc32(c).to_bytes(4, "big") for c in (ihdr, body))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunks).decode()


def _jpeg_bomb() -> str:
    """A 30-byte JPEG whose frame header (SOF0) announces 60000 x 60000 pixels."""
    sof = bytes([8]) + (60_000).to_bytes(2, "big") * 2 + bytes([3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1])
    return base64.b64encode(b"\xff\xd8\xff\xc0" + (len(sof) + 2).to_bytes(2, "big") + sof + b"\xff\xd9").decode()


def _truncated_png() -> str:
    """The first half of a valid 64 x 64 PNG: the header is intact, the pixel data cut off."""
    data = base64.b64decode(encode_image(_image(64, 64, seed=1)))
    return base64.b64encode(data[: len(data) // 2]).decode()


BAD_REQUESTS = {
    "wrong column": ({"dataframe_split": {"columns": ["picture"], "data": [["abc"]]}}, "expected a column 'image'"),
    # 2 MiB in the `inputs` form without the column: refused in one short line, the request is not quoted back.
    "wrong column, large": ({"inputs": {"picture": ["A" * (2 * 2**20)]}}, "expected a column 'image'"),
    "not base64": ({"dataframe_records": [{"image": "%%% not base64 %%%"}]}, "not valid base64"),
    "not an image": ({"inputs": {"image": [base64.b64encode(b"just some text").decode()]}}, "not a PNG or JPEG"),
    "bomb": ({"instances": [{"image": _bomb()}]}, "more than the limit of 16777216 pixels"),
    "jpeg bomb": ({"inputs": {"image": [_jpeg_bomb()]}}, "60000x60000 = 3600000000 pixels, more than the limit"),
    "truncated": ({"inputs": {"image": [_truncated_png()]}}, "corrupt or truncated and could not be decoded"),
    "empty": ({"dataframe_records": [{"image": ""}]}, "not a PNG or JPEG image (0 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_a_400_with_the_message_and_the_server_stays_up(server, case):
    body, message = BAD_REQUESTS[case]
    status, text = post(server.url, body)
    assert status == 400, text[:500]
    assert len(text) < MAX_REFUSAL_BYTES, f"{len(text)} bytes: {text[:300]}"
    payload = json.loads(text)
    assert message in payload["message"]
    assert "stack_trace" not in payload and "Traceback" not in text
    status, _ = post(server.url, _requests([encode_image(_image(64, 64, seed=9))])["dataframe_split"])
    assert status == 200


def test_docs_client_commands_write_the_mask(server, tmp_path):
    _, client = doc_commands()
    image = _image(80, 112, seed=11)
    cv2.imwrite(str(tmp_path / "image.png"), image)
    script = client.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{server.port}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["80", "112"]
    mask = cv2.imread(str(tmp_path / "mask.png"), cv2.IMREAD_UNCHANGED)
    expected = server.pyfunc.predict(pd.DataFrame({"image": [encode_image(image)]}))["mask"][0]
    np.testing.assert_array_equal(mask, _decode(expected))
    assert cv2.imread(str(tmp_path / "mask_color.png")).shape == (80, 112, 3)


def test_oversized_body_is_a_400_and_the_server_survives(server):
    # 120 MiB of base64 in two rows: over the 100 MiB per-request limit. MLflow's scoring server reads and parses
    # the whole body before the model sees it (it has no body limit), so this also shows it survives doing so.
    blob = "A" * (60 * 2**20)
    status, text = post(server.url, {"dataframe_split": {"columns": ["image"], "data": [[blob], [blob]]}})
    assert status == 400, text[:500]
    assert len(text) < MAX_REFUSAL_BYTES, f"{len(text)} bytes: {text[:300]}"
    message = json.loads(text)["message"]
    assert "125829120 bytes of base64 image data in 2 row(s), more than the limit of 104857600 bytes" in message
    assert "stack_trace" not in text
    assert server.proc.poll() is None, f"the server died:\n{server.log.read_text()[-2000:]}"
    status, _ = post(server.url, _requests([encode_image(_image(64, 64, seed=9))])["dataframe_split"])
    assert status == 200


def ping(url: str) -> int:
    with urllib.request.urlopen(f"{url}/ping", timeout=30) as resp:
        return resp.status


def _flat_png(height: int, width: int) -> str:
    return encode_image(np.zeros((height, width, 3), np.uint8))


# case: (request body builder, message): each refused with the default limits, from headers or before decoding.
HOSTILE = {
    "1 x 1,000,000 strip": (lambda: {"inputs": {"image": [_flat_png(1, 1_000_000)]}}, "1000000x64 = 64000000 pixels"),
    "six flat 4096 x 4096": (lambda: {"inputs": {"image": [_flat_png(4096, 4096)] * 6}}, "take 100663296 pixels"),
    "257 rows": (
        lambda: {"dataframe_split": {"columns": ["image"], "data": [[_flat_png(1, 1)]] * 257}},
        "257 rows, more than the limit of 256",
    ),
    "20 MiB not base64": (
        lambda: {"inputs": {"image": ["%" * 20 * 2**20]}},
        "row 0, column 'image': not valid base64",
    ),
    "15 MiB of zeros": (
        lambda: {"instances": [{"image": base64.b64encode(bytes(15 * 2**20)).decode()}]},
        "not a PNG or JPEG image (15728640 bytes decoded",
    ),
    "a number and 20 MiB": (lambda: {"inputs": {"image": [7, "A" * 20 * 2**20]}}, "row 0, column 'image': not valid"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_request_gets_a_short_one_line_400_and_the_server_stays_up(server, case):
    body, message = HOSTILE[case]
    status, text = post(server.url, body())
    assert status == 400, text[:500]
    assert len(text) < MAX_REFUSAL_BYTES, f"{len(text)} bytes: {text[:300]}"
    payload = json.loads(text)
    assert message in payload["message"] and "\n" not in payload["message"], payload["message"]
    assert "stack_trace" not in payload and "Failed to predict data" not in text
    assert ping(server.url) == 200


def _jpeg_with_orientation(image: np.ndarray, orientation: int) -> str:
    """A JPEG stored as ``image`` with an APP1 Exif segment (big-endian TIFF, IFD0 = one Orientation entry)."""
    tiff = b"MM" + struct.pack(">HIH", 42, 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    app1 = b"\xff\xe1" + (len(tiff) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + tiff
    data = cv2.imencode(".jpg", image)[1].tobytes()
    return base64.b64encode(data[:2] + app1 + data[2:]).decode()


def test_a_portrait_phone_photo_is_segmented_as_displayed(server):
    # Stored 64 x 96 (landscape) with EXIF orientation 6: displayed, and segmented, as 96 high x 64 wide.
    status, text = post(server.url, _requests([_jpeg_with_orientation(_image(64, 96, seed=12), 6)])["inputs"])
    assert status == 200, text[:500]
    prediction = json.loads(text)["predictions"][0]
    assert (prediction["height"], prediction["width"]) == (96, 64) == _decode(prediction["mask"]).shape


@pytest.fixture(scope="module")
def timeout_server(registered, mlflow_server, tmp_path_factory):
    """The PyTorch model served with the docs' command and a 3 s request timeout (`-t 3`)."""
    with serve_docs_command(registered, mlflow_server, tmp_path_factory.mktemp("serve-timeout"), "-t 3") as served:
        yield served


def _cpu_seconds(proc: subprocess.Popen) -> float:
    """CPU time used so far by ``proc`` and every process under it (the uvicorn worker does the inference)."""
    total = 0.0
    root = psutil.Process(proc.pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def test_a_request_over_the_timeout_stops_computing_and_its_repeat_is_refused_up_front(timeout_server):
    # 200 flat 512 x 512 images: within every size limit, 52 Mpx: 10-20 s of inference on 2 CPU cores. The compute
    # budget defaults to the server's request timeout (3 s): the work stops there, whoever answers the client.
    body = {"inputs": {"image": [_flat_png(512, 512)] * 200}}
    status, text = post(timeout_server.url, body)
    assert status in (429, 504), text[:500]  # our refusal, or MLflow's timeout when it answers first
    time.sleep(1)
    before = _cpu_seconds(timeout_server.proc)
    time.sleep(2)
    busy = _cpu_seconds(timeout_server.proc) - before
    assert busy < 0.5, f"the server kept computing after the request ended: {busy:.1f} s of CPU in 2 s"
    assert ping(timeout_server.url) == 200
    status, text = post(timeout_server.url, body)  # the server has measured its speed: refused before any work
    assert status == 429 and len(text) < MAX_REFUSAL_BYTES, text[:500]
    assert "refused before computing: the request's 52428800 padded pixels need" in json.loads(text)["message"]
    assert post(timeout_server.url, _requests([_flat_png(64, 64)])["inputs"])[0] == 200
