"""Training curves: one PNG per run, redrawn from the per-epoch log records after every epoch (METHOD.md §4, §5).

Drawn with matplotlib's object interface (a `Figure` rendered by the Agg canvas), never pyplot: no global figure
state and no display backend, so it works the same in a headless training job and in tests.
"""
import io
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from atomic import atomic_write_bytes

# The logged loss and its parts (METHOD.md §4); "ssim" is the loss term 1 − SSIM, not SSIM itself.
LOSS_LABELS = {"loss": "total", "l2": "L2 (MSE)", "ssim": "1 − SSIM", "focal": "focal", "sspcab": "SSPCAB (weighted)"}
METRIC_SETS = {"val_": "validation", "test_": "test"}  # held-out synthetic anomalies; the test set (--val_test)
NOT_METRICS = {"val_seconds"}  # a duration logged beside the metrics, not a fraction
SIZE_INCHES, DPI = (12.0, 3.5), 100


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records holding a number under `key`; NaN is kept (drawn as a gap)."""
    points = [(r["epoch"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [epoch for epoch, _ in points], [value for _, value in points]


def _metric_keys(records: list[dict]) -> list[str]:
    """The val_*/test_* metric keys of any record, in first-logged order (validation may run only every N epochs)."""
    keys = dict.fromkeys(k for r in records for k in r if k.startswith(tuple(METRIC_SETS)) and k not in NOT_METRICS)
    return list(keys)


def _finish(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, also for a 1-epoch log
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
    lr_ax.set_yscale("log")  # MultiStepLR drops it ×0.2 twice (METHOD.md §5): steps of equal height on a log axis
    _finish(lr_ax, "Learning rate", "learning rate (log scale)")
    if metrics:
        metric_ax = axes[2]
        names = list(dict.fromkeys(key.split("_", 1)[1] for key in metrics))
        for key in metrics:
            prefix, name = key.split("_", 1)
            epochs, values = _series(records, key)
            metric_ax.plot(epochs, values, marker="o", markersize=3, label=key, color=f"C{names.index(name) % 10}",
                           linestyle="-" if prefix == "val" else "--")  # same metric, same colour; test set dashed
        metric_ax.set_ylim(-0.02, 1.02)  # fractions
        sets = " and ".join(name for prefix, name in METRIC_SETS.items() if any(k.startswith(prefix) for k in metrics))
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
