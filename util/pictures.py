"""Pictures: the training grid (train --visualize), per-image heat-map overlays (test --save_images) and the
training curves (one PNG per run, redrawn from the per-epoch log records after every epoch, METHOD.md §4, §5).

Images are BGR uint8 arrays, as OpenCV reads and writes them; inputs are the loader's float tensors (or
arrays) in [0, 1], channels first, BGR. Curves are drawn with matplotlib's object interface (a `Figure`
rendered by the Agg canvas), never pyplot: no global figure state and no display backend, so it works the same
in a headless training job and in tests.
"""
import io
import os

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from util.atomic import atomic_write_bytes

GAP = 2  # separator width in pixels
GAP_VALUE = 255  # white separators
CONTOUR_COLOR = (0, 0, 255)  # red in BGR
HEAT_WEIGHT = 0.5  # heat map share of the blended panel
FONT = cv2.FONT_HERSHEY_SIMPLEX

ArrayLike = torch.Tensor | np.ndarray


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """A float32 NumPy copy of a tensor (any device) or array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] to 0..255 (clipped, rounded)."""
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _to_bgr(x: ArrayLike) -> np.ndarray:
    """A C×H×W image in [0, 1] (C = 3 BGR, or 1 shown as gray) as an H×W×3 uint8 image."""
    x = _to_numpy(x)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a 1×H×W or 3×H×W image, got shape {x.shape}")
    return np.ascontiguousarray(np.repeat(_to_uint8(x), 3 // x.shape[0], axis=0).transpose(1, 2, 0))


def _to_plane(x: ArrayLike, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A single-channel map (H×W or 1×H×W) as an H×W float array, checked against `shape`."""
    x = _to_numpy(x)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.shape != shape:
        raise ValueError(f"{name} must be H×W or 1×H×W matching the image {shape}, got {x.shape}")
    return x


def _join(panels: list[np.ndarray], axis: int) -> np.ndarray:
    """Concatenate equal-size panels along `axis` (1: side by side, 0: stacked) with white separators."""
    gap_shape = list(panels[0].shape)
    gap_shape[axis] = GAP
    gap = np.full(gap_shape, GAP_VALUE, dtype=np.uint8)
    parts = [panels[0]]
    for panel in panels[1:]:
        parts += [gap, panel]
    return np.concatenate(parts, axis=axis)


def training_grid(
    augmented: torch.Tensor,
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    true_mask: torch.Tensor,
    pred_mask: torch.Tensor,
    max_rows: int = 4,
) -> np.ndarray:
    """One row per sample: augmented | reconstruction | target | true mask | predicted mask.

    Images are N×3×H×W BGR in [0, 1]; masks N×1×H×W in [0, 1], shown in gray (white = anomalous).
    Returns a BGR uint8 image of at most `max_rows` rows.
    """
    columns = (augmented, reconstruction, target, true_mask, pred_mask)
    if len({(c.shape[0], *c.shape[2:]) for c in columns}) != 1 or max_rows < 1:
        raise ValueError(
            f"training grid needs tensors with equal N, H, W and max_rows >= 1, got "
            f"{[tuple(c.shape) for c in columns]}"
        )
    rows = [_join([_to_bgr(c[i]) for c in columns], axis=1) for i in range(min(len(augmented), max_rows))]
    return _join(rows, axis=0)


def _contour_panel(image: np.ndarray, gt_mask: np.ndarray) -> np.ndarray:
    """The image with the outline of the ground-truth defects (mask > 0.5) drawn in red."""
    panel = image.copy()
    contours, _ = cv2.findContours((gt_mask > 0.5).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(panel, contours, -1, CONTOUR_COLOR, thickness=1)
    return panel


def _heat_panel(image: np.ndarray, anomaly_map: np.ndarray, normalize: bool) -> np.ndarray:
    """The anomaly map as a JET heat map (blue 0, red 1) blended over the image."""
    if normalize:
        low, high = anomaly_map.min(), anomaly_map.max()
        anomaly_map = (anomaly_map - low) / (high - low) if high > low else np.zeros_like(anomaly_map)
    heat = cv2.applyColorMap(_to_uint8(anomaly_map), cv2.COLORMAP_JET)
    return cv2.addWeighted(image, 1 - HEAT_WEIGHT, heat, HEAT_WEIGHT, 0)


def _write_score(panel: np.ndarray, score: float) -> None:
    """Write the score in the top-left corner, white on a black outline so it reads on any colour."""
    text = f"{score:.3f}"
    scale = max(0.35, panel.shape[0] / 512)
    (_, height), _ = cv2.getTextSize(text, FONT, scale, 1)
    origin = (3, 3 + height)
    cv2.putText(panel, text, origin, FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(panel, text, origin, FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)


def heatmap_overlay(
    image: ArrayLike,
    anomaly_map: ArrayLike,
    gt_mask: ArrayLike | None = None,
    score: float | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """Panels side by side: image | image with ground-truth contour | heat map over the image.

    Without `gt_mask` (images scored in the wild) the contour panel is left out: image | heat map.

    image: 3×H×W BGR in [0, 1]; anomaly_map and gt_mask: H×W or 1×H×W in [0, 1]. The map is drawn
    as is (not stretched per image) so colours mean the same score in every picture; pass
    normalize=True to stretch each map to its own min..max instead. `score` is written in the
    heat panel's corner. Returns a BGR uint8 image.
    """
    base = _to_bgr(image)
    shape = base.shape[:2]
    mask = None if gt_mask is None else _to_plane(gt_mask, shape, "gt_mask")
    heat = _heat_panel(base, _to_plane(anomaly_map, shape, "anomaly_map"), normalize)
    if score is not None:
        _write_score(heat, score)
    if mask is None:
        return _join([base, heat], axis=1)
    return _join([base, _contour_panel(base, mask), heat], axis=1)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a BGR uint8 image as PNG atomically (never a half-written file)."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"could not encode an image of shape {image.shape} and dtype {image.dtype} as PNG "
                           f"for {path}")
    atomic_write_bytes(path, encoded.tobytes())


# The logged loss and its parts (METHOD.md §4); "ssim" is the loss term 1 − SSIM, not SSIM itself.
LOSS_LABELS = {"loss": "total", "l2": "L2 (MSE)", "ssim": "1 − SSIM", "focal": "focal",
               "sspcab": "SSPCAB (weighted)"}
# held-out synthetic anomalies; the test set (--val_test)
METRIC_SETS = {"val_": "validation", "test_": "test"}
NOT_METRICS = {"val_seconds"}  # a duration logged beside the metrics, not a fraction
SIZE_INCHES, DPI = (12.0, 3.5), 100


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records holding a number under `key`; NaN is kept (drawn as a gap)."""
    points = [(r["epoch"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [epoch for epoch, _ in points], [value for _, value in points]


def _metric_keys(records: list[dict]) -> list[str]:
    """The val_*/test_* metric keys of any record, in first-logged order (validation may run only every N
    epochs)."""
    keys = dict.fromkeys(k for r in records for k in r
                         if k.startswith(tuple(METRIC_SETS)) and k not in NOT_METRICS)
    return list(keys)


def _finish(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    # whole epochs, also for a 1-epoch log
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small", ncol=2 if len(ax.lines) > 6 else 1)


def save_training_curves(records: list[dict], path: str | os.PathLike) -> None:
    """Write the run's curves as a PNG at `path` (atomically): loss and its parts, learning rate, and the
    val_*/test_* metrics when any record has them. `records` are the JSONL log records of train_draem.py."""
    metrics = _metric_keys(records)
    figure = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    axes = figure.subplots(1, 3 if metrics else 2)
    loss_ax, lr_ax = axes[0], axes[1]
    for key, label in LOSS_LABELS.items():
        epochs, values = _series(records, key)
        if epochs:
            loss_ax.plot(epochs, values, marker=".", label=label, linewidth=2 if key == "loss" else 1)
    _finish(loss_ax, "Training loss (mean per epoch)", "loss")
    epochs, values = _series(records, "lr")
    lr_ax.plot(epochs, values, marker=".", label="Adam lr")
    # MultiStepLR drops it ×0.2 twice (METHOD.md §5): steps of equal height on a log axis
    lr_ax.set_yscale("log")
    _finish(lr_ax, "Learning rate", "learning rate (log scale)")
    if metrics:
        metric_ax = axes[2]
        names = list(dict.fromkeys(key.split("_", 1)[1] for key in metrics))
        for key in metrics:
            prefix, name = key.split("_", 1)
            epochs, values = _series(records, key)
            metric_ax.plot(epochs, values, marker="o", markersize=3, label=key,
                           # same metric, same colour; test set dashed
                           color=f"C{names.index(name) % 10}", linestyle="-" if prefix == "val" else "--")
        metric_ax.set_ylim(-0.02, 1.02)  # fractions
        sets = " and ".join(name for prefix, name in METRIC_SETS.items()
                            if any(k.startswith(prefix) for k in metrics))
        _finish(metric_ax, f"Metrics on the {sets} set", "fraction")
    category = records[-1].get("category") if records else None
    if category:
        figure.suptitle(f"DRAEM training curves: {category}")
    atomic_write_bytes(path, png_bytes(figure))


def png_bytes(figure: Figure) -> bytes:
    """A matplotlib figure as PNG bytes, drawn with the Agg canvas (no pyplot, no display backend)."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
