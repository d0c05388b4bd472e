"""Scoring images the released way, and evaluating a model on labelled images (METHOD.md §6).

One scoring path serves every program: `DraemScorer` turns images into anomaly maps and image
scores (test, validation, predict, the ONNX export and the benchmark all call it), and `evaluate`
streams scored batches into the released protocol's metrics.
"""
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_loader import make_test_dataset
from model_unet import DraemModel, anomaly_map, model_from_checkpoint
from util.metrics import CategoryResult, DraemEvaluator, format_markdown, image_scores, results_rows, write_results
from util.pictures import heatmap_overlay, save_png
from util.report import write_report
from util.runtime import autocast, prepare_model, to_memory_format
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
            _, logits = self.model(to_memory_format(images, self.channels_last))
        amap = anomaly_map(logits)
        return amap, image_scores(amap)


@torch.no_grad()
def evaluate(
    scorer: DraemScorer, batches: Iterable[dict], num_images: int, image_shape: tuple[int, int], device: torch.device,
    overlay_dir: Path | None = None, desc: str = "test",
) -> CategoryResult:
    """The protocol's metrics over `batches` of {"image", "mask", "has_anomaly"} (and "path" for overlays and the result).

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
    n = evaluator.count
    return CategoryResult(evaluator.compute(), evaluator.scores[:n], evaluator.labels[:n], evaluator.maps[:n],
                          evaluator.masks[:n], paths)


def evaluate_category(
    scorer: DraemScorer, data_path: str | os.PathLike, category: str, image_size: int, device: torch.device,
    batch_size: int = 1, layout: str = "mvtec", mask_suffix: str = "_mask", overlay_dir: Path | None = None,
) -> CategoryResult:
    """The released protocol on one category's test set (see `evaluate`)."""
    dataset = make_test_dataset(layout, data_path, category, (image_size, image_size), mask_suffix)
    return evaluate(scorer, DataLoader(dataset, batch_size=batch_size), len(dataset), (image_size, image_size), device,
                    overlay_dir, desc=f"test {category}")


def evaluate_checkpoints(
    *, checkpoint_path: str | os.PathLike, base_model_names: Sequence[str], data_path: str | os.PathLike,
    categories: Sequence[str], image_size: int, device: torch.device, output_dir: str | os.PathLike, batch_size: int = 1,
    layout: str = "mvtec", mask_suffix: str = "_mask", precision: str = "fp32", channels_last: bool = False,
    compile: bool = False, save_images: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate each category's checkpoint pair of each run, write the results tables and the report, print the table.

    Several base names are runs of one configuration (e.g. seeds): the tables give mean ± std over them. With a
    threshold file beside a pair (calibration.py), precision, recall and F1 at that threshold are reported too.
    With `save_images`, every run's overlays are saved (see `overlay_folder`).
    Returns per category the metrics (fractions), averaged over the runs, with `<metric>_std` when there are several.
    """
    runs: dict[str, dict[str, CategoryResult]] = {}
    for base_name in base_model_names:
        runs[base_name] = {}
        for category in categories:
            model = prepare_model(model_from_checkpoint(checkpoint_path, base_name, category).to(device), channels_last, compile)
            overlay_dir = overlay_folder(output_dir, base_name, category, len(base_model_names)) if save_images else None
            result = evaluate_category(DraemScorer(model, precision, channels_last), data_path, category, image_size, device,
                                       batch_size, layout, mask_suffix, overlay_dir)
            thresholds = usable_thresholds(checkpoint_path, base_name, category, image_size)
            threshold = None if thresholds is None else thresholds["image_threshold"]
            result.metrics.update(metrics_at_threshold(result.labels, result.scores, threshold))
            runs[base_name][category] = result
    per_run = [{category: result.metrics for category, result in results.items()} for results in runs.values()]
    rows = results_rows(per_run)
    stem = f"results_{base_model_names[0]}" + (f"_{len(runs)}runs" if len(runs) > 1 else "")
    written = write_results(rows, output_dir, stem)
    print(format_markdown(rows))
    print(f"results written to {', '.join(str(p) for p in written.values())}")
    # Curves and pictures need one run's maps: the first; the page says so when the table is over several runs.
    title = f"DRAEM results: {', '.join(base_model_names)}"
    report = write_report(output_dir, stem, rows, runs[base_model_names[0]], image_size, title)
    print(f"report: {report}")  # last line, so a caller or a log reader finds the page
    return {category: _mean_over_runs([run[category] for run in per_run]) for category in categories}


def overlay_folder(output_dir: str | os.PathLike, base_name: str, category: str, num_runs: int) -> Path:
    """Where --save_images puts a category's overlays: `overlays/<category>`, or `overlays/<base>/<category>` when
    several runs are evaluated (their images have the same names)."""
    overlays = Path(output_dir) / "overlays"
    return overlays / category if num_runs == 1 else overlays / base_name / category


def _mean_over_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the runs (fractions), and its sample standard deviation `<metric>_std` with several runs."""
    merged = {name: float(np.mean([run[name] for run in runs])) for name in runs[0]}
    if len(runs) > 1:
        merged.update({f"{name}_std": float(np.std([run[name] for run in runs], ddof=1)) for name in runs[0]})
    return merged
