"""2-D Perlin (gradient) noise and the thresholded Perlin masks that shape DRAEM's anomalies (METHOD.md §2).

The noise is written once for a batch of maps that may each have their own resolution, in code
that runs on NumPy arrays (the CPU data loader: plain NumPy, no thread pool to compete with) and
on torch tensors on any device (a GPU synthesis path) alike.

A map of resolution (ry, rx) has ry x rx gradient cells; pixel (y, x) lies at lattice position
(y * ry / H, x * rx / W). The released program only supports resolutions that divide the image
side; those give exactly its lattice. Other resolutions are sampled the same way (cells then span a
non-integer number of pixels).

Masks of a non-square H x W size (images as they come, METHOD.md §2): the drawn cell counts hold for the
shorter side, and the noise is made on a square canvas of the longer side with proportionally more cells
per axis (rounded), rotated there and cropped to H x W at its centre. So cells keep one size in pixels
along both axes and a rotation never leaves a zero band across the mask. A square mask is its own canvas:
the released computation, draw for draw.
"""
import math

import numpy as np
import torch

from augment import rotate, rotate_maps

PERLIN_SCALE_EXPONENTS = (0, 6)  # a, b uniform integers in [0, 6): 2**a x 2**b cells, i.e. 1..32 per axis
MAX_PERLIN_CELLS = 2 ** (PERLIN_SCALE_EXPONENTS[1] - 1)
MASK_ROTATION_DEGREES = 90.0  # the noise map is rotated by an angle uniform in [-90, 90] degrees
MASK_THRESHOLD = 0.5


def fade(t: float | np.ndarray | torch.Tensor) -> float | np.ndarray | torch.Tensor:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3: smooth cell-to-cell blending (zero 1st and 2nd derivative
    at 0 and 1)."""
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def lerp(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, weight: np.ndarray | torch.Tensor
) -> np.ndarray | torch.Tensor:
    """Linear interpolation from a (weight 0) to b (weight 1), in the released program's operation order."""
    return (b - a) * weight + a


def gradients_from_angles(angles: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Unit gradient vectors (..., 2) = (cos, sin) of angles in radians; NumPy or torch like the input.

    Component 0 pairs with the y offset, component 1 with the x offset.
    """
    if isinstance(angles, torch.Tensor):
        return torch.stack((angles.cos(), angles.sin()), dim=-1)
    return np.stack((np.cos(angles), np.sin(angles)), axis=-1)


def _arange(size: int, like: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """0 .. size - 1 as integers, NumPy or torch (on like's device) like `like`."""
    if isinstance(like, torch.Tensor):
        return torch.arange(size, device=like.device)
    return np.arange(size)


def _lattice(size: int, res, like) -> tuple:
    """Cell index and position inside the cell of `size` pixels along one axis, per map: two (B, size).

    Integer arithmetic first and one division last, so the position is exact wherever the released
    program's is (res dividing size). The position has like's float dtype.
    """
    position = _arange(size, like) * res[:, None]
    offset = position % size
    offset = offset.to(like.dtype) if isinstance(like, torch.Tensor) else offset.astype(like.dtype)
    return position // size, offset / size


def perlin_noise_batch(
    shape: tuple[int, int], res: np.ndarray | torch.Tensor, gradients: np.ndarray | torch.Tensor
) -> np.ndarray | torch.Tensor:
    """B maps of Perlin noise scaled by sqrt(2) (values within about [-1, 1]), shape (B, H, W).

    res: (B, 2) integers, map b having res[b] = (cells along y, cells along x).
    gradients: (B, Gy, Gx, 2) unit vectors with Gy > max res_y, Gx > max res_x; map b uses the
    top-left (res_y + 1, res_x + 1) corner, so maps of different resolutions share one padded array.
    The result has the type (NumPy or torch), device and float dtype of `gradients`.
    """
    if isinstance(gradients, torch.Tensor):
        res = torch.as_tensor(res, device=gradients.device).long().reshape(-1, 2)
    else:
        res = np.asarray(res, dtype=np.int64).reshape(-1, 2)
    height, width = shape
    batch, lattice_y, lattice_x = gradients.shape[:3]
    cell_y, u = _lattice(height, res[:, 0], gradients)
    cell_x, v = _lattice(width, res[:, 1], gradients)
    u, v = u[:, :, None], v[:, None, :]  # (B, H, 1) and (B, 1, W): offsets inside the cell along y and x
    # Flat index of each pixel's top-left cell corner in the (B, Gy, Gx) gradient grid: one 1-D
    # `take` per corner and component is the fastest gather in both NumPy and torch.
    top_left = ((_arange(batch, gradients)[:, None, None] * lattice_y + cell_y[:, :, None]) * lattice_x
                + cell_x[:, None, :])
    grad_y, grad_x = gradients[..., 0].reshape(-1), gradients[..., 1].reshape(-1)

    def corner_dot(dy: int, dx: int):
        """Gradient at each pixel's cell corner (+dy, +dx), dotted with the pixel's offset from that
        corner."""
        corner = top_left + (dy * lattice_x + dx)
        return grad_y.take(corner) * (u - dy) + grad_x.take(corner) * (v - dx)

    fade_y, fade_x = fade(u), fade(v)
    top = lerp(corner_dot(0, 0), corner_dot(1, 0), fade_y)
    bottom = lerp(corner_dot(0, 1), corner_dot(1, 1), fade_y)
    return math.sqrt(2) * lerp(top, bottom, fade_x)


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], gradients: np.ndarray | torch.Tensor
) -> np.ndarray | torch.Tensor:
    """One map of Perlin noise (H, W) with res = (cells along y, cells along x) and gradients (ry + 1, rx + 1,
    2)."""
    return perlin_noise_batch(shape, [tuple(int(r) for r in res)], gradients[None])[0]


