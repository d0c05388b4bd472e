"""Validation during training: held-out synthetic anomalies, and optionally the category's real test set.

The validation set is made once per run, before training:
1. a seeded fraction of the category's training images (at least one) is held out, and the training
   dataset samples only from the rest from then on;
2. `num_samples` samples are synthesised from the held-out images by the training synthesis itself
   (data_loader.make_training_sample, spec §2). They follow the training mix, about half anomalous and
   half normal, so the image metrics are defined as well as the pixel ones.
Both steps draw from NumPy generators seeded by --seed alone (not by the training streams), so the set
is identical in every run and on every rank with the same seed. The anomaly sources (DTD) are shared
with training: what is held out is the object images the model must learn to reconstruct.
"""
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data_loader import MVTecDRAEMTrainDataset, make_training_sample
from errors import DraemInputError
from metrics import DraemEvaluator
from model_unet import DraemModel, anomaly_map
from test_draem import evaluate_category

# Tags that give the split and the synthesis streams of their own, apart from each other and from training.
SPLIT_STREAM = 1
SYNTHESIS_STREAM = 2
BEST_SUFFIX = "_best"


class ValidationSet(NamedTuple):
    images: torch.Tensor  # N×3×H×W synthetic inputs (the augmented images), float32 in [0, 1]
    masks: torch.Tensor  # N×1×H×W binary anomaly masks
    labels: torch.Tensor  # (N,) 1 for a sample with an anomaly, else 0


def hold_out(dataset: MVTecDRAEMTrainDataset, fraction: float, seed: int) -> tuple[list[Path], np.ndarray]:
    """Take a seeded `fraction` of the dataset's images out of it; return their paths and uint8 N×H×W×3 images.

    At least one image is held out and at least one kept. The dataset reads a whole folder, so the split is
    applied to the constructed dataset's `image_paths` and `images` (what it samples from and counts).
    """
    n = len(dataset.image_paths)
    if n < 2:
        raise DraemInputError(
            f"validation holds out training images, but there {'is' if n == 1 else 'are'} only {n}: add images or leave out --val_every"
        )
    count = min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng([SPLIT_STREAM, seed]).permutation(n)
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    held_paths, held_images = [dataset.image_paths[i] for i in held], dataset.images[held]
    dataset.image_paths = [dataset.image_paths[i] for i in kept]
    dataset.images = dataset.images[kept]
    return held_paths, held_images


def synthesize(
    images: np.ndarray, draw_source: Callable[[np.random.Generator], np.ndarray], num_samples: int, seed: int
) -> ValidationSet:
    """`num_samples` training-style samples from `images` (uint8 N×H×W×3), all drawn from one generator seeded by `seed`."""
    rng = np.random.default_rng([SYNTHESIS_STREAM, seed])
    samples = [make_training_sample(rng, len(images), images.__getitem__, draw_source) for _ in range(num_samples)]
    return ValidationSet(
        images=torch.from_numpy(np.stack([s["augmented_image"] for s in samples])),
        masks=torch.from_numpy(np.stack([s["anomaly_mask"] for s in samples])),
        labels=torch.from_numpy(np.concatenate([s["has_anomaly"] for s in samples])),
    )


def due(epoch: int, every: int, epochs: int) -> bool:
    """Whether to validate after (1-based) `epoch`: every `every` epochs and after the last; never when `every` is 0."""
    return every > 0 and (epoch % every == 0 or epoch == epochs)


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{name}": value for name, value in metrics.items()}


@torch.no_grad()
def evaluate(model: DraemModel, val_set: ValidationSet, device: torch.device, batch_size: int) -> dict[str, float]:
    """The test protocol's metrics (metrics.DraemEvaluator) on the validation set, keys `val_*`; leaves `model` in eval mode."""
    n, _, height, width = val_set.images.shape
    evaluator = DraemEvaluator(n, height, width)
    model.eval()
    for start in range(0, n, batch_size):
        batch = slice(start, start + batch_size)
        _, logits = model(val_set.images[batch].to(device))
        evaluator.update(anomaly_map(logits), val_set.masks[batch], val_set.labels[batch])
    return prefixed(evaluator.compute(), "val_")


def evaluate_test_set(
    model: DraemModel, data_path: str | Path, category: str, image_size: int, device: torch.device, batch_size: int,
    layout: str = "mvtec", mask_suffix: str = "_mask",
) -> dict[str, float]:
    """The released test protocol on the category's test set, keys `test_*`; {} when the layout has no test folder for it.

    VisA always has a test split (its CSV lists it); mvtec and folder need `<data_path>/<category>/test`.
    """
    if layout != "visa" and not (Path(data_path) / category / "test").is_dir():
        return {}
    metrics = evaluate_category(model, data_path, category, image_size, device, batch_size, layout=layout, mask_suffix=mask_suffix)
    return prefixed(metrics, "test_")


def improves(value: float, best: float | None) -> bool:
    """Whether a validation pixel AP beats the best so far (NaN never does)."""
    return not math.isnan(value) and (best is None or value > best)


def best_base_name(base_name: str) -> str:
    """Base name of the best-validation checkpoint pair: `<base>_best_<category>_.pckl` and `<base>_best_<category>__seg.pckl`."""
    return f"{base_name}{BEST_SUFFIX}"
