"""Thresholds that never look at the test set: calibrated per checkpoint pair, stored beside it.

`<checkpoint_path>/<base>_<category>_threshold.json` holds an image-score threshold and a pixel
threshold, computed only from data the model is not tested on (see `calibrate`). predict.py and
export_onnx.py use it by default; test_draem.py reports precision, recall and F1 at it beside
F1-max, which is chosen on the test set itself and is therefore an upper bound.

The rule: each threshold maximises F1 on a calibration set made like the training data (METHOD.md §2):
the category's defect-free training images, about half of them with a synthetic anomaly pasted in,
optionally plus extra known-good images as normals. The image threshold maximises F1 of the image
scores against the samples' labels, the pixel threshold F1 of the anomaly maps against the anomaly
masks over all pixels. Why F1 on this mix: it weighs missed anomalies and false alarms together on
exactly the kind of anomaly the model was trained to find, and it needs no real defect and no test
image, so a deployed threshold exists for any category and the test metrics at it stay honest.
Its limit: real defects are not synthetic ones, and normal images the model was trained on score
lower than new ones. Held-out training images (a run's validation split) avoid the second bias;
extra good images from production push the threshold up against false alarms on real normal variation.
"""
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from sklearn.metrics import precision_recall_curve

from atomic import atomic_write_text
from data_loader import MVTecDRAEMTrainDataset
from errors import DraemInputError
from images import FOLDER_IMAGE_SUFFIXES, image_format, read_image, sorted_images, to_chw

if TYPE_CHECKING:  # for annotations only: evaluation.py imports this module and validation.py imports evaluation.py
    from evaluation import DraemScorer
    from validation import ValidationSet

RULE = "F1-max on synthetic anomalies + normal images, never the test set"
TRAINING_SOURCE = "training images with synthetic anomalies"
VALIDATION_SOURCE = "held-out training images (validation) with synthetic anomalies"


def threshold_path(checkpoint_dir: str | os.PathLike, base_name: str, category: str) -> Path:
    """Where the thresholds of one checkpoint pair are stored."""
    return Path(checkpoint_dir) / f"{base_name}_{category}_threshold.json"


def read_thresholds(checkpoint_dir: str | os.PathLike, base_name: str, category: str) -> dict | None:
    """The stored thresholds of a checkpoint pair, or None when it has none; an unreadable file is a one-line error."""
    path = threshold_path(checkpoint_dir, base_name, category)
    if not path.is_file():
        return None
    fix = "delete it and calibrate again (calibrate.py)"
    try:
        thresholds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or not JSON
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DraemInputError(f"cannot read threshold file {path} ({type(exc).__name__}: {reason}): {fix}") from None
    if not isinstance(thresholds, dict):
        raise DraemInputError(f"threshold file {path} holds a JSON {type(thresholds).__name__}, not an object: {fix}")
    for key in ("image_threshold", "pixel_threshold"):
        value = thresholds.get(key)
        # bool is an int to Python, and json reads NaN and Infinity: none of them is a threshold
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise DraemInputError(f"threshold file {path}: {key} is {value!r}, not a finite number: {fix}")
    size = thresholds.get("image_size", 1)  # absent in files written before it was recorded
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise DraemInputError(f"threshold file {path}: image_size is {size!r}, not a positive whole number: {fix}")
    return thresholds


def metrics_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, float]:
    """Image precision, recall and F1 when images scoring >= `threshold` are called anomalous (NaN without a threshold).

    Precision is NaN when nothing is called anomalous; recall and F1 when there is no anomalous image.
    """
    if threshold is None:
        return {"image_precision_at_t": math.nan, "image_recall_at_t": math.nan, "image_f1_at_t": math.nan}
    # In float64, as predict.py compares: NumPy would round the threshold to float32 scores' precision first.
    called, truth = np.asarray(scores, dtype=np.float64) >= threshold, labels == 1
    hits = int((called & truth).sum())
    precision = hits / called.sum() if called.any() else math.nan
    recall = hits / truth.sum() if truth.any() else math.nan
    f1 = math.nan if math.isnan(recall) else (0.0 if hits == 0 else 2 * precision * recall / (precision + recall))
    return {"image_precision_at_t": float(precision), "image_recall_at_t": float(recall), "image_f1_at_t": float(f1)}


def usable_thresholds(checkpoint_dir: str | os.PathLike, base_name: str, category: str, image_size: int) -> dict | None:
    """`read_thresholds`, refusing a file calibrated at another image size (scores and maps depend on the size)."""
    thresholds = read_thresholds(checkpoint_dir, base_name, category)
    if thresholds is not None and thresholds.get("image_size", image_size) != image_size:
        raise DraemInputError(f"threshold file {threshold_path(checkpoint_dir, base_name, category)} was calibrated at "
                              f"image size {thresholds['image_size']}, not {image_size}: calibrate again at this size "
                              "(calibrate.py --image_size) or use the size it was made for")
    return thresholds


