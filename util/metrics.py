"""Evaluation: the released DRAEM protocol (METHOD.md §6), plus AUPRO and image F1-max, and results tables.

Protocol, as in the authors' test program:
- the pixel map is softmax channel 1 of the discriminative output;
- the image score is the max of that map after a 21×21 mean filter (avg_pool2d, stride 1,
  padding 10, zero padding counted, as released);
- image AUROC / AP over all test images, pixel AUROC / AP over all pixels of all test images;
- quirk kept for comparable numbers: the resized float ground-truth mask is cast to uint8, so
  only pixels whose value is exactly 1.0 count as anomalous (the blurred border of each defect
  becomes normal). AUPRO uses the same cast masks.
"""
import csv
import io
import json
import math
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as label_regions
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from util.atomic import atomic_write_text

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "image_f1_max")
# MVTec AD 2's leaderboard metrics at each image's own resolution (FullResolutionEvaluator), in its layout's
# tables only.
AD2_METRICS = ("aupro_005", "seg_f1", "class_f1")
# At the image threshold calibrated without the test set (util/thresholds.py); F1-max above is chosen on the
# test set, an upper bound. Empty where a checkpoint has no threshold file.
THRESHOLD_METRICS = ("image_precision_at_t", "image_recall_at_t", "image_f1_at_t")
TABLE_METRICS = (*METRICS, *THRESHOLD_METRICS)
PAPER_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap")
PAPER_RESULTS: dict = json.loads(Path(__file__).with_name("paper_results.json").read_text())
MEAN_ROW = "mean"
POOL_SIZE = 21


# --- the released protocol -------------------------------------------------------------------


class CategoryResult(NamedTuple):
    """What evaluating one category found: its metrics and, per test image, what the metrics were computed
    from."""

    metrics: dict[str, float]
    scores: np.ndarray  # (N,) float32 image scores
    labels: np.ndarray  # (N,) uint8, 1 = anomalous
    maps: np.ndarray  # N×H×W float32 anomaly maps
    masks: np.ndarray  # N×H×W uint8 ground truth after the released cast (1 = anomalous pixel)
    paths: list[str]  # the test images, in evaluation order


