"""Calibrating a checkpoint pair's thresholds on a calibration set, never the test set (util/thresholds.py
has the two rules, the file and the decisions; METHOD.md §2 the synthesis the calibration set is made by).
"""
import os
from pathlib import Path

import numpy as np
import torch

from data_loader import TrainDataset
from engine.evaluation import DraemScorer, score, tensor_batches
from engine.validation import SampleSet, split_paths, synthesize
from util.errors import DraemInputError
from util.images import find_images, image_shape, load_images, shape_record, to_float
from util.layouts import VALIDATION_LAYOUTS, train_image_paths, validation_image_paths
from util.metrics import f1_max_threshold
from util.thresholds import (
    DEFAULT_K,
    HELD_OUT_SOURCE,
    NORMAL_RULE,
    RULE,
    TRAINING_SOURCE,
    VALIDATION_GOOD_SOURCE,
    MeanStd,
)


@torch.no_grad()
def calibrate(
    scorer: DraemScorer, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
    device: torch.device, batch_size: int = 8, *, source: str = TRAINING_SOURCE,
) -> dict:
    """Image and pixel thresholds maximising F1 on a calibration set (the rule in the module docstring).

    `images` N×3×H×W in [0, 1], `masks` N×1×H×W binary, `labels` (N,) 1 = anomalous; scored by `scorer`
    (the test protocol, METHOD.md §6) in batches of `batch_size`. Returns the dict `write_thresholds`
    stores: image_threshold, pixel_threshold (anomalous where score or map >= it), the F1 each reaches
    here (image_f1, pixel_f1), rule, source (what the set was made from), n_normal, n_anomalous and
    image_size (the images' side, or [height, width] when not square). Leaves the scorer in eval mode.
    """
    n = len(images)
    if masks.shape != (n, 1, *images.shape[2:]) or labels.numel() != n:
        raise ValueError(f"expected N×1×H×W masks and N labels for images {tuple(images.shape)}, "
                         f"got {tuple(masks.shape)} and {labels.numel()}")
    labels = labels.reshape(-1).cpu().numpy()
    n_anomalous = int((labels == 1).sum())
    pixel_labels = masks.cpu().numpy().reshape(-1) >= 0.5
    if n_anomalous in (0, n) or pixel_labels.all() or not pixel_labels.any():
        raise DraemInputError(f"the calibration set needs normal and anomalous samples and pixels, got "
                              f"{n - n_anomalous} normal and {n_anomalous} anomalous samples: calibrate on "
                              f"more samples (--samples)")
    scored, _ = score(scorer, tensor_batches(images, masks, torch.from_numpy(labels), batch_size), n,
                      tuple(images.shape[2:]), device, desc="calibrate")
    image_threshold, image_f1 = f1_max_threshold(labels, scored.scores)
    pixel_threshold, pixel_f1 = f1_max_threshold(pixel_labels, scored.maps.reshape(-1))
    return {
        "image_threshold": image_threshold, "pixel_threshold": pixel_threshold, "image_f1": image_f1,
        "pixel_f1": pixel_f1, "rule": RULE, "source": source, "n_normal": n - n_anomalous,
        "n_anomalous": n_anomalous, "image_size": shape_record(images.shape[-2:]),
    }


@torch.no_grad()
def calibrate_normal_only(
    scorer: DraemScorer, images: torch.Tensor, device: torch.device, batch_size: int = 8, *,
    k: float = DEFAULT_K, source: str,
) -> dict:
    """Image and pixel thresholds mean + k·std of the scores on normal images only (util/thresholds.py).

    `images` N×3×H×W in [0, 1], all normal, scored by `scorer` in batches of `batch_size`. Returns the dict
    `write_thresholds` stores: image_threshold, pixel_threshold, rule, k, source, n_normal, n_anomalous (0),
    image_size, and the means and standard deviations they come from. Leaves the scorer in eval mode.
    """
    n = len(images)
    if n < 2:
        raise DraemInputError(f"the normal-only rule needs at least 2 normal images to measure a spread, got "
                              f"{n}")
    masks, labels = torch.zeros(n, 1, *images.shape[2:]), torch.zeros(n)
    scored, _ = score(scorer, tensor_batches(images, masks, labels, batch_size), n, tuple(images.shape[2:]),
                      device, desc="calibrate")
    image_stats, pixel_stats = MeanStd(), MeanStd()
    image_stats.update(scored.scores)
    for amap in scored.maps:  # image by image: no float64 copy of every pixel at once
        pixel_stats.update(amap)
    return {
        "image_threshold": image_stats.threshold(k), "pixel_threshold": pixel_stats.threshold(k),
        "rule": NORMAL_RULE, "k": k, "source": source, "n_normal": len(images), "n_anomalous": 0,
        "image_size": shape_record(images.shape[-2:]),
        "image_mean": image_stats.mean, "image_std": image_stats.std,
        "pixel_mean": pixel_stats.mean, "pixel_std": pixel_stats.std,
    }


