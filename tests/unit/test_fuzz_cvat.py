"""Property and fuzz tests of the CVAT reader: hostile or mangled exports fail only with our own clear errors.

The reader's contract (``segmentation.data.cvat.read_cvat``) is to raise ``ValueError`` (bad content) or
``FileNotFoundError`` (a listed file is missing), each naming the XML file. Anything else escaping it — KeyError,
OverflowError, MemoryError, an OpenCV error, a numpy warning turned into garbage pixels — is a bug that a user
would meet as a traceback instead of a message. Examples are bounded (~100 each, tiny images) so the file runs in
a few seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from segmentation.data.cvat import read_cvat
from segmentation.data.cvat_shapes import decode_rle

CLEAR_ERRORS = (ValueError, FileNotFoundError)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIDE = 8  # every image on disk is SIDE x SIDE

# Attribute values a hand-edited or malicious export may carry, beside well-formed ones.
HOSTILE = [
    "",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e400",
    "-1e400",
    "99999999999999999999",
    "2147483648",
    "abc",
    "1,2",
    "3.5",
    "0x10",
    " 4 ",
    "1e12",
    "-2147483649",
    "../x.png",
    "/etc/passwd",
]
LABELS = "<labels><label><name>car</name><color>#00008e</color></label><label><name>road</name></label></labels>"


def encode_rle(mask: np.ndarray) -> list[int]:
    """Test-local CVAT encoder: run lengths over the row-major flattening, background run first (maybe 0)."""
    flat = mask.ravel().astype(bool)
    runs, value, count = [], False, 0
    for pixel in flat:
        if pixel == value:
            count += 1
        else:
            runs.append(count)
            value, count = pixel, 1
    runs.append(count)
    return runs


@st.composite
def bool_masks(draw) -> np.ndarray:
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    bits = draw(st.lists(st.booleans(), min_size=height * width, max_size=height * width))
    return np.array(bits, dtype=bool).reshape(height, width)


@FUZZ
@given(bool_masks())
def test_rle_round_trip(mask):
    runs = encode_rle(mask)
    assert sum(runs) == mask.size
    decoded = decode_rle(tuple(runs), mask.shape[1], mask.shape[0], "fuzz")
    assert decoded.shape == mask.shape and decoded.dtype == bool
    assert (decoded == mask).all()


@FUZZ
@given(
    st.lists(st.integers(-(2**70), 2**70) | st.integers(0, 40), max_size=12),
    st.integers(-3, 2**40) | st.integers(0, 8),
    st.integers(-3, 2**40) | st.integers(0, 8),
)
def test_rle_random_runs_decode_or_value_error(runs, width, height):
    try:
        decoded = decode_rle(tuple(runs), width, height, "fuzz.xml: mask 'car'")
    except ValueError as exc:
        assert "fuzz.xml: mask 'car'" in str(exc)
        return
    # Accepted runs are exactly the valid ones: non-negative and covering the box.
    assert all(r >= 0 for r in runs) and sum(runs) == width * height
    assert decoded.shape == (height, width) and int(decoded.sum()) == sum(runs[1::2])


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    """A raw CVAT layout with SIDE x SIDE images a.png, b.png and frames 0-2; each example rewrites the XML."""
    raw = tmp_path_factory.mktemp("fuzz_raw")
    (raw / "cvat").mkdir()
    (raw / "images").mkdir()
    for name in ("a.png", "b.png", "frame_000000.png", "frame_000001.png", "frame_000002.png"):
        cv2.imwrite(str(raw / "images" / name), np.full((SIDE, SIDE, 3), 40, np.uint8))
    return raw


@st.composite
def mostly(draw, good: st.SearchStrategy, bad: list[str], one_in: int = 10):
    """A value from ``good``, or one of ``bad`` one time in ``one_in``, so most documents get past the first check."""
    # sampled_from draws uniformly; st.integers would favour its bounds and make "bad" far more common.
    return draw(st.sampled_from(bad)) if draw(st.sampled_from(range(one_in))) == 0 else draw(good)


def _value(kind: str) -> st.SearchStrategy:
    well_formed = {
        "coord": st.integers(-3, SIDE + 3).map(str),
        "size": st.just(str(SIDE)),
        "count": st.integers(0, 4).map(str),
    }[kind]
    return mostly(well_formed, HOSTILE)


@st.composite
def shapes(draw, frame: int | None = None) -> str:
    kind = draw(st.sampled_from(["polygon", "box", "ellipse", "mask", "polyline", "tag"]))
    label = draw(mostly(st.sampled_from(["car", "road"]), ["truck", ""]))
    attrs = {"label": label, "z_order": draw(mostly(st.integers(-2, 2).map(str), ["inf", "x", "1e400", ""]))}
    if frame is not None:
        attrs |= {"frame": str(frame), "outside": draw(st.sampled_from(["0", "1"]))}
    if kind in ("polygon", "polyline"):
        points = draw(
            st.lists(
                st.tuples(_value("coord"), _value("coord")), min_size=draw(mostly(st.just(3), [0, 1])), max_size=5
            )
        )
        attrs["points"] = ";".join(f"{x},{y}" for x, y in points)
    elif kind in ("box", "ellipse"):
        names = ("xtl", "ytl", "xbr", "ybr") if kind == "box" else ("cx", "cy", "rx", "ry")
        rotation = draw(mostly(st.sampled_from(["0", "45"]), ["nan", "inf"]))
        attrs |= {n: draw(_value("coord")) for n in names} | {"rotation": rotation}
    elif kind == "mask":
        region = draw(bool_masks())
        runs = [str(r) for r in encode_rle(region)]
        attrs |= {
            "left": draw(_value("coord")),
            "top": draw(_value("coord")),
            "width": draw(mostly(st.just(str(region.shape[1])), HOSTILE)),
            "height": draw(mostly(st.just(str(region.shape[0])), HOSTILE)),
        }
        attrs["rle"] = ", ".join(draw(mostly(st.just(runs), [[], ["-1", "2"], ["1e400"], ["x", "1"], runs[:-1]])))
    return f"<{kind} " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + "/>"


@st.composite
def image_documents(draw) -> str:
    images = []
    names = st.lists(
        mostly(st.sampled_from(["a.png", "b.png"]), ["../a.png", "c.png", "", "/a.png"]),
        min_size=1,
        max_size=3,
        unique=True,
    )
    for i, name in enumerate(draw(names)):
        subset = draw(mostly(st.sampled_from(["", ' subset="train"', ' subset="Validation"']), [' subset="holdout"']))
        body = "".join(draw(st.lists(shapes(), max_size=4)))
        images.append(
            f'<image id="{i}" name="{name}" width="{draw(_value("size"))}" '
            f'height="{draw(_value("size"))}"{subset}>{body}</image>'
        )
    meta = f"<meta><task><name>t</name>{LABELS}</task></meta>"
    return f'<?xml version="1.0"?><annotations><version>1.1</version>{meta}{"".join(images)}</annotations>'


@st.composite
def video_documents(draw) -> str:
    tracks = []
    for i in range(draw(st.integers(1, 2))):
        frames = sorted(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3, unique=True)))
        states = "".join(draw(shapes(frame=f)) for f in frames)
        tracks.append(f'<track id="{i}" label="car">{states}</track>')
    size = draw(mostly(st.sampled_from(["3", ""]), ["-1", "abc", "1e400", "4"]))
    width, height = draw(_value("size")), draw(_value("size"))
    meta = (
        f"<meta><task><name>v</name><size>{size}</size><original_size><width>{width}</width>"
        f"<height>{height}</height></original_size>{LABELS}</task></meta>"
    )
    return f'<?xml version="1.0"?><annotations><version>1.1</version>{meta}{"".join(tracks)}</annotations>'


@st.composite
def mutated(draw, documents) -> bytes:
    """A generated document, then up to three byte-level cuts, insertions or overwrites."""
    data = bytearray(draw(documents).encode())
    for _ in range(draw(mostly(st.just(0), [1, 2, 3], one_in=3))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["cut", "insert", "overwrite"]))
        chunk = draw(
            st.binary(max_size=6)
            | st.sampled_from([b"<", b">", b'"', b"&amp;", b"&lol;", b"<!--", b"<image>", b"\xff\xfe", b"]]>"])
        )
        if op == "cut":
            del data[at : at + draw(st.integers(1, 20))]
        elif op == "insert":
            data[at:at] = chunk
        else:
            data[at : at + len(chunk)] = chunk
    return bytes(data)


def _read_everything(raw: Path, document: bytes) -> None:
    (raw / "cvat" / "annotations.xml").write_bytes(document)
    try:
        _, samples = read_cvat(raw, val_fraction=0.5, seed=0)
        for sample in samples:
            sample.load_image()
            assert sample.build_mask().shape == (SIDE, SIDE)
        event(f"read {len(samples)} samples")
    except CLEAR_ERRORS as exc:
        assert "annotations.xml" in str(exc), f"error does not name the file: {exc!r}"
        # Shown by --hypothesis-show-statistics: how many examples get past the XML parser and the checks.
        event(f"{type(exc).__name__}: {str(exc).split(': ', 2)[-1][:40]}")


@FUZZ
@given(mutated(image_documents()))
def test_mutated_image_exports_fail_only_with_clear_errors(raw_dir, document):
    _read_everything(raw_dir, document)


@FUZZ
@given(mutated(video_documents()))
def test_mutated_video_exports_fail_only_with_clear_errors(raw_dir, document):
    _read_everything(raw_dir, document)


GIANT = ["1000000000", "99999999999999999999", "1e400", "1048577"]


# A 0-wide mask box is a legal empty mask, so 0 and negative sizes are bad only for images and videos.
@pytest.mark.parametrize(
    ("where", "size"),
    [(w, s) for w in ("image", "video", "mask") for s in GIANT]
    + [(w, s) for w in ("image", "video") for s in ("0", "-8", "nan", "")],
)
def test_giant_or_empty_declared_sizes_fail_fast(raw_dir, where, size):
    # A 10^9 x 10^9 mask would need an exabyte: the reader must refuse the declared size before allocating.
    meta = f"<meta><task><name>t</name>{LABELS}</task></meta>"
    if where == "image":
        body = (
            f'<image id="0" name="a.png" width="{size}" height="{size}"><box label="car" xtl="0" ytl="0" '
            'xbr="3" ybr="3"/></image>'
        )
    elif where == "mask":
        body = (
            f'<image id="0" name="a.png" width="{SIDE}" height="{SIDE}"><mask label="car" rle="0, {size}" '
            f'left="0" top="0" width="{size}" height="1"/></image>'
        )
    else:
        meta = (
            f"<meta><task><name>v</name><size>1</size><original_size><width>{size}</width><height>{size}"
            f"</height></original_size>{LABELS}</task></meta>"
        )
        body = '<track id="0" label="car"><box frame="0" outside="0" xtl="0" ytl="0" xbr="3" ybr="3"/></track>'
    document = f'<?xml version="1.0"?><annotations><version>1.1</version>{meta}{body}</annotations>'
    (raw_dir / "cvat" / "annotations.xml").write_text(document)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"annotations\.xml.*(width|height|size|mask)") as info:
        for sample in read_cvat(raw_dir, val_fraction=0.0)[1]:
            sample.build_mask()
    assert time.perf_counter() - start < 2.0
    assert "allowed" in str(info.value) or "expected" in str(info.value) or "must" in str(info.value)
