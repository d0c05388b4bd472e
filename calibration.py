"""Thresholds that never look at the test set: calibrated per checkpoint pair, stored beside it.

`<checkpoint_path>/<base>_<category>_threshold.json` holds an image-score threshold and a pixel
threshold, computed only from data the model is not tested on (see `calibrate`). predict.py and
export_onnx.py use it by default; test_draem.py reports precision, recall and F1 at it beside
F1-max, which is chosen on the test set itself and is therefore an upper bound.
"""
import json
import math
import os
from pathlib import Path

import numpy as np

from errors import DraemInputError


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
    called, truth = scores >= threshold, labels == 1
    hits = int((called & truth).sum())
    precision = hits / called.sum() if called.any() else math.nan
    recall = hits / truth.sum() if truth.any() else math.nan
    f1 = math.nan if math.isnan(recall) else (0.0 if hits == 0 else 2 * precision * recall / (precision + recall))
    return {"image_precision_at_t": float(precision), "image_recall_at_t": float(recall), "image_f1_at_t": float(f1)}
