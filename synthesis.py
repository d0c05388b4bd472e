"""Training-sample synthesis on the CPU, one sample per call (METHOD.md §2; paper §3.3).

A training image (rotated with probability 0.3), and with probability 0.5 an anomaly: a Perlin
mask (perlin.py) cuts a region out of an augmented anomaly source (augment.py) and blends it into
the image with a random opacity. The numbers of the method are written here once; the device path
(synthesis_gpu.py) imports them.
"""
from collections.abc import Callable

import numpy as np
import torch

from augment import augment_source, rotate
from images import to_chw, to_float
from perlin import perlin_mask

ROTATE_IMAGE_PROBABILITY = 0.3  # training images are rotated by [-90, 90] degrees with this probability
IMAGE_ROTATION_DEGREES = 90.0
ANOMALY_PROBABILITY = 0.5
MAX_BETA = 0.8  # anomaly opacity: beta uniform in [0, 0.8)


def blend_anomaly(
    image: np.ndarray | torch.Tensor,
    source: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    beta: float | np.ndarray | torch.Tensor,
) -> np.ndarray | torch.Tensor:
    """Paste the augmented source into the image: (1 - beta) * source + beta * image inside the mask, image outside.

    NumPy arrays or torch tensors; mask is binary and broadcasts against image; beta is a number or
    broadcasts too (one per sample on a GPU batch).
    """
    blended = (1 - beta) * source + beta * image
    where = torch.where if isinstance(image, torch.Tensor) else np.where
    return where(mask > 0, blended, image)


def random_noise_source(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A uniform-noise uint8 source image (H x W x 3), used when no source folder is given.

    This is anomalib's fallback; a texture set such as DTD gives the model more realistic anomalies.
    """
    return rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def make_training_sample(
    rng: np.random.Generator,
    num_images: int,
    load_image: Callable[[int], np.ndarray],
    draw_source: Callable[[np.random.Generator], np.ndarray],
) -> dict:
    """One training sample as in METHOD.md §2, every random choice drawn from `rng`.

    load_image(i) returns training image i and draw_source(rng) a random anomaly source, both
    uint8 H x W x 3 at the training size; neither may be modified here (they can be cached).
    """
    idx = int(rng.integers(num_images))
    image = load_image(idx)
    if rng.random() < ROTATE_IMAGE_PROBABILITY:
        image = rotate(image, rng.uniform(-IMAGE_ROTATION_DEGREES, IMAGE_ROTATION_DEGREES))
    image = to_float(image)
    augmented, mask = image, np.zeros((*image.shape[:2], 1), dtype=np.float32)
    if rng.random() < ANOMALY_PROBABILITY:
        source = to_float(augment_source(draw_source(rng), rng))
        mask = perlin_mask(image.shape[:2], rng)
        augmented = blend_anomaly(image, source, mask, rng.uniform(0.0, MAX_BETA))
    return {
        "image": to_chw(image),
        "augmented_image": to_chw(augmented),
        "anomaly_mask": to_chw(mask),
        # An anomalous draw whose mask came out empty is a normal sample (its image is unchanged).
        "has_anomaly": np.array([float(mask.any())], dtype=np.float32),
        "idx": idx,
    }