def read_images(paths: list[Path], image_size: int | tuple[int, int]) -> torch.Tensor:
    """Images read as the test program reads them: N×3×H×W."""
    images = load_images(paths, image_shape(image_size), desc="loading normal images")
    return torch.from_numpy(np.ascontiguousarray(to_float(images).transpose(0, 3, 1, 2)))


def good_images(good_dir: str | os.PathLike, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Every image under `good_dir`, read as the test program reads images: N×3×H×W."""
    return read_images(find_images(good_dir, "--good_dir"), image_size)


def synthetic_set(
    image_paths: list[Path], anomaly_source_path: str | os.PathLike | None, image_size: int | tuple[int, int],
    num_samples: int, seed: int,
) -> SampleSet:
    """`num_samples` training-style samples (METHOD.md §2) from `image_paths`, for checkpoints trained
    elsewhere.

    The samples come from validation.synthesize with the training dataset's anomaly sources, so with the
    image paths a run held out (validation.split_paths) and the same seed and count, they are that run's
    validation set; train_draem.py calibrates on the samples it already has.
    """
    dataset = TrainDataset(anomaly_source_path=anomaly_source_path, resize_shape=image_shape(image_size),
                           image_paths=image_paths)
    return synthesize(dataset.images, dataset.draw_source, num_samples, seed)


def with_good_images(
    samples: SampleSet, source: str, good_dir: str | os.PathLike | None, image_size: int | tuple[int, int]
) -> tuple[SampleSet, str]:
    """`samples` plus every image under `good_dir` as a normal sample with an empty mask, and `source` saying
    so; both unchanged without `good_dir`."""
    if good_dir is None:
        return samples, source
    good = good_images(good_dir, image_size)
    samples = samples._replace(images=torch.cat([samples.images, good]),
                               masks=torch.cat([samples.masks,
                                                torch.zeros(len(good), 1, *image_shape(image_size))]),
                               labels=torch.cat([samples.labels, torch.zeros(len(good))]))
    return samples, f"{source} + {len(good)} extra good images from {good_dir}"


def normal_set(
    layout: str, data_path: str | os.PathLike, category: str, val_fraction: float | None, seed: int
) -> tuple[list[Path], str]:
    """The normal images a model of `category` never trained on, and what they are: the layout's
    validation/good (VALIDATION_LAYOUTS), else the training images a run with `val_fraction` held out
    (split_paths with `seed`), else none ([]: only a folder of good images can give the normal-only rule its
    set)."""
    if layout in VALIDATION_LAYOUTS:
        return validation_image_paths(layout, data_path, category), VALIDATION_GOOD_SOURCE
    if val_fraction is not None:
        return (split_paths(train_image_paths(layout, data_path, category), val_fraction, seed)[1],
                HELD_OUT_SOURCE)
    return [], ""


def normal_images(
    paths: list[Path], source: str, good_dir: str | os.PathLike | None, image_size: int | tuple[int, int]
) -> tuple[torch.Tensor, str]:
    """`paths` plus every image under `good_dir`, read as the test program reads images (N×3×H×W), and what
    they are."""
    require_normal_set(paths, good_dir)
    if good_dir is not None:
        extra = find_images(good_dir, "--good_dir")
        paths = [*paths, *extra]
        source = (f"{source} + {len(extra)} good images from {good_dir}" if source
                  else f"{len(extra)} good images from {good_dir}")
    return read_images(paths, image_size), source


def require_normal_set(paths: list[Path], good_dir: str | os.PathLike | None) -> None:
    """A one-line error when the normal-only rule would have no images: neither `paths` nor a `good_dir`."""
    if not paths and good_dir is None:
        raise DraemInputError("the normal-only rule (mean_std) needs normal images the model did not train "
                              "on: a layout with validation/good (mvtec_ad2, mvtec_loco), held-out training "
                              "images (--val_every / --val_fraction), or --good_dir")
