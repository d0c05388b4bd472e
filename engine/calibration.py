"""Calibrating a checkpoint pair's thresholds on a calibration set, never the test set (util/thresholds.py
has the rule, the file and the decisions; METHOD.md §2 the synthesis the calibration set is made by).
"""
import os
from pathlib import Path

import numpy as np
import torch

from data_loader import MVTecDRAEMTrainDataset
from engine.evaluation import DraemScorer
from engine.validation import ValidationSet, synthesize
from util.errors import DraemInputError
from util.images import FOLDER_IMAGE_SUFFIXES, read_image, sorted_images, to_chw
from util.thresholds import RULE, TRAINING_SOURCE, f1_max_threshold


@torch.no_grad()
def calibrate(
    scorer: DraemScorer, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, device: torch.device,
    batch_size: int = 8, *, source: str = TRAINING_SOURCE,
) -> dict:
    """Image and pixel thresholds maximising F1 on a calibration set (the rule in the module docstring).

    `images` N×3×H×W in [0, 1], `masks` N×1×H×W binary, `labels` (N,) 1 = anomalous; scored by `scorer`
    (the test protocol, METHOD.md §6) in batches of `batch_size`. Returns the dict `write_thresholds`
    stores: image_threshold, pixel_threshold (anomalous where score or map >= it), the F1 each reaches
    here (image_f1, pixel_f1), rule, source (what the set was made from), n_normal, n_anomalous and
    image_size (side of the images). Leaves the scorer in eval mode.
    """
    n = len(images)
    if masks.shape != (n, 1, *images.shape[2:]) or labels.numel() != n:
        raise ValueError(f"expected N×1×H×W masks and N labels for images {tuple(images.shape)}, "
                         f"got {tuple(masks.shape)} and {labels.numel()}")
    labels = labels.reshape(-1).cpu().numpy()
    n_anomalous = int((labels == 1).sum())
    pixel_labels = masks.cpu().numpy().reshape(-1) >= 0.5
    if n_anomalous in (0, n) or pixel_labels.all() or not pixel_labels.any():
        raise DraemInputError(f"the calibration set needs normal and anomalous samples and pixels, got {n - n_anomalous} "
                              f"normal and {n_anomalous} anomalous samples: calibrate on more samples (--samples)")
    scorer.eval().to(device)
    maps, scores = [], []
    for start in range(0, n, batch_size):
        batch_maps, batch_scores = scorer(images[start : start + batch_size].to(device))
        maps.append(batch_maps.float().cpu().numpy())
        scores.append(batch_scores.float().cpu().numpy())
    image_threshold, image_f1 = f1_max_threshold(labels, np.concatenate(scores))
    pixel_threshold, pixel_f1 = f1_max_threshold(pixel_labels, np.concatenate(maps).reshape(-1))
    return {
        "image_threshold": image_threshold, "pixel_threshold": pixel_threshold, "image_f1": image_f1, "pixel_f1": pixel_f1,
        "rule": RULE, "source": source, "n_normal": n - n_anomalous, "n_anomalous": n_anomalous,
        "image_size": int(images.shape[-1]),
    }


def good_image_paths(good_dir: str | os.PathLike) -> list[Path]:
    """Every image under `good_dir` (recursively, sorted); none, or no folder, is a one-line error."""
    paths = sorted_images(Path(good_dir).rglob("*"), FOLDER_IMAGE_SUFFIXES) if Path(good_dir).is_dir() else []
    if not paths:
        raise DraemInputError(f"no images ({', '.join(FOLDER_IMAGE_SUFFIXES)}) found under --good_dir {good_dir}")
    return paths


def good_images(good_dir: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Every image under `good_dir`, read as the test program reads images: N×3×S×S."""
    return torch.from_numpy(np.stack([to_chw(read_image(path, (image_size, image_size))) for path in good_image_paths(good_dir)]))


def synthetic_set(
    image_paths: list[Path], anomaly_source_path: str | os.PathLike | None, image_size: int, num_samples: int, seed: int,
) -> ValidationSet:
    """`num_samples` training-style samples (METHOD.md §2) from `image_paths`, for checkpoints trained elsewhere.

    The samples come from validation.synthesize with the training dataset's anomaly sources, so with the
    image paths a run held out (validation.split_paths) and the same seed and count, they are that run's
    validation set; train_draem.py calibrates on the samples it already has.
    """
    dataset = MVTecDRAEMTrainDataset(anomaly_source_path=anomaly_source_path, resize_shape=(image_size, image_size),
                                     image_paths=image_paths)
    return synthesize(dataset.images, dataset.draw_source, num_samples, seed)


def with_good_images(
    samples: ValidationSet, source: str, good_dir: str | os.PathLike | None, image_size: int
) -> tuple[ValidationSet, str]:
    """`samples` plus every image under `good_dir` as a normal sample with an empty mask, and `source` saying so;
    both unchanged without `good_dir`."""
    if good_dir is None:
        return samples, source
    good = good_images(good_dir, image_size)
    samples = samples._replace(images=torch.cat([samples.images, good]),
                               masks=torch.cat([samples.masks, torch.zeros(len(good), 1, image_size, image_size)]),
                               labels=torch.cat([samples.labels, torch.zeros(len(good))]))
    return samples, f"{source} + {len(good)} extra good images from {good_dir}"
