"""The official Cityscapes label table: label id -> train id, names and colours.

Provenance: the values (not code) of the ``labels`` list in ``cityscapesscripts/helpers/labels.py`` of
mcordts/cityscapesScripts (MIT licence, "Copyright (c) [2022] [The Cityscapes Authors]"; file last changed in
9f0aa8d3fa937c42bd5f21e0180a6546f077539f), transcribed from the team's ``shared/data/cityscapes_labels.csv``
(sha256 e9f26d72...). ``tests/unit/test_cityscapes.py`` checks this table against that CSV when it is present.

Columns: name, id, trainId, category, colour (RGB). 19 labels carry train ids 0-18; every other label is
ignored (255); ``license plate`` has id -1 and train id -1, which the lookup table also maps to 255.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segmentation.data.classes import IGNORE_INDEX

LABELS: tuple[tuple[str, int, int, str, tuple[int, int, int]], ...] = (
    ("unlabeled", 0, 255, "void", (0, 0, 0)),
    ("ego vehicle", 1, 255, "void", (0, 0, 0)),
    ("rectification border", 2, 255, "void", (0, 0, 0)),
    ("out of roi", 3, 255, "void", (0, 0, 0)),
    ("static", 4, 255, "void", (0, 0, 0)),
    ("dynamic", 5, 255, "void", (111, 74, 0)),
    ("ground", 6, 255, "void", (81, 0, 81)),
    ("road", 7, 0, "flat", (128, 64, 128)),
    ("sidewalk", 8, 1, "flat", (244, 35, 232)),
    ("parking", 9, 255, "flat", (250, 170, 160)),
    ("rail track", 10, 255, "flat", (230, 150, 140)),
    ("building", 11, 2, "construction", (70, 70, 70)),
    ("wall", 12, 3, "construction", (102, 102, 156)),
    ("fence", 13, 4, "construction", (190, 153, 153)),
    ("guard rail", 14, 255, "construction", (180, 165, 180)),
    ("bridge", 15, 255, "construction", (150, 100, 100)),
    ("tunnel", 16, 255, "construction", (150, 120, 90)),
    ("pole", 17, 5, "object", (153, 153, 153)),
    ("polegroup", 18, 255, "object", (153, 153, 153)),
    ("traffic light", 19, 6, "object", (250, 170, 30)),
    ("traffic sign", 20, 7, "object", (220, 220, 0)),
    ("vegetation", 21, 8, "nature", (107, 142, 35)),
    ("terrain", 22, 9, "nature", (152, 251, 152)),
    ("sky", 23, 10, "sky", (70, 130, 180)),
    ("person", 24, 11, "human", (220, 20, 60)),
    ("rider", 25, 12, "human", (255, 0, 0)),
    ("car", 26, 13, "vehicle", (0, 0, 142)),
    ("truck", 27, 14, "vehicle", (0, 0, 70)),
    ("bus", 28, 15, "vehicle", (0, 60, 100)),
    ("caravan", 29, 255, "vehicle", (0, 0, 90)),
    ("trailer", 30, 255, "vehicle", (0, 0, 110)),
    ("train", 31, 16, "vehicle", (0, 80, 100)),
    ("motorcycle", 32, 17, "vehicle", (0, 0, 230)),
    ("bicycle", 33, 18, "vehicle", (119, 11, 32)),
    ("license plate", -1, -1, "vehicle", (0, 0, 142)),
)

NAME_TO_ID: dict[str, int] = {name: label_id for name, label_id, *_ in LABELS}
MAX_LABEL_ID = max(label_id for _, label_id, *_ in LABELS)


def id_to_train_id_lut() -> np.ndarray:
    """A 256-entry uint8 lookup table ``lut[label_id] -> train_id``; unknown ids and ignored labels give 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for _, label_id, train_id, _, _ in LABELS:
        if label_id >= 0 and 0 <= train_id < IGNORE_INDEX:
            lut[label_id] = train_id
    return lut


def class_to_label_id_lut(names: Sequence[str]) -> np.ndarray:
    """A 256-entry uint8 table ``lut[class index] -> Cityscapes label id`` for a model whose classes are Cityscapes
    labels by name (the 19 train ids, or any of them): what the benchmark's ``*labelIds.png`` results hold.

    Raises:
        ValueError: a class that is not a Cityscapes label (named, with where the valid names are).
    """
    unknown = [name for name in names if NAME_TO_ID.get(name, -1) < 0]
    if unknown:
        raise ValueError(
            f"classes {unknown} are not Cityscapes labels; the Cityscapes layout needs a model whose class names "
            "are names of the official label table (segmentation/data/cityscapes_labels.py)"
        )
    lut = np.zeros(256, dtype=np.uint8)  # an index no class has stays 0, "unlabeled"
    for index, name in enumerate(names):
        lut[index] = NAME_TO_ID[name]
    return lut
