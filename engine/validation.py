"""Validation during training: held-out synthetic anomalies, and optionally the category's real test set.

The validation set is made once per run, before training:
1. a seeded fraction of the category's training image paths (at least one) is held out before the
   training dataset is built, so it never sees them (`split_paths`);
2. `num_samples` samples are synthesised from the held-out images by the training synthesis itself
   (synthesis.make_training_sample, METHOD.md §2). They follow the training mix, about half anomalous and
   half normal, so the image metrics are defined as well as the pixel ones.
Both steps draw from NumPy generators seeded by --seed alone (not by the training streams), so the set
is identical in every run and on every rank with the same seed. The anomaly sources (DTD) are shared
with training: what is held out is the object images the model must learn to reconstruct.
"""
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data_loader import make_training_sample
from engine.evaluation import DraemScorer, evaluate, evaluate_category, tensor_batches
from util.errors import DraemInputError
from util.layouts import has_test_set

# Tags that give the split and the synthesis streams of their own, apart from each other and from training.
SPLIT_STREAM = 1
SYNTHESIS_STREAM = 2


class SampleSet(NamedTuple):
    """Synthetic training-mix samples held in memory: the validation set, and the calibration set of the
    thresholds."""

    images: torch.Tensor  # N×3×H×W synthetic inputs (the augmented images), float32 in [0, 1]
    masks: torch.Tensor  # N×1×H×W binary anomaly masks
    labels: torch.Tensor  # (N,) 1 for a sample with an anomaly, else 0


def split_paths(paths: Sequence[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(kept, held out): a seeded `fraction` of the training image paths held out, at least one, and at least
    one kept.

    Both lists keep the order of `paths`.
    """
    n = len(paths)
    if n < 2:
        raise DraemInputError(
            f"validation holds out training images, but there {'is' if n == 1 else 'are'} only {n}: "
            "add images or leave out --val_every"
        )
    count = min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng([SPLIT_STREAM, seed]).permutation(n)
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    return [paths[i] for i in kept], [paths[i] for i in held]


def synthesize(
    images: np.ndarray, draw_source: Callable[[np.random.Generator], np.ndarray], num_samples: int, seed: int
) -> SampleSet:
    """`num_samples` training-style samples from `images` (uint8 N×H×W×3), all drawn from one generator seeded
    by `seed`."""
    rng = np.random.default_rng([SYNTHESIS_STREAM, seed])
    samples = [make_training_sample(rng, len(images), images.__getitem__, draw_source)
               for _ in range(num_samples)]
    return SampleSet(
        images=torch.from_numpy(np.stack([s["augmented_image"] for s in samples])),
        masks=torch.from_numpy(np.stack([s["anomaly_mask"] for s in samples])),
        labels=torch.from_numpy(np.concatenate([s["has_anomaly"] for s in samples])),
    )


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{name}": value for name, value in metrics.items()}


def evaluate_synthetic(scorer: DraemScorer, val_set: SampleSet, device: torch.device,
                       batch_size: int) -> dict[str, float]:
    """The test protocol's metrics on the validation set, keys `val_*`; leaves the model in eval mode."""
    n, _, height, width = val_set.images.shape
    batches = tensor_batches(val_set.images, val_set.masks, val_set.labels, batch_size)
    return prefixed(evaluate(scorer, batches, n, (height, width), device, desc="validate").metrics, "val_")


def evaluate_test_set(
    scorer: DraemScorer, data_path: str | Path, category: str, image_size: int | tuple[int, int],
    device: torch.device, batch_size: int,
    layout: str = "mvtec", mask_suffix: str = "_mask",
) -> dict[str, float]:
    """The released test protocol on the category's test set, keys `test_*`; {} when the layout has no test
    folder for it.

    VisA always has a test split (its CSV lists it); the other layouts need `<data_path>/<category>/test`
    (mvtec_ad2: `test_public`).
    """
    if not has_test_set(layout, data_path, category):
        return {}
    result = evaluate_category(scorer, data_path, category, image_size, device, batch_size, layout,
                               mask_suffix)
    return prefixed(result.metrics, "test_")
