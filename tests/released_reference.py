"""A released-style training sample, written here from the released program and METHOD.md §2, not from our
code.

Nothing below comes from the code under test: the Perlin noise is the released `rand_perlin_2d_np` (float64,
every corner's gradients tiled to full size, the quintic fade written out), the numbers are the method's
literals, the blend is the paper's formula, rotations are OpenCV's about the centre pixel (bilinear, zero
fill) and images are read with OpenCV directly. Only the source augmentation is passed in: the tests give
both paths one stand-in, since the ten augmentations are pinned on their own (test_augment.py,
test_synthesis_numbers.py).
"""
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np


def released_perlin(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The released program's rand_perlin_2d_np, with `rng.random` for np.random.rand."""
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile_grads(rows: tuple, cols: tuple) -> np.ndarray:
        return np.repeat(np.repeat(gradients[rows[0] : rows[1], cols[0] : cols[1]], d[0], axis=0), d[1],
                         axis=1)

    def dot(grad: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
        offsets = np.stack((grid[: shape[0], : shape[1], 0] + shift[0],
                            grid[: shape[0], : shape[1], 1] + shift[1]), axis=-1)
        return (offsets * grad[: shape[0], : shape[1]]).sum(axis=-1)

    n00 = dot(tile_grads((0, -1), (0, -1)), (0, 0))
    n10 = dot(tile_grads((1, None), (0, -1)), (-1, 0))
    n01 = dot(tile_grads((0, -1), (1, None)), (0, -1))
    n11 = dot(tile_grads((1, None), (1, None)), (-1, -1))
    t = grid[: shape[0], : shape[1]]
    t = 6 * t**5 - 15 * t**4 + 10 * t**3

    def lerp(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (y - x) * w + x

    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


def rotate_about_centre(image: np.ndarray, degrees: float) -> np.ndarray:
    """Counter-clockwise on screen about the centre pixel ((W - 1) / 2, (H - 1) / 2), bilinear, zero fill."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0).reshape(image.shape)


def read(path: Path, shape: tuple[int, int]) -> np.ndarray:
    return cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), (shape[1], shape[0]))


def released_style_sample(
    rng: np.random.Generator, image_paths: Sequence[Path], source_paths: Sequence[Path],
    shape: tuple[int, int], augment: Callable[[np.ndarray, np.random.Generator], np.ndarray],
) -> dict:
    """One sample, every draw from `rng` in the method's order: the training image, its rotation (p 0.3,
    U[-90, 90]), the normal/anomalous coin (p 0.5), the source, its augmentation, the Perlin scales 2**U{0..5}
    per axis, the noise, its rotation U[-90, 90], the threshold 0.5, beta U[0, 0.8), blended as (1 - beta)
    source + beta image."""
    idx = int(rng.integers(len(image_paths)))
    image = read(image_paths[idx], shape)
    if rng.random() < 0.3:
        image = rotate_about_centre(image, rng.uniform(-90.0, 90.0))
    image = image.astype(np.float32) / 255
    mask = np.zeros((*shape, 1), dtype=np.float32)
    augmented = image
    if rng.random() < 0.5:
        source = augment(read(source_paths[int(rng.integers(len(source_paths)))], shape),
                         rng).astype(np.float32) / 255
        res = tuple(int(2**r) for r in rng.integers(0, 6, size=2))
        noise = rotate_about_centre(released_perlin(shape, res, rng), rng.uniform(-90.0, 90.0))
        mask = (noise > 0.5).astype(np.float32)[..., None]
        beta = rng.uniform(0.0, 0.8)
        augmented = mask * ((1 - beta) * source + beta * image) + (1 - mask) * image
    return {"image": image.transpose(2, 0, 1), "augmented_image": augmented.transpose(2, 0, 1),
            "anomaly_mask": mask.transpose(2, 0, 1), "has_anomaly": float(mask.any()), "idx": idx}