def image_scores(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Image anomaly scores (N,) from pixel maps N×1×H×W: max of the 21×21 average-pooled map."""
    if anomaly_map.dim() != 4 or anomaly_map.shape[1] != 1:
        raise ValueError(f"anomaly map must be N×1×H×W (softmax channel 1), got {tuple(anomaly_map.shape)}")
    pooled = F.avg_pool2d(anomaly_map.detach().float(), POOL_SIZE, stride=1, padding=POOL_SIZE // 2)
    return pooled.flatten(1).amax(dim=1)


def released_mask_cast(mask: torch.Tensor) -> np.ndarray:
    """Cast a float mask in [0, 1] to uint8 as the released program does: only exact 1.0 becomes 1."""
    mask = mask.detach().cpu().float()
    if mask.numel() and (mask.min() < 0 or mask.max() > 1):
        raise ValueError("ground-truth masks must be floats in [0, 1]: divide 0/255 mask images by 255")
    return mask.numpy().astype(np.uint8)


def _has_both_classes(y: np.ndarray, what: str) -> bool:
    """True when y holds 0s and 1s; otherwise warn that the metrics on `what` are undefined (NaN)."""
    if y.min() == 0 and y.max() == 1:
        return True
    warnings.warn(
        f"{what}: only class {int(y.min())} present, so AUROC/AP/F1/AUPRO are undefined and reported as NaN",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


class DraemEvaluator:
    """Streams test batches into preallocated arrays, then computes all metrics of one category.

    Memory is fixed at construction: num_images×H×W float32 maps and uint8 masks, nothing grows.
    `compute` evaluates the images given so far (all of them when the test set is complete).
    """

    def __init__(self, num_images: int, height: int, width: int):
        if num_images < 1 or height < 1 or width < 1:
            raise ValueError(f"evaluator needs at least one image of positive size, got "
                             f"{num_images}×{height}×{width}")
        self.maps = np.zeros((num_images, height, width), dtype=np.float32)
        self.masks = np.zeros((num_images, height, width), dtype=np.uint8)
        self.scores = np.zeros(num_images, dtype=np.float32)
        self.labels = np.zeros(num_images, dtype=np.uint8)
        self.count = 0

    def update(
        self, anomaly_map: torch.Tensor, mask: torch.Tensor, label: torch.Tensor,
        scores: torch.Tensor | None = None
    ) -> None:
        """Add a batch: maps N×1×H×W, float masks N×1×H×W in [0, 1], labels (N,) or (N, 1) of 0/1.

        `scores` are the maps' image scores when the caller has them already (`image_scores(anomaly_map)`).
        """
        n = anomaly_map.shape[0]
        expected = (n, 1, *self.maps.shape[1:])
        if tuple(anomaly_map.shape) != expected or tuple(mask.shape) != expected:
            raise ValueError(
                f"expected anomaly map and mask of shape {expected}, got {tuple(anomaly_map.shape)} and "
                f"{tuple(mask.shape)}"
            )
        labels = label.detach().cpu().reshape(-1)
        if labels.numel() != n or not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError(f"expected {n} labels of 0 (good) or 1 (anomalous), got {label.tolist()}")
        if self.count + n > len(self.maps):
            raise ValueError(f"evaluator was sized for {len(self.maps)} images, got more")
        batch = slice(self.count, self.count + n)
        self.scores[batch] = (image_scores(anomaly_map) if scores is None else scores).cpu().numpy()
        self.maps[batch] = anomaly_map.detach()[:, 0].cpu().float().numpy()
        self.masks[batch] = released_mask_cast(mask[:, 0])
        self.labels[batch] = labels.numpy().astype(np.uint8)
        self.count += n

    def compute(self) -> dict[str, float]:
        """All metrics as fractions in [0, 1]; NaN (with a warning) where only one class is present."""
        if self.count == 0:
            raise ValueError("no test images were evaluated")
        return {**self._image_metrics(), **self._pixel_metrics()}

    def _image_metrics(self) -> dict[str, float]:
        labels, scores = self.labels[: self.count], self.scores[: self.count]
        if not _has_both_classes(labels, "image labels"):
            return {"image_auroc": math.nan, "image_ap": math.nan, "image_f1_max": math.nan}
        return {
            "image_auroc": float(roc_auc_score(labels, scores)),
            "image_ap": float(average_precision_score(labels, scores)),
            "image_f1_max": f1_max_threshold(labels, scores)[1],
        }

    def _pixel_metrics(self) -> dict[str, float]:
        maps, masks = self.maps[: self.count], self.masks[: self.count]
        if not _has_both_classes(masks, "pixel masks (after the uint8 cast)"):
            return {"pixel_auroc": math.nan, "pixel_ap": math.nan, "aupro": math.nan}
        return {
            "pixel_auroc": float(roc_auc_score(masks.ravel(), maps.ravel())),
            "pixel_ap": float(average_precision_score(masks.ravel(), maps.ravel())),
            "aupro": aupro(maps, masks),
        }


# --- metrics beyond the released program -----------------------------------------------------

def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) where calling scores >= threshold positive maximises F1; the lowest such threshold on
    ties.

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


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Per pixel: 1 / (number of regions × size of its region) inside defects, 0 elsewhere.

    Regions are 8-connected components of each image's ground truth (the MVTec AD definition),
    so summing the weights of the pixels above a threshold gives the mean per-region overlap.
    """
    region_ids = np.zeros(masks.shape, dtype=np.int32)
    num_regions = 0
    for i, mask in enumerate(masks):
        ids, n = label_regions(mask, connectivity=2, return_num=True)
        region_ids[i] = np.where(ids > 0, ids + num_regions, 0)
        num_regions += n
    sizes = np.bincount(region_ids.ravel(), minlength=num_regions + 1).astype(np.float64)
    per_region = np.zeros_like(sizes)
    per_region[1:] = 1.0 / (num_regions * sizes[1:])
    return per_region[region_ids.ravel()]


def _pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, from (0, 0) to (1, 1), via one sort and cumulative sums."""
    scores = maps.ravel()
    order = np.argsort(-scores, kind="stable")
    normal = (masks.ravel() == 0)[order]
    overlap = _region_weights(masks)[order]
    # Pixels with equal scores pass a threshold together: keep only the last of each tie group.
    sorted_scores = scores[order]
    group_ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), len(sorted_scores) - 1)
    fpr = np.cumsum(normal)[group_ends] / normal.sum()
    pro = np.cumsum(overlap)[group_ends]
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], interpolating y at exactly x = limit."""
    inside = np.searchsorted(x, limit, side="right")
    xs, ys = x[:inside], y[:inside]
    if xs[-1] < limit:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        xs = np.append(xs, limit)
        ys = np.append(ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit` FPR, normalised to [0, 1].

    maps: N×H×W scores; masks: N×H×W binary ground truth. A perfect map gives 1.0, a constant
    map gives fpr_limit / 2 (the curve is the diagonal). NaN with a warning without both classes.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks must both be N×H×W, got {maps.shape} and {masks.shape}")
    masks = (masks > 0).astype(np.uint8)
    if not _has_both_classes(masks, "AUPRO masks"):
        return math.nan
    fpr, pro = _pro_curve(maps, masks)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


# --- MVTec AD 2's leaderboard metrics, at each image's own resolution ---------------------------

def f1_from_counts(true_positives: int, false_positives: int, false_negatives: int) -> float:
    """2·TP / (2·TP + FP + FN); NaN when there is nothing to find and nothing was called."""
    denominator = 2 * true_positives + false_positives + false_negatives
    return 2 * true_positives / denominator if denominator else math.nan


class FullResolutionEvaluator:
    """AU-PRO@0.05, SegF1 and ClassF1 (MVTec AD 2's leaderboard) over float16 maps at each image's own
    resolution, one image at a time in fixed memory.

    AU-PRO@0.05: the per-region-overlap curve of `aupro`, integrated up to FPR 0.05 and divided by 0.05. A
    float16 map takes at most 2**15 non-negative values whose bit patterns sort like the values, so per-value
    counts of normal pixels and per-value sums of region weights (1 / region size; 8-connected regions of each
    image) give the curve at every distinct value: exactly what `aupro` computes on all pixels at once,
    without holding them.
    SegF1: F1 of the submitted binary masks against the ground truth, pooled over all pixels of all images
    (one TP, FP and FN count for the whole test set). ClassF1: F1 of the image decisions
    (`util.ad2.image_decision`) against the image labels. Without masks and decisions (no thresholds) both are
    NaN.
    """

    FPR_LIMIT = 0.05
    BINS = 2**15  # the non-negative float16 bit patterns

    def __init__(self):
        self.normal = np.zeros(self.BINS, dtype=np.int64)  # normal pixels per float16 value
        # sum over anomalous pixels of 1 / their region's size
        self.overlap = np.zeros(self.BINS, dtype=np.float64)
        self.regions = 0
        self.pixels = np.zeros(3, dtype=np.int64)  # TP, FP, FN of the submitted masks
        self.images = np.zeros(3, dtype=np.int64)  # TP, FP, FN of the image decisions
        self.thresholded = True

    def update(self, amap: np.ndarray, truth: np.ndarray, label: int, predicted: np.ndarray | None = None,
               called: bool | None = None) -> None:
        """One image: its float16 map and bool ground truth (H×W, its own size), label 1 = anomalous, and the
        submitted bool mask and image decision (None without thresholds)."""
        if amap.dtype != np.float16 or amap.shape != truth.shape or amap.ndim != 2:
            raise ValueError(f"expected an H×W float16 map and an H×W mask, got {amap.dtype} {amap.shape}, "
                             f"{truth.shape}")
        if (amap < 0).any() or not np.isfinite(amap).all():
            raise ValueError("anomaly maps must be finite and non-negative")
        truth = truth.astype(bool)
        bins = (amap + np.float16(0)).view(np.uint16)  # + 0 turns a -0.0 into 0.0, the lowest bin
        self.normal += np.bincount(bins[~truth], minlength=self.BINS)
        ids, count = label_regions(truth, connectivity=2, return_num=True)
        if count:
            sizes = np.bincount(ids.ravel())
            self.overlap += np.bincount(bins[truth], weights=1.0 / sizes[ids[truth]], minlength=self.BINS)
            self.regions += count
        if predicted is None or called is None:
            self.thresholded = False
            return
        predicted = predicted.astype(bool)
        self.pixels += [np.sum(predicted & truth), np.sum(predicted & ~truth), np.sum(~predicted & truth)]
        self.images += [called and label == 1, called and label == 0, not called and label == 1]

    def compute(self) -> dict[str, float]:
        """aupro_005, seg_f1, class_f1 as fractions (NaN where undefined, with a warning for AU-PRO)."""
        if not self.regions or not self.normal.sum():
            warnings.warn("full-resolution AU-PRO: no anomalous or no normal pixel, so it is undefined (NaN)",
                          RuntimeWarning, stacklevel=2)
            aupro_005 = math.nan
        else:
            # From the highest value down: the pixels at or above each value, as the threshold falls.
            fpr = np.concatenate([[0.0], np.cumsum(self.normal[::-1]) / self.normal.sum()])
            pro = np.concatenate([[0.0], np.cumsum(self.overlap[::-1]) / self.regions])
            aupro_005 = _area_up_to(fpr, pro, self.FPR_LIMIT) / self.FPR_LIMIT
        if not self.thresholded:
            return {"aupro_005": aupro_005, "seg_f1": math.nan, "class_f1": math.nan}
        return {"aupro_005": aupro_005, "seg_f1": f1_from_counts(*self.pixels.tolist()),
                "class_f1": f1_from_counts(*self.images.tolist())}


# --- results tables --------------------------------------------------------------------------

def _percent(value: float | None) -> float | None:
    """Fraction to percent with two decimals; None and NaN stay None (empty cell)."""
    if value is None or math.isnan(value):
        return None
    return round(100 * value, 2)


def _paper_value(categories: list[str], metric: str) -> float | None:
    """The paper's value for one category or the mean over several; None if any is not in the paper."""
    paper = PAPER_RESULTS["paper"]
    if not all(c in paper for c in categories):
        return None
    return round(sum(paper[c][metric] for c in categories) / len(categories), 1)


def _row(
    category: str, ours: dict[str, float | None], paper_categories: list[str],
    spread: dict[str, float | None] | None
) -> dict:
    """One table row: our metrics in percent (with their standard deviation over runs when `spread` is given),
    plus paper value and delta for the paper's metrics."""
    row: dict = {"category": category}
    for metric, value in ours.items():
        row[metric] = value
        if spread is not None:
            row[f"{metric}_std"] = spread.get(metric)
        if metric in PAPER_METRICS:
            paper = _paper_value(paper_categories, metric)
            row[f"{metric}_paper"] = paper
            row[f"{metric}_delta"] = None if paper is None or value is None else round(value - paper, 2)
    return row


def mean_and_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of one metric over runs; NaN for both when any run lacks it
    (None or NaN), the std NaN for a single run."""
    if any(v is None or math.isnan(v) for v in values):
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def table_metrics(keys: Collection[str]) -> tuple[str, ...]:
    """The metrics a results table shows for a result or row with these keys: MVTec AD 2's have columns only
    in its tables, so every other table keeps its columns."""
    return TABLE_METRICS + tuple(m for m in AD2_METRICS if m in keys)


def results_rows(runs: list[dict[str, dict[str, float]]]) -> list[dict]:
    """Table rows (percent) for each category, then the mean row, with paper values and deltas.

    `runs` holds one {category: metrics} dict per run (checkpoints of one configuration trained with different
    seeds). With one run the rows hold its values; with several, each value is the mean over the runs and
    `<metric>_std` the sample standard deviation across them; the mean row's spread is that of the runs'
    category means. The mean row's paper value is the mean of the paper's values for the same categories (for
    all 15 it equals the published mean); it is empty if any category is not in the paper. A NaN or missing
    metric stays empty in its row and makes the mean empty too.
    """
    if not runs or not runs[0]:
        raise ValueError("no categories were evaluated, so there is no results table")
    categories = list(runs[0])
    metrics = table_metrics(runs[0][categories[0]])

    def value(run: dict, category: str, metric: str) -> float | None:
        return run[category].get(metric)

    def category_mean(run: dict, metric: str) -> float | None:
        values = [value(run, c, metric) for c in categories]
        return None if any(v is None or math.isnan(v) for v in values) else float(np.mean(values))

    rows = []
    for category in categories + [MEAN_ROW]:
        ours, spread = {}, {} if len(runs) > 1 else None
        for metric in metrics:
            if category == MEAN_ROW:
                per_run = [category_mean(run, metric) for run in runs]
            else:
                per_run = [value(run, category, metric) for run in runs]
            if spread is None:
                ours[metric] = None if per_run[0] is None else _percent(per_run[0])
            else:
                ours[metric], spread[metric] = (_percent(v) for v in mean_and_std(per_run))
        rows.append(_row(category, ours, categories if category == MEAN_ROW else [category], spread))
    return rows


def _columns(rows: list[dict]) -> list[str]:
    """Column keys of results rows, in table order (a `_std` column only in rows that have one)."""
    columns = ["category"]
    for metric in table_metrics(rows[0]):
        columns.append(metric)
        if f"{metric}_std" in rows[0]:
            columns.append(f"{metric}_std")
        if metric in PAPER_METRICS:
            columns += [f"{metric}_paper", f"{metric}_delta"]
    return columns


def _cell(key: str, value: float | str | None) -> str:
    """A Markdown cell: empty for missing, signed for deltas, one decimal for paper values."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if key.endswith("_delta"):
        return f"{value:+.2f}"
    if key.endswith("_paper"):
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_markdown(rows: list[dict]) -> str:
    """A Markdown table of results rows (percent; 'mean ± std' over runs when there are several; 'paper' and
    'Δ' beside the paper's metrics; `_at_t` columns: at the calibrated threshold)."""
    columns = [c for c in _columns(rows) if not c.endswith("_std")]
    header = [c.replace("_paper", " paper").replace("_delta", " Δ") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            cell = _cell(c, row[c])
            if cell and row.get(f"{c}_std") is not None:
                cell += f" ± {row[f'{c}_std']:.2f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_csv(rows: list[dict]) -> str:
    """CSV text of results rows; missing values are empty fields."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(rows: list[dict], output_dir: str | Path, stem: str,
                  provenance: dict | None = None) -> dict[str, Path]:
    """Write the rows as <stem>.md, <stem>.csv and <stem>.json atomically.

    The JSON is {"rows": the rows (missing values null), "provenance": what produced them (provenance.py) or
    null}.
    """
    output_dir = Path(output_dir)
    texts = {
        "md": format_markdown(rows),
        "csv": _format_csv(rows),
        "json": json.dumps({"rows": rows, "provenance": provenance}, indent=2, allow_nan=False) + "\n",
    }
    paths = {}
    for suffix, text in texts.items():
        paths[suffix] = output_dir / f"{stem}.{suffix}"
        atomic_write_text(paths[suffix], text)
    return paths