class ThresholdsInUse(NamedTuple):
    """The thresholds a program applies to one checkpoint pair, and where the image threshold came from."""

    image: float | None  # None: no --threshold and no file
    image_source: str  # "--threshold" or "from <file>"
    pixel: float | None  # the file's pixel threshold, if there is a file
    file: Path  # where the threshold file is (or would be)


def thresholds_in_use(
    checkpoint_dir: str | os.PathLike, base_name: str, category: str, image_size: int, override: float | None
) -> ThresholdsInUse:
    """--threshold (`override`) if given, else the threshold file's image threshold; the file's pixel threshold."""
    thresholds = usable_thresholds(checkpoint_dir, base_name, category, image_size)
    file = threshold_path(checkpoint_dir, base_name, category)
    image, source = override, "--threshold"
    if image is None and thresholds is not None:
        image, source = thresholds["image_threshold"], f"from {file}"
    return ThresholdsInUse(image, source, None if thresholds is None else thresholds["pixel_threshold"], file)


def write_thresholds(
    checkpoint_dir: str | os.PathLike, base_name: str, category: str, thresholds: dict, provenance: dict | None = None
) -> Path:
    """Store a checkpoint pair's thresholds (the dict `calibrate` returns), with the provenance of the run that
    calibrated them (provenance.py) when given, as JSON, atomically; returns the file."""
    path = threshold_path(checkpoint_dir, base_name, category)
    record = thresholds if provenance is None else {**thresholds, "provenance": provenance}
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) where calling scores >= threshold positive maximises F1; the lowest such threshold on ties.

    Candidates are the thresholds of sklearn's precision_recall_curve (the distinct scores, down to the
    first that reaches full recall). F1 = 2·TP / (called + positives) is computed from integer counts,
    so thresholds with mathematically equal F1 get bitwise equal values and the tie rule holds;
    2PR / (P + R) from the curve's rounded precision and recall can differ in the last bit.
    """
    labels, scores = np.asarray(labels).ravel() == 1, np.asarray(scores).ravel()
    _, _, thresholds = precision_recall_curve(labels, scores)  # increasing
    called = scores.size - np.searchsorted(np.sort(scores), thresholds, side="left")
    hits = labels.sum() - np.searchsorted(np.sort(scores[labels]), thresholds, side="left")
    f1 = 2 * hits / (called + labels.sum())
    best = int(np.argmax(f1))  # the first maximum: the lowest threshold reaching it
    return float(thresholds[best]), float(f1[best])


@torch.no_grad()
def calibrate(
    scorer: "DraemScorer", images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, device: torch.device,
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
    """Every image under `good_dir` (recursively, sorted), each a non-empty image file; none, or no folder, is a
    one-line error."""
    paths = sorted_images(Path(good_dir).rglob("*"), FOLDER_IMAGE_SUFFIXES) if Path(good_dir).is_dir() else []
    if not paths:
        raise DraemInputError(f"no images ({', '.join(FOLDER_IMAGE_SUFFIXES)}) found under --good_dir {good_dir}")
    for path in paths:  # a few bytes each, so a broken file is found before training, not after it
        image_format(path, "--good_dir image")
    return paths


def good_images(good_dir: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Every image under `good_dir`, read as the test program reads images: N×3×S×S."""
    return torch.from_numpy(np.stack([to_chw(read_image(path, (image_size, image_size))) for path in good_image_paths(good_dir)]))


def synthetic_set(
    image_paths: list[Path], anomaly_source_path: str | os.PathLike | None, image_size: int, num_samples: int, seed: int,
) -> "ValidationSet":
    """`num_samples` training-style samples (METHOD.md §2) from `image_paths`, for checkpoints trained elsewhere.

    The samples come from validation.synthesize with the training dataset's anomaly sources, so with the
    image paths a run held out (validation.split_paths) and the same seed and count, they are that run's
    validation set; train_draem.py calibrates on the samples it already has.
    """
    from validation import synthesize  # validation imports evaluation, which imports this module

    dataset = MVTecDRAEMTrainDataset(anomaly_source_path=anomaly_source_path, resize_shape=(image_size, image_size),
                                     image_paths=image_paths)
    return synthesize(dataset.images, dataset.draw_source, num_samples, seed)


def with_good_images(
    samples: "ValidationSet", source: str, good_dir: str | os.PathLike | None, image_size: int
) -> tuple["ValidationSet", str]:
    """`samples` plus every image under `good_dir` as a normal sample with an empty mask, and `source` saying so;
    both unchanged without `good_dir`."""
    if good_dir is None:
        return samples, source
    good = good_images(good_dir, image_size)
    samples = samples._replace(images=torch.cat([samples.images, good]),
                               masks=torch.cat([samples.masks, torch.zeros(len(good), 1, image_size, image_size)]),
                               labels=torch.cat([samples.labels, torch.zeros(len(good))]))
    return samples, f"{source} + {len(good)} extra good images from {good_dir}"
