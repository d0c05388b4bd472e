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
from typing import NamedTuple

import numpy as np
from sklearn.metrics import precision_recall_curve

from util.atomic import atomic_write_text
from util.errors import DraemInputError

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
    try:
        thresholds = json.loads(path.read_text())
        float(thresholds["image_threshold"]), float(thresholds["pixel_threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DraemInputError(f"cannot read threshold file {path} ({type(exc).__name__}: {exc}): "
                              "delete it and calibrate again (calibrate.py)") from None
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


def write_thresholds(checkpoint_dir: str | os.PathLike, base_name: str, category: str, thresholds: dict) -> Path:
    """Store a checkpoint pair's thresholds (the dict `calibrate` returns) as JSON, atomically; returns the file."""
    path = threshold_path(checkpoint_dir, base_name, category)
    atomic_write_text(path, json.dumps(thresholds, indent=2) + "\n")
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
