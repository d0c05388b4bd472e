"""Scoring images the released way, and evaluating a model on labelled images (METHOD.md §6).

One scoring path serves every program: `DraemScorer` turns images into anomaly maps and image
scores (test, validation, predict, the ONNX export and the benchmark all call it), and `evaluate`
streams scored batches into the released protocol's metrics. MVTec AD 2's test set also gets its
leaderboard's metrics at each image's own resolution (`full_resolution_metrics`).
"""
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_loader import LabelledImageDataset, make_test_dataset
from model_unet import DraemModel, anomaly_map, model_from_checkpoint
from util.ad2 import full_resolution_map, image_decision, submission_mask
from util.atomic import check_output_files, check_output_folder
from util.checkpoints import checkpoint_paths, require_checkpoint
from util.errors import DraemInputError
from util.images import image_shape, nonzero_mask, stored_shape
from util.metrics import (
    CategoryResult,
    DraemEvaluator,
    FullResolutionEvaluator,
    format_markdown,
    image_scores,
    mean_and_std,
    results_rows,
    write_results,
)
from util.pictures import heatmap_overlay, save_png
from util.report import FILES_DIR, REPORT_NAME, write_report
from util.runtime import autocast, model_input, prepare_model
from util.thresholds import metrics_at_threshold, usable_thresholds


class DraemScorer(nn.Module):
    """The released test protocol as one module: images N×3×H×W → (anomaly map N×1×H×W, image score (N,)).

    The model's forward runs with the fast-path options (`precision`, `channels_last`); the map and the
    scores are computed from it in float32 outside autocast, as the metrics expect.
    """

    def __init__(self, model: DraemModel, precision: str = "fp32", channels_last: bool = False):
        super().__init__()
        self.model, self.precision, self.channels_last = model, precision, channels_last

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(images.device, self.precision):
            _, logits = self.model(model_input(self.model, images, self.channels_last))
        amap = anomaly_map(logits)
        return amap, image_scores(amap)


def tensor_batches(images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                   batch_size: int) -> Iterator[dict]:
    """Samples held in memory (N×3×H×W, N×1×H×W, (N,)) as the scoring loop's batches, in order."""
    for start in range(0, len(images), batch_size):
        end = start + batch_size
        yield {"image": images[start:end], "mask": masks[start:end], "has_anomaly": labels[start:end]}


@torch.no_grad()
def score(
    scorer: nn.Module, batches: Iterable[dict], num_images: int, image_shape: tuple[int, int],
    device: torch.device, overlay_dir: Path | None = None, desc: str = "test",
) -> tuple[DraemEvaluator, list[str]]:
    """The one scoring loop (test, validation, calibration): `batches` of {"image", "mask", "has_anomaly"}
    (and "path" for overlays) scored by `scorer` into a DraemEvaluator; returns it and the paths in order.

    With `overlay_dir`, each image's heat-map overlay is saved as `<overlay_dir>/<defect>_<stem>.png`.
    Leaves the model in eval mode.
    """
    evaluator = DraemEvaluator(num_images, *image_shape)
    scorer.eval().to(device)
    paths: list[str] = []
    for batch in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True):
        amap, scores = scorer(batch["image"].to(device))
        evaluator.update(amap, batch["mask"], batch["has_anomaly"], scores)
        paths += list(batch.get("path", []))
        if overlay_dir is not None:
            for i, score in enumerate(scores.tolist()):
                path = Path(batch["path"][i])
                overlay = heatmap_overlay(batch["image"][i], amap[i].cpu(), batch["mask"][i], score=score)
                save_png(overlay_dir / f"{path.parent.name}_{path.stem}.png", overlay)
    return evaluator, paths


def evaluate(
    scorer: DraemScorer, batches: Iterable[dict], num_images: int, image_shape: tuple[int, int],
    device: torch.device, overlay_dir: Path | None = None, desc: str = "test",
) -> CategoryResult:
    """The protocol's metrics over scored `batches` (see `score`), and what they were computed from."""
    evaluator, paths = score(scorer, batches, num_images, image_shape, device, overlay_dir, desc)
    n = evaluator.count
    return CategoryResult(evaluator.compute(), evaluator.scores[:n], evaluator.labels[:n], evaluator.maps[:n],
                          evaluator.masks[:n], paths)


def evaluate_category(
    scorer: DraemScorer, data_path: str | os.PathLike, category: str, image_size: int | tuple[int, int],
    device: torch.device, batch_size: int = 1, layout: str = "mvtec", mask_suffix: str = "_mask",
    overlay_dir: Path | None = None, thresholds: dict | None = None,
    dataset: LabelledImageDataset | None = None,
) -> CategoryResult:
    """The released protocol on one category's test set (see `evaluate`); image_size: a side or (height,
    width).

    mvtec_ad2: plus AU-PRO@0.05, SegF1 and ClassF1 at full resolution (SegF1 and ClassF1 at `thresholds`, a
    threshold file's contents; NaN without). `dataset`: that test set, already made.
    """
    shape = image_shape(image_size)
    if dataset is None:
        dataset = make_test_dataset(layout, data_path, category, shape, mask_suffix)
    result = evaluate(scorer, DataLoader(dataset, batch_size=batch_size), len(dataset), shape, device,
                      overlay_dir, desc=f"test {category}")
    if layout == "mvtec_ad2":
        result.metrics.update(full_resolution_metrics(result, dataset, thresholds))
    return result


