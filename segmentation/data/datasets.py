"""Split tables written by the preprocess step, as PyTorch datasets and data loaders.

Images are read with OpenCV and stay BGR (the model's input contract); masks are 1-channel train ids with
255 = ignore. Every read is checked, so a missing, corrupt or mis-sized file stops training with its name
instead of silently producing a wrong batch.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from segmentation.config import Config
from segmentation.data.classes import ClassInfo
from segmentation.data.samples import check_mask, read_image, read_label_png
from segmentation.data.transforms import build_train_transforms, build_val_transforms
from segmentation.models.preprocessing import normalize

REQUIRED_COLUMNS = ("image", "mask", "split")


def resolve_split_table(data: str | Path, split_id: str = "split01") -> Path:
    """The split table for ``data``: a ``.parquet`` file itself, or ``<data>/split/<split_id>.parquet``.

    Raises:
        FileNotFoundError: no such table; the message says how to create it.
    """
    data = Path(data)
    table = data if data.suffix == ".parquet" else data / "split" / f"{split_id}.parquet"
    if not table.is_file():
        raise FileNotFoundError(
            f"split table not found: {table}. Create it with `mlflow run . -e preprocess --env-manager local "
            f"-P out_dir={data if data.suffix != '.parquet' else data.parent.parent}` (or `python -m "
            "entrypoints.preprocess`), or point data.root at a preprocess output folder"
        )
    return table


def load_split(data: str | Path, split_id: str = "split01") -> tuple[pd.DataFrame, ClassInfo, Path]:
    """Read a split table, its ``classes.csv`` and the root its relative paths start from.

    Returns:
        ``(table, classes, root)``.

    Raises:
        FileNotFoundError: the table or ``classes.csv`` is missing.
        ValueError: the table lacks one of the columns ``image``, ``mask``, ``split``.
    """
    table_path = resolve_split_table(data, split_id)
    table = pd.read_parquet(table_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{table_path}: missing columns {missing}; found {list(table.columns)}")
    return table, ClassInfo.read_csv(table_path.parent / "classes.csv"), table_path.parent.parent


class SegmentationDataset(Dataset):
    """The rows of one split as ``(image, mask)`` tensors.

    Args:
        table: a split table (see :func:`load_split`).
        split: which rows to use (``train``, ``val``, ``test``).
        transforms: an albumentations pipeline applied to the BGR uint8 image and the mask, or ``None``.
        root: folder the table's relative paths start from.
        num_classes: masks may hold ``0..num_classes-1`` and ``ignore_index`` only.
        ignore_index: the ignore value.
        seed: when set, item ``i`` of epoch ``e`` is augmented with a generator seeded from ``(seed, e, i)``
            (see :meth:`set_epoch`), so its crop and flip do not depend on the worker count, on which worker
            drew it, or on whether the epoch was resumed in the middle. ``None`` keeps the transforms' own stream.

    Shape:
        ``image``: float32 ``3 x H x W`` normalised by the model's contract; ``mask``: int64 ``H x W``.

    Raises:
        ValueError: the split has no rows (the message lists the splits that exist).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        split: str,
        transforms: A.Compose | None,
        root: str | Path,
        num_classes: int = 19,
        ignore_index: int = 255,
        seed: int | None = None,
    ) -> None:
        rows = table[table["split"] == split]
        if rows.empty:
            raise ValueError(f"split {split!r} has no rows; the table has splits {sorted(table['split'].unique())}")
        self.images = [Path(root) / p for p in rows["image"]]
        self.masks = [Path(root) / p for p in rows["mask"]]
        self.transforms, self.num_classes, self.ignore_index = transforms, num_classes, ignore_index
        self.seed = seed
        # Persistent workers hold their own copy of the dataset, made when they started; a plain int set later in
        # the main process would never reach them. A shared-memory tensor does (fork and spawn alike), and the
        # loader only hands the workers an epoch's indices after `iter()`, i.e. after `set_epoch`.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating; the training loop does)."""
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.images)

    def read_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed ``(image_bgr uint8 H x W x 3, mask uint8 H x W)`` of row ``index``, checked."""
        image = read_image(self.images[index])
        mask = read_label_png(self.masks[index])
        check_mask(mask, self.num_classes, self.masks[index], image.shape, self.ignore_index)
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.read_raw(index)
        if self.transforms is not None:
            if self.seed is not None:
                key = np.random.SeedSequence([self.seed, int(self._epoch), index]).generate_state(1)[0]
                self.transforms.set_random_seed(int(key))
            out = self.transforms(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image = torch.from_numpy(np.ascontiguousarray(normalize(image).transpose(2, 0, 1)))
        return image, torch.from_numpy(np.ascontiguousarray(mask)).long()


def seed_worker(worker_id: int) -> None:
    """Give each worker's copy of the transforms its own seed, derived from the loader's generator.

    PyTorch seeds ``torch`` per worker from the loader's generator (``base_seed + worker_id``); albumentations and
    NumPy keep their own generators, which would otherwise be identical copies in every worker.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transforms = getattr(info.dataset, "transforms", None) if info is not None else None
    if transforms is not None:
        transforms.set_random_seed(seed)


def build_dataloader(
    cfg: Config,
    split: str,
    train: bool,
    batch_size: int | None = None,
    num_workers: int | None = None,
    shuffle: bool | None = None,
) -> DataLoader:
    """A data loader over ``split`` of the table at ``cfg.data.root`` / ``cfg.data.split_id``.

    Args:
        cfg: the full config (``data``, ``augmentation``, ``train``, ``eval``, ``system`` sections are used).
        split: the split name, e.g. ``cfg.data.train_split``.
        train: training augmentation and shuffling (else the validation transforms, in order).
        batch_size: defaults to ``cfg.train.batch_size`` (train) or ``cfg.eval.batch_size``.
        num_workers: defaults to ``cfg.system.num_workers``.
        shuffle: defaults to ``train``.

    Returns:
        A loader seeded from ``cfg.system.seed``: the same config gives the same batches whatever the worker
        count (training items are augmented from ``(seed, epoch, index)``; call ``loader.dataset.set_epoch``).
        Workers persist across epochs; memory is pinned when training on a GPU.
    """
    table, classes, root = load_split(cfg.data.root, cfg.data.split_id)
    if classes.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"{cfg.data.root}: the dataset has {classes.num_classes} classes but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={classes.num_classes}"
        )
    ignore_index = cfg.data.ignore_index
    transforms = (
        build_train_transforms(cfg.augmentation, ignore_index, seed=cfg.system.seed)
        if train
        else build_val_transforms(cfg.augmentation)
    )
    dataset = SegmentationDataset(
        table, split, transforms, root, classes.num_classes, ignore_index, seed=cfg.system.seed if train else None
    )
    batch_size = batch_size or (cfg.train.batch_size if train else cfg.eval.batch_size)
    num_workers = cfg.system.num_workers if num_workers is None else num_workers
    generator = torch.Generator()
    generator.manual_seed(cfg.system.seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train if shuffle is None else shuffle,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() and not cfg.system.cpu,
        drop_last=train and len(dataset) > batch_size,
    )
