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

The second rule, from normal images only (MVTec AD 2's baseline recipe): each threshold is mean + k·std
(k = 3 by default) of the scores on a normal-only set the model did not train on (a layout's
validation/good, held-out training images, or a folder of good images): the image threshold over the
image scores, the pixel threshold over every pixel of every anomaly map. std is the population standard
deviation (divided by the count, not count - 1). It needs no anomaly at all, synthetic or real, and
says how far above normal variation a score must be; it knows nothing about how high anomalies score.
The file records the rule (`rule`, and `k` for this one) and the set (`source`).
"""
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from util.atomic import atomic_write_text
from util.errors import DraemInputError
from util.images import image_shape, shape_text

RULE = "F1-max on synthetic anomalies + normal images, never the test set"
NORMAL_RULE = "mean + k·std of the scores on normal images only, never the test set"
RULES = {"f1": RULE, "mean_std": NORMAL_RULE}  # the --threshold_rule / --rule choices
DEFAULT_K = 3.0
TRAINING_SOURCE = "training images with synthetic anomalies"
VALIDATION_SOURCE = "held-out training images (validation) with synthetic anomalies"
VALIDATION_GOOD_SOURCE = "validation/good images"  # a layout's normal-only set (VALIDATION_LAYOUTS)
VALIDATION_GOOD_SYNTHETIC_SOURCE = "validation/good images with synthetic anomalies"
HELD_OUT_SOURCE = "held-out training images (validation)"


def threshold_path(checkpoint_dir: str | os.PathLike, base_name: str, category: str) -> Path:
    """Where the thresholds of one checkpoint pair are stored."""
    return Path(checkpoint_dir) / f"{base_name}_{category}_threshold.json"


def read_thresholds(checkpoint_dir: str | os.PathLike, base_name: str, category: str) -> dict | None:
    """The stored thresholds of a checkpoint pair, or None when it has none; an unreadable file is a one-line
    error."""
    path = threshold_path(checkpoint_dir, base_name, category)
    if not path.is_file():
        return None
    fix = "delete it and calibrate again (python -m tools.calibrate)"
    try:
        thresholds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or not JSON
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DraemInputError(f"cannot read threshold file {path} ({type(exc).__name__}: {reason}): "
                              f"{fix}") from None
    if not isinstance(thresholds, dict):
        raise DraemInputError(f"threshold file {path} holds a JSON {type(thresholds).__name__}, not an "
                              f"object: {fix}")
    for key in ("image_threshold", "pixel_threshold"):
        value = thresholds.get(key)
        # bool is an int to Python, and json reads NaN and Infinity: none of them is a threshold
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise DraemInputError(f"threshold file {path}: {key} is {value!r}, not a finite number: {fix}")
    size = thresholds.get("image_size", 1)  # absent in files written before it was recorded; [height, width]
                                            # if not square
    sides = size if isinstance(size, list) and len(size) == 2 else [size]
    if not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in sides):
        raise DraemInputError(f"threshold file {path}: image_size is {size!r}, not a positive whole number "
                              f"or [height, width]: {fix}")
    return thresholds


def metrics_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, float]:
    """Image precision, recall and F1 when images scoring >= `threshold` are called anomalous (NaN without a
    threshold).

    Precision is NaN when nothing is called anomalous; recall and F1 when there is no anomalous image.
    """
    if threshold is None:
        return {"image_precision_at_t": math.nan, "image_recall_at_t": math.nan, "image_f1_at_t": math.nan}
    # In float64, as predict.py compares: NumPy would round the threshold to float32 scores' precision first.
    called, truth = np.asarray(scores, dtype=np.float64) >= threshold, labels == 1
    hits = int((called & truth).sum())
    precision = hits / called.sum() if called.any() else math.nan
    recall = hits / truth.sum() if truth.any() else math.nan
    f1 = (math.nan if math.isnan(recall)
          else (0.0 if hits == 0 else 2 * precision * recall / (precision + recall)))
    return {"image_precision_at_t": float(precision), "image_recall_at_t": float(recall),
            "image_f1_at_t": float(f1)}


def usable_thresholds(
    checkpoint_dir: str | os.PathLike, base_name: str, category: str, image_size: int | tuple[int, int]
) -> dict | None:
    """`read_thresholds`, refusing a file calibrated at another image size (scores and maps depend on the
    size)."""
    thresholds = read_thresholds(checkpoint_dir, base_name, category)
    if (thresholds is not None
        and image_shape(thresholds.get("image_size", image_size)) != image_shape(image_size)):
        raise DraemInputError(f"threshold file {threshold_path(checkpoint_dir, base_name, category)} was "
                              f"calibrated at image size {shape_text(thresholds['image_size'])}, not "
                              f"{shape_text(image_size)}: calibrate again at this size (python -m "
                              f"tools.calibrate --image_size) or use the size it was made for")
    return thresholds


class ThresholdsInUse(NamedTuple):
    """The thresholds a program applies to one checkpoint pair, and where the image threshold came from."""

    image: float | None  # None: no --threshold and no file
    image_source: str  # "--threshold" or "from <file>"
    pixel: float | None  # the file's pixel threshold, if there is a file
    file: Path  # where the threshold file is (or would be)


def thresholds_in_use(
    checkpoint_dir: str | os.PathLike, base_name: str, category: str, image_size: int | tuple[int, int],
    override: float | None,
) -> ThresholdsInUse:
    """--threshold (`override`) if given, else the threshold file's image threshold; the file's pixel
    threshold."""
    thresholds = usable_thresholds(checkpoint_dir, base_name, category, image_size)
    file = threshold_path(checkpoint_dir, base_name, category)
    image, source = override, "--threshold"
    if image is None and thresholds is not None:
        image, source = thresholds["image_threshold"], f"from {file}"
    return ThresholdsInUse(image, source, None if thresholds is None else thresholds["pixel_threshold"], file)


def write_thresholds(
    checkpoint_dir: str | os.PathLike, base_name: str, category: str, thresholds: dict,
    provenance: dict | None = None
) -> Path:
    """Store a checkpoint pair's thresholds (the dict `calibrate` returns), with the provenance of the run
    that calibrated them (provenance.py) when given, as JSON, atomically; returns the file."""
    path = threshold_path(checkpoint_dir, base_name, category)
    record = thresholds if provenance is None else {**thresholds, "provenance": provenance}
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


class MeanStd:
    """Mean and population standard deviation of values given in chunks (every pixel of many maps), in
    float64.

    Chunks are combined by Chan et al.'s pairwise update, which keeps the precision of a two-pass computation.
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # m2: sum of squared deviations from the mean

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if not values.size:
            return
        mean = float(values.mean())
        m2 = float(np.square(values - mean).sum())
        total = self.count + values.size
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * values.size / total
        self.mean += delta * values.size / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else math.nan

    def threshold(self, k: float) -> float:
        """mean + k·std."""
        return self.mean + k * self.std