def full_resolution_metrics(
    result: CategoryResult, dataset: LabelledImageDataset, thresholds: dict | None
) -> dict[str, float]:
    """MVTec AD 2's leaderboard metrics of an evaluated test set (FullResolutionEvaluator): each working-size
    map at its image's own size, as the submission writer makes it (util.ad2), against the mask at that size
    (every non-zero pixel anomalous); the masks and image decisions of `thresholds` when given."""
    evaluator = FullResolutionEvaluator()
    for path, amap, image_score, label in zip(result.paths, result.maps, result.scores.tolist(),
                                              result.labels.tolist()):
        mask_path, shape = dataset.mask_path(Path(path)), stored_shape(path)
        truth = np.zeros(shape, dtype=bool) if mask_path is None else nonzero_mask(mask_path)
        if truth.shape != shape:
            raise DraemInputError(f"ground-truth mask {mask_path} is {truth.shape[0]}x{truth.shape[1]}, its "
                                  f"image {path} {shape[0]}x{shape[1]}: full-resolution metrics need masks "
                                  f"at the image's size")
        full = full_resolution_map(amap, shape)
        if thresholds is None:
            evaluator.update(full, truth, label)
            continue
        predicted = submission_mask(full, image_score, thresholds["image_threshold"],
                                    thresholds["pixel_threshold"])
        evaluator.update(full, truth, label, predicted, image_decision(predicted))
    return evaluator.compute()


def evaluate_checkpoints(
    *, checkpoint_path: str | os.PathLike, base_model_names: Sequence[str], data_path: str | os.PathLike,
    categories: Sequence[str], image_size: int | tuple[int, int], device: torch.device,
    output_dir: str | os.PathLike, batch_size: int = 1,
    layout: str = "mvtec", mask_suffix: str = "_mask", precision: str = "fp32", channels_last: bool = False,
    compile: bool = False, save_images: bool = False, provenance: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate each category's checkpoint pair of each run, write the results tables and the report, print
    the table.

    Several base names are runs of one configuration (e.g. seeds): the tables give mean ± std over them. With
    a threshold file beside a pair (util/thresholds.py), precision, recall and F1 at that threshold are
    reported too. `provenance` (util/provenance.py) goes into the results JSON and the report. Every
    checkpoint pair, threshold file, test image and mask, and the output folder, is checked before the first
    image is scored.
    With `save_images`, every run's overlays are saved (see `overlay_folder`).
    Returns per category the metrics (fractions), averaged over the runs, with `<metric>_std` when there are
    several.
    """
    stem = (f"results_{base_model_names[0]}"
            + (f"_{len(base_model_names)}runs" if len(base_model_names) > 1 else ""))
    check_output_folder(output_dir, "--output_dir")
    check_output_files([Path(output_dir) / f"{stem}.{suffix}" for suffix in ("md", "csv", "json")]
                       + [Path(output_dir) / REPORT_NAME], "a results file")
    if (Path(output_dir) / FILES_DIR).is_file():
        raise DraemInputError(f"{Path(output_dir) / FILES_DIR} is a file, but the report puts its pictures "
                              f"in a folder of that name: move the file away")
    datasets = {category: make_test_dataset(layout, data_path, category, image_shape(image_size), mask_suffix)
                for category in categories}
    thresholds = {}
    for base_name in base_model_names:
        for category in categories:
            for path in checkpoint_paths(checkpoint_path, base_name, category):
                require_checkpoint(path)
            thresholds[base_name, category] = usable_thresholds(checkpoint_path, base_name, category,
                                                                image_size)
    runs: dict[str, dict[str, CategoryResult]] = {}
    for base_name in base_model_names:
        runs[base_name] = {}
        for category in categories:
            model = prepare_model(model_from_checkpoint(checkpoint_path, base_name, category).to(device),
                                  channels_last, compile)
            overlay_dir = (overlay_folder(output_dir, base_name, category, len(base_model_names))
                           if save_images else None)
            stored = thresholds[base_name, category]
            result = evaluate_category(DraemScorer(model, precision, channels_last), data_path, category,
                                       image_size, device, batch_size, layout, mask_suffix, overlay_dir,
                                       stored, datasets[category])
            threshold = None if stored is None else stored["image_threshold"]
            result.metrics.update(metrics_at_threshold(result.labels, result.scores, threshold))
            runs[base_name][category] = result
    per_run = [{category: result.metrics for category, result in results.items()}
               for results in runs.values()]
    rows = results_rows(per_run)
    written = write_results(rows, output_dir, stem, provenance)
    print(format_markdown(rows))
    print(f"results written to {', '.join(str(p) for p in written.values())}")
    # Curves and pictures need one run's maps: the first; the page says so when the table is over several
    # runs.
    title = f"DRAEM results: {', '.join(base_model_names)}"
    report = write_report(output_dir, stem, rows, runs[base_model_names[0]], image_size, title, provenance)
    print(f"report: {report}")  # last line, so a caller or a log reader finds the page
    merged = {}
    for category in categories:
        merged[category] = {}
        for name in per_run[0][category]:
            mean, std = mean_and_std([run[category][name] for run in per_run])
            merged[category].update({name: mean, f"{name}_std": std} if len(per_run) > 1 else {name: mean})
    return merged


def overlay_folder(output_dir: str | os.PathLike, base_name: str, category: str, num_runs: int) -> Path:
    """Where --save_images puts a category's overlays: `overlays/<category>`, or `overlays/<base>/<category>`
    when several runs are evaluated (their images have the same names)."""
    overlays = Path(output_dir) / "overlays"
    return overlays / category if num_runs == 1 else overlays / base_name / category
