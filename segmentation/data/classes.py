"""Class names and colours that travel with a dataset and with every model trained on it."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segmentation.io import write_text_atomic

IGNORE_INDEX = 255
IGNORE_COLOR = (0, 0, 0)

# The 19 Cityscapes evaluation classes (trainId order) and their official colours (RGB).
CITYSCAPES_CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)


@dataclass(frozen=True)
class ClassInfo:
    """Names and RGB colours of classes ``0..C-1``; ``ignore_index`` marks unlabelled pixels."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise ValueError(f"ClassInfo: {len(self.names)} names but {len(self.colors)} colours")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def colormap(self) -> np.ndarray:
        """``C x 3`` uint8 RGB colours."""
        return np.asarray(self.colors, dtype=np.uint8).reshape(-1, 3)

    @classmethod
    def cityscapes(cls) -> ClassInfo:
        return cls(tuple(n for n, _ in CITYSCAPES_CLASSES), tuple(c for _, c in CITYSCAPES_CLASSES))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "colors": [list(c) for c in self.colors], "ignore_index": self.ignore_index}

    @classmethod
    def from_dict(cls, data: dict) -> ClassInfo:
        return cls(
            tuple(data["names"]),
            tuple(tuple(int(v) for v in c) for c in data["colors"]),
            int(data.get("ignore_index", IGNORE_INDEX)),
        )

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", "name", "r", "g", "b"])
        for i, (name, (r, g, b)) in enumerate(zip(self.names, self.colors, strict=True)):
            writer.writerow([i, name, r, g, b])
        writer.writerow([self.ignore_index, "ignore", *IGNORE_COLOR])
        return buf.getvalue()

    def write_csv(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_csv())

    @classmethod
    def read_csv(cls, path: str | Path) -> ClassInfo:
        """Read ``id,name,r,g,b`` rows; the row whose id is 255 (ignore) is not a class.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: a column is missing, a row is short or long, an id or colour value is not an integer in
                ``[0, 255]``, a name is empty, or the class ids are not ``0..C-1``; the message names the file
                and the line.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"class table not found: {path} (run the preprocess step to create it)")
        reader = csv.reader(path.read_text().splitlines())
        header = next(reader, [])
        expected = {"id", "name", "r", "g", "b"}
        if not expected <= set(header):
            raise ValueError(f"{path}: expected columns {sorted(expected)}, found {sorted(header)}")
        classes = []
        for fields in reader:
            where = f"{path}, line {reader.line_num}"
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                raise ValueError(
                    f"{where}: expected {len(header)} fields ({','.join(header)}), found {len(fields)}: {fields}"
                )
            row = dict(zip(header, fields, strict=True))
            values = {key: _byte(row[key], key, where) for key in ("id", "r", "g", "b")}
            if not row["name"].strip():
                raise ValueError(f"{where}: name is empty; every class needs a name")
            if values["id"] != IGNORE_INDEX:
                classes.append((values["id"], row["name"], (values["r"], values["g"], values["b"])))
        classes.sort()
        ids = [c[0] for c in classes]
        if ids != list(range(len(ids))):
            raise ValueError(f"{path}: class ids must be 0..C-1 without gaps, found {ids}")
        return cls(tuple(c[1] for c in classes), tuple(c[2] for c in classes))


def _byte(text: str, key: str, where: str) -> int:
    """``text`` as an integer in ``[0, 255]`` (a class id, or a colour channel)."""
    digits = text.strip()
    value = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 10 else -1
    if not 0 <= value <= 255:
        raise ValueError(f"{where}: {key} must be an integer in [0, 255], found {text!r}")
    return value


def colorize(mask: np.ndarray, classes: ClassInfo) -> np.ndarray:
    """Map an ``H x W`` mask of class ids to an ``H x W x 3`` RGB uint8 image; ignore and unknown ids are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: classes.num_classes] = classes.colormap
    return lut[np.asarray(mask, dtype=np.uint8)]


def overlay(image_bgr: np.ndarray, mask: np.ndarray, classes: ClassInfo, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised mask over the image (BGR in, BGR out); ignored pixels keep the image as it is."""
    color = colorize(mask, classes)[..., ::-1].astype(np.float32)
    blended = (1 - alpha) * image_bgr.astype(np.float32) + alpha * color
    keep = (np.asarray(mask) == classes.ignore_index)[..., None]
    return np.where(keep, image_bgr, np.rint(blended).astype(np.uint8))