def noise_canvas(shape: tuple[int, int]) -> tuple[int, float]:
    """(side, factor): the square canvas the noise of an H x W mask is made on (its longer side) and how many
    times the shorter side that is; the drawn cell counts are multiplied by `factor` (module docstring).
    Square: (H, 1.0)."""
    side = max(shape)
    return side, side / min(shape)


def scaled_cells(res: np.ndarray | torch.Tensor, factor: float) -> np.ndarray | torch.Tensor:
    """Cell counts drawn for the shorter side, times `factor` and rounded (at least 1): the canvas's
    counts."""
    if factor == 1:
        return res
    if isinstance(res, torch.Tensor):
        return (res * factor).round().clamp(min=1).long()
    return np.maximum(1, np.rint(res * factor)).astype(np.int64)


def _centre_crop(noise: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray | torch.Tensor:
    """The H x W centre of square maps (..., S, S); the maps themselves when they are H x W already."""
    top, left = (noise.shape[-2] - shape[0]) // 2, (noise.shape[-1] - shape[1]) // 2
    return noise[..., top : top + shape[0], left : left + shape[1]]


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random binary anomaly mask (H, W, 1) float32, as in the released program.

    Draws 2**a x 2**b cells (a, b uniform in [0, 6)), random gradient directions, rotates the
    noise by an angle uniform in [-90, 90] degrees (bilinear, zero fill) and keeps noise > 0.5.
    The noise is float64 as in the released program: its values, hence the mask's edge pixels,
    are then those of the released computation (float32 would flip about 10 edge pixels a mask).
    A non-square shape is cut from a square canvas (module docstring).
    """
    side, factor = noise_canvas(shape)
    res = scaled_cells(2 ** rng.integers(*PERLIN_SCALE_EXPONENTS, size=2), factor)
    angles = rng.uniform(0.0, 2 * math.pi, size=(res[0] + 1, res[1] + 1))
    noise = perlin_noise((side, side), res, gradients_from_angles(angles))
    noise = _centre_crop(rotate(noise, rng.uniform(-MASK_ROTATION_DEGREES, MASK_ROTATION_DEGREES)), shape)
    return (noise > MASK_THRESHOLD).astype(np.float32)[..., None]


def perlin_mask_batch(
    shape: tuple[int, int],
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """`batch_size` random binary masks (B, 1, H, W) float32 on `device`, drawn like `perlin_mask`.

    `generator`, if given, must live on `device`. A non-square shape is cut from a square canvas (module
    docstring).
    """
    low, high = PERLIN_SCALE_EXPONENTS
    side, factor = noise_canvas(shape)
    res = scaled_cells(2 ** torch.randint(low, high, (batch_size, 2), generator=generator, device=device),
                       factor)
    cells = int(scaled_cells(np.array(MAX_PERLIN_CELLS), factor)) + 1
    angles = torch.rand(batch_size, cells, cells, generator=generator, device=device) * (2 * math.pi)
    noise = perlin_noise_batch((side, side), res, gradients_from_angles(angles))
    degrees = (torch.rand(batch_size, generator=generator, device=device) * 2 - 1) * MASK_ROTATION_DEGREES
    noise = _centre_crop(rotate_maps(noise, degrees), shape)
    return (noise > MASK_THRESHOLD).float()[:, None]
