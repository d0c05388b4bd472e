"""Scoring images the released way, and evaluating a model on labelled images (METHOD.md §6).

One scoring path serves every program: `DraemScorer` turns images into anomaly maps and image
scores (test, validation, predict, the ONNX export and the benchmark all call it), and `evaluate`
streams scored batches into the released protocol's metrics.
"""
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoints import model_from_checkpoint
from data_loader import make_test_dataset
from metrics import DraemEvaluator, format_markdown, image_scores, results_rows, write_results
from model_unet import DraemModel, anomaly_map
from runtime import autocast, prepare_model, to_memory_format
from visualize import heatmap_overlay, save_png


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
) -> dict[str, float]:
    """The protocol's metrics over `batches` of {"image", "mask", "has_anomaly"} (and "path" for overlays).

    With `overlay_dir`, each image's heat-map overlay is saved as `<overlay_dir>/<defect>_<stem>.png`.
    Leaves the model in eval mode.
    """
    evaluator = DraemEvaluator(num_images, *image_shape)
    scorer.eval().to(device)
    for batch in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True):
        amap, scores = scorer(batch["image"].to(device))
        evaluator.update(amap, batch["mask"], batch["has_anomaly"], scores)
        if overlay_dir is not None:
            for i, score in enumerate(scores.tolist()):
                path = Path(batch["path"][i])
                overlay = heatmap_overlay(batch["image"][i], amap[i].cpu(), batch["mask"][i], score=score)
                save_png(overlay_dir / f"{path.parent.name}_{path.stem}.png", overlay)
    return evaluator.compute()


def evaluate_category(
    scorer: DraemScorer, data_path: str | os.PathLike, category: str, image_size: int, device: torch.device,
    batch_size: int = 1, layout: str = "mvtec", mask_suffix: str = "_mask", overlay_dir: Path | None = None,
) -> dict[str, float]:
    """The released protocol on one category's test set (see `evaluate`)."""
    dataset = make_test_dataset(layout, data_path, category, (image_size, image_size), mask_suffix)
    return evaluate(scorer, DataLoader(dataset, batch_size=batch_size), len(dataset), (image_size, image_size), device,
                    overlay_dir, desc=f"test {category}")


def evaluate_checkpoints(
    *, checkpoint_path: str | os.PathLike, base_model_name: str, data_path: str | os.PathLike, categories: Sequence[str],
    image_size: int, device: torch.device, output_dir: str | os.PathLike, batch_size: int = 1, layout: str = "mvtec",
    mask_suffix: str = "_mask", precision: str = "fp32", channels_last: bool = False, compile: bool = False,
    save_images: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate each category's checkpoint pair, write the results tables to `output_dir` and print the Markdown one."""
    per_category = {}
    for category in categories:
        model = prepare_model(model_from_checkpoint(checkpoint_path, base_model_name, category).to(device), channels_last,
                              compile)
        overlay_dir = Path(output_dir) / "overlays" / category if save_images else None
        per_category[category] = evaluate_category(DraemScorer(model, precision, channels_last), data_path, category, image_size,
                                                   device, batch_size, layout, mask_suffix, overlay_dir)
    rows = results_rows(per_category)
    written = write_results(rows, output_dir, f"results_{base_model_name}")
    print(format_markdown(rows))
    print(f"results written to {', '.join(str(p) for p in written.values())}")
    return per_category
