"""The tensor work of training, shaped like torchvision's segmentation reference: the Accelerator, one epoch of
optimizer steps, a validation pass gathered from every rank, and the step plan."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from segmentation.config import Config
from segmentation.evaluation.metrics import confusion_matrix, scores
from segmentation.training.checkpoint import TrainerState


def build_accelerator(cfg: Config) -> Accelerator:
    """An ``Accelerator`` from ``cfg.system``/``cfg.train``, with seeds and determinism set."""
    if cfg.system.mixed_precision == "fp16" and (cfg.system.cpu or not torch.cuda.is_available()):
        raise ValueError(
            "system.mixed_precision=fp16 needs a CUDA GPU (on CPU it runs without a grad scaler); "
            "use 'no' or 'bf16' on CPU"
        )
    accelerator = Accelerator(
        cpu=cfg.system.cpu,
        mixed_precision=cfg.system.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        # Accelerate would step a prepared scheduler num_processes times per optimizer step; we step it once.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.system.seed),
    )
    set_seed(cfg.system.seed)
    if cfg.system.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn (not fail) on GPU ops without one
    torch.backends.cudnn.benchmark = cfg.system.cudnn_benchmark and not cfg.system.deterministic
    return accelerator


def train_one_epoch(
    model,
    criterion,
    optimizer,
    scheduler,
    loader,
    accelerator,
    state: TrainerState,
    clip_grad_norm: float,
    on_step: Callable[[float, int, float], bool],
) -> bool:
    """One pass over ``loader``; ``on_step(loss, images, lr)`` runs after each optimizer step and may stop training.

    Returns:
        True when ``on_step`` asked to stop.

    Raises:
        FloatingPointError: the loss is NaN or infinite (the weights are left untouched by that batch).
    """
    model.train()
    loss_sum, batches, images = 0.0, 0, 0
    for image, mask in loader:
        with accelerator.accumulate(model):
            logits = model(image)
            loss = criterion(logits, mask)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite training loss {loss.item()} at step {state.global_step + 1} "
                    f"(epoch {state.epoch}); training stopped, the last checkpoint is kept"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.batches_in_epoch += 1
        loss_sum, batches, images = loss_sum + loss.item(), batches + 1, images + image.shape[0]
        if not accelerator.sync_gradients:
            continue
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used; the scheduler moves on to the next one
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        state.global_step += 1
        if on_step(loss_sum / batches, images, lr):
            return True
        loss_sum, batches, images = 0.0, 0, 0
    return False


@torch.inference_mode()
def validate(
    model, criterion, loader, accelerator, num_classes: int, ignore_index: int, max_batches: int | None = None
) -> tuple[dict[str, Any], np.ndarray, tuple | None]:
    """Loss and confusion matrix over ``loader``, gathered from every rank without padded duplicates.

    Returns:
        ``(scores + "loss", C x C int64 matrix, (image, mask, pred) of the first batch's first item or None)``.
    """
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, count, sample = 0.0, 0, None
    for i, (image, mask) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(image)
        pred = logits.argmax(1)
        per_sample = torch.stack(
            [confusion_matrix(p, m, num_classes, ignore_index) for p, m in zip(pred, mask, strict=True)]
        )
        losses = torch.stack([criterion(logits[j : j + 1], mask[j : j + 1]) for j in range(len(mask))]).float()
        per_sample, losses = accelerator.gather_for_metrics((per_sample, losses))
        matrix += per_sample.sum(0).cpu()
        loss_sum, count = loss_sum + losses.sum().item(), count + len(losses)
        if sample is None:
            sample = (image[0].float().cpu(), mask[0].cpu(), pred[0].cpu())
    model.train()
    result = scores(matrix)
    result["loss"] = loss_sum / max(count, 1)
    return result, matrix.numpy(), sample


def set_epoch(loader: Any, epoch: int, seed: int) -> None:
    """Make the epoch's shuffling and augmentation draws a function of ``(seed, epoch)`` alone.

    That is what lets a resumed run see the same batches as an uninterrupted one. A dataset with ``set_epoch``
    seeds itself; otherwise the transforms are reseeded here (effective with ``num_workers=0``).
    """
    loader.set_epoch(epoch)
    dataset = loader.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    elif hasattr(getattr(dataset, "transforms", None), "set_random_seed"):
        dataset.transforms.set_random_seed(seed + epoch)


def plan_steps(cfg: Config, batches_per_epoch: int, num_processes: int) -> tuple[int, int]:
    """``(optimizer steps per epoch, total steps)``; total = min(max_steps, epochs x steps per epoch).

    ``batches_per_epoch`` is the length of the unprepared loader: each rank sees ``ceil(batches / processes)``.
    """
    steps_per_epoch = math.ceil(math.ceil(batches_per_epoch / num_processes) / cfg.train.grad_accum_steps)
    if steps_per_epoch < 1:
        raise ValueError(
            f"the '{cfg.data.train_split}' split of {cfg.data.root} gives no training batch "
            f"(train.batch_size={cfg.train.batch_size}); add images or lower the batch size"
        )
    total = steps_per_epoch * cfg.train.epochs if cfg.train.epochs > 0 else cfg.train.max_steps
    return steps_per_epoch, min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
