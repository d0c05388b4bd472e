"""The results report: one static HTML page that a researcher or an inspector opens from disk (test_draem.py
writes it).

`<output_dir>/report.html` holds the results table (the numbers of results_<...>.json, METHOD.md §6, §7), and
per category the ROC and precision-recall curves at image and pixel level and a gallery of heat-map overlays:
the highest-scoring normal images, the lowest-scoring anomalous ones and the highest-scoring anomalous ones.
Its pictures lie beside it in `<output_dir>/report_files/` and are referenced by relative paths; the page has
no script and no external resource. Curves are drawn with matplotlib's object interface (a `Figure` on the Agg
canvas), never pyplot, so nothing depends on a display or on global figure state. Every file is written
atomically.
"""
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from util.atomic import atomic_write_bytes, atomic_write_text
from util.images import image_shape, read_image, to_chw
from util.metrics import (
    AD2_METRICS,
    MEAN_ROW,
    PAPER_METRICS,
    PAPER_RESULTS,
    TABLE_METRICS,
    THRESHOLD_METRICS,
    CategoryResult,
)
from util.pictures import heatmap_overlay, png_bytes, save_png

REPORT_NAME = "report.html"
FILES_DIR = "report_files"
MAX_CURVE_POINTS = 2000  # pixel curves have a point per distinct score (millions); 2000 draw the same picture
GALLERY_SIZE = 4  # pictures per gallery row
MISSING = "—"  # a metric that is undefined (one class only) or not measured (no threshold file)
LABELS = {
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "aupro": "AUPRO (FPR ≤ 0.3)",
    "image_f1_max": "image F1-max (on the test set)",
    "image_precision_at_t": "precision",
    "image_recall_at_t": "recall",
    "image_f1_at_t": "F1",
    "aupro_005": "AU-PRO@0.05",
    "seg_f1": "SegF1",
    "class_f1": "ClassF1",
}
THRESHOLD_GROUP = "image, at the calibrated threshold"
AD2_GROUP = "MVTec AD 2 leaderboard, at full resolution"
GALLERIES = (
    ("false_alarm", "Highest-scoring normal images (likeliest false alarms)"),
    ("miss", "Lowest-scoring anomalous images (likeliest misses)"),
    ("detection", "Highest-scoring anomalous images (correct detections)"),
)
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; }
th { background: #eee; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td.text { text-align: left; font-family: monospace; word-break: break-all; }
td.paper, td.delta { color: #555; background: #f7f7f7; }
tr.mean th, tr.mean td { font-weight: bold; border-top: 2px solid #555; }
p.note { font-size: 0.9em; color: #444; max-width: 60em; }
img.curves { max-width: 100%; }
div.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 0.75em; }
figure { margin: 0; }
figure img { width: 100%; image-rendering: pixelated; }
figcaption { font-size: 0.85em; font-family: monospace; word-break: break-all; }
"""  # noqa: E501


# --- curves -----------------------------------------------------------------------------------

def thin_curve(x: np.ndarray, y: np.ndarray,
               max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points of the polyline (x, y), both ends kept, spaced evenly along its length.

    Spacing by arc length rather than by index keeps the steep part of a pixel curve, where few of the
    millions of thresholds lie, as finely drawn as the flat part.
    """
    if len(x) <= max_points:
        return x, y
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    keep = np.searchsorted(length, np.linspace(0.0, length[-1], max_points - 1))
    keep = np.unique(np.concatenate([keep.clip(0, len(x) - 1), [0, len(x) - 1]]))
    return x[keep], y[keep]


def _percent_text(value: float | None) -> str:
    return "undefined" if value is None or np.isnan(value) else f"{100 * value:.2f} %"


def _draw_curves(ax_roc, ax_pr, labels: np.ndarray, scores: np.ndarray, level: str,
                 metrics: Mapping[str, float]) -> None:
    """ROC and precision-recall curves of one level (image or pixel) on two axes."""
    for ax in (ax_roc, ax_pr):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax_roc.set(title=f"{level} ROC, AUROC {_percent_text(metrics.get(f'{level}_auroc'))}",
               xlabel="false-positive rate", ylabel="true-positive rate")
    ax_pr.set(title=f"{level} PR, AP {_percent_text(metrics.get(f'{level}_ap'))}", xlabel="recall",
              ylabel="precision")
    if labels.min() == labels.max():  # the metrics are NaN then (METHOD.md §6); there is no curve to draw
        for ax in (ax_roc, ax_pr):
            ax.text(0.5, 0.5, "only one class present", ha="center", va="center")
        return
    fpr, tpr, _ = roc_curve(labels, scores)
    ax_roc.plot(*thin_curve(fpr, tpr))
    ax_roc.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)  # chance
    precision, recall, _ = precision_recall_curve(labels, scores)
    ax_pr.plot(*thin_curve(recall, precision))
    # chance: the anomalous fraction
    ax_pr.axhline(labels.mean(), linestyle="--", color="grey", linewidth=0.8)


def curves_png(result: CategoryResult) -> bytes:
    """One PNG with four panels: image ROC, image PR, pixel ROC, pixel PR (pixels: masks after the released
    cast)."""
    figure = Figure(figsize=(14.0, 3.4), dpi=90, layout="constrained")
    axes = figure.subplots(1, 4)
    _draw_curves(axes[0], axes[1], result.labels, result.scores, "image", result.metrics)
    _draw_curves(axes[2], axes[3], result.masks.ravel(), result.maps.ravel(), "pixel", result.metrics)
    return png_bytes(figure)


# --- gallery ----------------------------------------------------------------------------------

def gallery_indices(labels: np.ndarray, scores: np.ndarray, size: int = GALLERY_SIZE) -> dict[str, list[int]]:
    """Test-image indices per gallery, ranked by image score (ties in evaluation order).

    false_alarm: the highest-scoring normal images; miss: the lowest-scoring anomalous ones, lowest first;
    detection: the highest-scoring anomalous ones, highest first. With fewer than 2·size anomalous images the
    two anomalous galleries split them (the lower half, rounded up, are misses), so no image is shown twice.
    """
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    normal = normal[np.argsort(-scores[normal], kind="stable")]
    anomalous = anomalous[np.argsort(scores[anomalous], kind="stable")]
    num_misses = min(size, (len(anomalous) + 1) // 2)
    num_detections = min(size, len(anomalous) - num_misses)
    return {
        "false_alarm": normal[:size].tolist(),
        "miss": anomalous[:num_misses].tolist(),
        "detection": anomalous[len(anomalous) - num_detections:][::-1].tolist(),
    }


def _caption(path: str) -> str:
    """`<defect>/<file>`: the defect folder says what the image is."""
    return f"{Path(path).parent.name}/{Path(path).name}"


# --- page -------------------------------------------------------------------------------------

def _src(relative: Path) -> str:
    """A relative URL for a file below the report's folder (escaped: category and file names are
    arbitrary)."""
    return html.escape(quote(relative.as_posix()))


def _anchor(category: str) -> str:
    return "cat-" + "_".join(category.split())


def _number(value: float | None, std: float | None = None) -> str:
    if value is None:
        return MISSING
    return f"{value:.2f}" if std is None else f"{value:.2f} ± {std:.2f}"


def _table(rows: Sequence[dict]) -> str:
    """The results table: ours (± std over runs), and paper / Δ beside the paper's metrics when any row has
    them."""
    with_paper = {m for m in PAPER_METRICS if any(row.get(f"{m}_paper") is not None for row in rows)}
    plain = [m for m in TABLE_METRICS if m not in THRESHOLD_METRICS]
    top = ['<th rowspan="2" scope="col">category</th>']
    sub = []
    for metric in plain:
        if metric in with_paper:
            top.append(f'<th colspan="3" scope="colgroup">{html.escape(LABELS.get(metric, metric))}</th>')
            sub += ['<th scope="col">ours</th>', '<th scope="col">paper</th>', '<th scope="col">Δ</th>']
        else:
            top.append(f'<th rowspan="2" scope="col">{html.escape(LABELS.get(metric, metric))}</th>')
    groups = [(THRESHOLD_GROUP, THRESHOLD_METRICS)]
    if all(m in rows[0] for m in AD2_METRICS):
        groups.append((AD2_GROUP, AD2_METRICS))
    for group, metrics in groups:
        top.append(f'<th colspan="{len(metrics)}" scope="colgroup">{html.escape(group)}</th>')
        sub += [f'<th scope="col">{html.escape(LABELS.get(m, m))}</th>' for m in metrics]
    body = []
    for row in rows:
        category = row["category"]
        cells = [
            f'<th '
            f'scope="row">{html.escape("mean of the categories" if category == MEAN_ROW else category)}</th>']
        for metric in (*plain, *(m for _, metrics in groups for m in metrics)):
            text = _number(row.get(metric), row.get(f"{metric}_std"))
            cells.append(f'<td class="ours" data-key="{metric}">{text}</td>')
            if metric in with_paper:
                paper, delta = row.get(f"{metric}_paper"), row.get(f"{metric}_delta")
                # A category the paper does not report gets blank cells, not a paper value or a difference.
                cells.append("<td></td>" if paper is None
                             else f'<td class="paper" data-key="{metric}_paper">{paper:.1f}</td>')
                cells.append("<td></td>" if delta is None
                             else f'<td class="delta" data-key="{metric}_delta">{delta:+.2f}</td>')
        row_class = ' class="mean"' if category == MEAN_ROW else ""
        body.append(f'<tr{row_class} data-category="{html.escape(category)}">{"".join(cells)}</tr>')
    return (f'<table class="results">\n<thead>\n<tr>{"".join(top)}</tr>\n<tr>{"".join(sub)}</tr>\n</thead>\n'
            f'<tbody>\n{chr(10).join(body)}\n</tbody>\n</table>')


def _table_notes(rows: Sequence[dict], stem: str) -> list[str]:
    """Sentences under the table: units, protocol, F1-max versus the calibrated threshold, paper values,
    runs."""
    several_runs = any(key.endswith("_std") for key in rows[0])
    with_paper = any(row.get(f"{m}_paper") is not None for row in rows for m in PAPER_METRICS)
    links = ", ".join(f'<a href="{_src(Path(f"{stem}.{s}"))}">{html.escape(f"{stem}.{s}")}</a>'
                      for s in ("json", "csv", "md"))
    notes = [
        (f"Percent, two decimals; the same numbers as {links}. {MISSING} marks a metric that is undefined "
         f"(only one class present) or not measured."),
        ("Released protocol (METHOD.md §6): the image score is the maximum of the 21×21 average-pooled "
         "anomaly map; pixel AUROC and AP pool all pixels of all test images, whose ground truth is the "
         "resized mask cast to uint8 (only pixels exactly 1 are anomalous); AUPRO is the area under the "
         "per-region-overlap curve up to a false-positive rate of 0.3, divided by 0.3."),
        ("Image F1-max is the best F1 over all thresholds, chosen on the test set itself, so it is an upper "
         "bound on what a deployed threshold achieves. The precision, recall and F1 at the calibrated "
         "threshold use the threshold stored beside the checkpoints (util/thresholds.py), chosen without the "
         f"test set; they show {MISSING} where a checkpoint has no threshold file."),
    ]
    if with_paper:
        notes.append(f"paper: {html.escape(PAPER_RESULTS['source'])}; Δ = ours − paper. Only the categories "
                     f"the paper reports have these cells; the mean row's paper value is the mean over the "
                     f"same categories.")
    else:
        notes.append("No category here is in the paper (MVTec AD), so there are no paper columns.")
    if all(m in rows[0] for m in AD2_METRICS):
        notes.append("MVTec AD 2 leaderboard metrics, computed as the submission is made (README, METHOD.md "
                     "§6): each map resized bilinearly to its image's own size and rounded to float16; "
                     "AU-PRO integrated up to a false-positive rate of 0.05, divided by 0.05; SegF1 over all "
                     "pixels of all test images at the submitted masks (map ≥ pixel threshold in images "
                     f"whose score ≥ image threshold); ClassF1 over the images, an image anomalous when its "
                     f"mask has any anomalous pixel. {MISSING} without a threshold file.")
    if several_runs:
        notes.append("Several runs: each value is the mean ± sample standard deviation over the runs; the "
                     "curves and pictures below are from the first run only (the first checkpoint base name "
                     "given).")
    return notes


def _gallery_html(
    category: str, result: CategoryResult, image_size: int | tuple[int, int], output_dir: Path, files: Path
) -> list[str]:
    """Write the category's overlays under `files` and return the gallery sections' HTML."""
    if len(result.paths) != len(result.scores):
        return ["<p>No gallery: the test images' paths were not recorded.</p>"]
    parts = []
    chosen = gallery_indices(result.labels, result.scores)
    for kind, heading in GALLERIES:
        figures = []
        for rank, index in enumerate(chosen[kind], start=1):
            score = float(result.scores[index])
            image = to_chw(read_image(result.paths[index], image_shape(image_size)))
            overlay = heatmap_overlay(image, result.maps[index], result.masks[index], score=score)
            picture = files / f"{kind}_{rank}.png"
            save_png(picture, overlay)
            caption = f"{_caption(result.paths[index])} · score {score:.3f}"
            figures.append(f'<figure><img src="{_src(picture.relative_to(output_dir))}" '
                           f'alt="{html.escape(caption)}">'
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        content = (f'<div class="gallery">{"".join(figures)}</div>' if figures
                   else "<p>none in this test set</p>")
        parts.append(f'<section data-gallery="{kind}"><h3>{html.escape(heading)}</h3>{content}</section>')
    return parts


def _category_html(category: str, result: CategoryResult, image_size: int | tuple[int, int],
                   output_dir: Path) -> str:
    """Write the category's pictures and return its section: counts, curves, galleries."""
    if result.maps.shape[1:] != image_shape(image_size):
        raise ValueError(f"{category}: anomaly maps are {result.maps.shape[1:]}, not the image size "
                         f"{image_size}")
    files = output_dir / FILES_DIR / category
    curves = files / "curves.png"
    atomic_write_bytes(curves, curves_png(result))
    num_anomalous = int(result.labels.sum())
    parts = [
        f'<section class="category" id="{html.escape(_anchor(category))}"><h2>{html.escape(category)}</h2>',
        f"<p>{len(result.labels)} test images: {len(result.labels) - num_anomalous} normal, {num_anomalous} "
        f"anomalous.</p>",
        (f'<img class="curves" src="{_src(curves.relative_to(output_dir))}" alt="{html.escape(category)}: '
         f'ROC and precision-recall curves, image and pixel level">'),
        ('<p class="note">Dashed: chance (the diagonal; the anomalous fraction). Pixel curves are drawn '
         'through at '
         f"most {MAX_CURVE_POINTS} of their points. Overlays: image | ground truth outlined in red (after "
         f"the released uint8 cast) | anomaly map over the image (JET colours, 0 blue to 1 red, not "
         f"stretched), with the image score in its corner. Galleries are ranked by image score; without a "
         f"threshold, false alarm and miss mean the worst-ranked images, not errors at a particular "
         f"threshold.</p>"),
        *_gallery_html(category, result, image_size, output_dir, files),
        "</section>",
    ]
    return "\n".join(parts)


def _provenance_html(provenance: Mapping | None) -> str:
    """What produced the numbers (provenance.py): program, commit, package versions, device, threads,
    flags."""
    if not provenance:
        return "<p>Not recorded.</p>"
    versions = ", ".join(f"{name} {version}" for name, version in provenance.get("versions", {}).items())
    flags = " ".join(f"--{name} {value}" for name, value in provenance.get("flags", {}).items())
    items = [("program", provenance.get("program")), ("commit", provenance.get("commit")),
             ("versions", versions), ("device", provenance.get("device")),
             ("threads", provenance.get("threads")), ("platform", provenance.get("platform")),
             ("flags", flags)]
    cells = "".join(f'<tr><th scope="row">{name}</th><td class="text" '
                    f'data-key="{name}">{html.escape(str(value))}</td></tr>'
                    for name, value in items)
    note = ("A seeded run repeats these numbers bit for bit only with the same commit, versions, device and "
            "thread count (README, Reproducibility).")
    return f'<table class="provenance">{cells}</table>\n<p class="note">{note}</p>'


def write_report(
    output_dir: str | os.PathLike, stem: str, rows: Sequence[dict], results: Mapping[str, CategoryResult],
    image_size: int | tuple[int, int], title: str, provenance: Mapping | None = None,
) -> Path:
    """Write `<output_dir>/report.html` and its pictures in `<output_dir>/report_files/`; return the page's
    path.

    rows: metrics.results_rows (percent; `_std` keys with several runs); results: per category the
    CategoryResult of one run (the first), whose curves and galleries are drawn; stem: the results files'
    stem, linked from the page; image_size: the side (or height and width) the test images were resized to;
    provenance: what produced the numbers (provenance.py), shown under the table. The page is written last,
    after every picture it shows.
    """
    output_dir = Path(output_dir)
    contents = "".join(f'<li><a href="#{html.escape(_anchor(c))}">{html.escape(c)}</a></li>' for c in results)
    sections = [_category_html(category, result, image_size, output_dir)
                for category, result in results.items()]
    notes = "\n".join(f'<p class="note">{note}</p>' for note in _table_notes(rows, stem))
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Results</h2>
{_table(rows)}
{notes}
<h2>Made with</h2>
{_provenance_html(provenance)}
<ul>{contents}</ul>
{chr(10).join(sections)}
</body>
</html>
"""
    path = output_dir / REPORT_NAME
    atomic_write_text(path, page)
    return path
