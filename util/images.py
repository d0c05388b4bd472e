"""Image reading: THE preprocessing every program shares (METHOD.md §1).

OpenCV decodes (BGR; grayscale files become 3 equal channels), cv2.resize (default bilinear) to the
working size, float32 in [0, 1]. Masks are read in grayscale and resized the same way.
"""
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from util.errors import DraemInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # MVTec AD's training and test images, and anomaly sources
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Unreadable files are reported as one DraemInputError line; OpenCV's own warnings would only add noise.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _decode(path: str | os.PathLike, flags: int) -> np.ndarray:
    """cv2 decode of a file, or a DraemInputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DraemInputError(f"image file not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise DraemInputError(f"cannot read image {path}: not an image OpenCV can decode (corrupt or truncated?)")
    return image


def _resize(image: np.ndarray, resize_shape: tuple[int, int]) -> np.ndarray:
    """cv2.resize (default bilinear) to (H, W) as in the released programs."""
    return cv2.resize(image, dsize=(resize_shape[1], resize_shape[0]))


def read_image_uint8(path: str | os.PathLike, resize_shape: tuple[int, int]) -> np.ndarray:
    """Colour image as OpenCV reads it (BGR; grayscale files become 3 equal channels), resized: uint8 H x W x 3."""
    return _resize(_decode(path, cv2.IMREAD_COLOR), resize_shape)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 0..255 to float32 0..1 in one pass (the same values as .astype(float32) / 255)."""
    return np.divide(image, np.float32(255), dtype=np.float32)


def read_image(path: str | os.PathLike, resize_shape: tuple[int, int]) -> np.ndarray:
    """THE image preprocessing of the project: BGR float32 H x W x 3 in [0, 1], resized to (H, W)."""
    return to_float(read_image_uint8(path, resize_shape))


def read_mask(path: str | os.PathLike, resize_shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask read in grayscale, resized like the images: float32 H x W x 1 in [0, 1] (METHOD.md §6)."""
    return to_float(_resize(_decode(path, cv2.IMREAD_GRAYSCALE), resize_shape))[..., None]


def read_nonzero_mask(path: str | os.PathLike, resize_shape: tuple[int, int]) -> np.ndarray:
    """A mask whose every non-zero pixel is anomalous (VisA's 0/1, any bit depth, palette or colour), as `read_mask` reads it.

    Binarised to 0/255 at its own size, then resized and scaled exactly like an MVTec AD mask.
    """
    mask = _decode(path, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    anomalous = mask[..., :3].any(axis=2) if mask.ndim == 3 else mask != 0
    return to_float(_resize(anomalous.astype(np.uint8) * np.uint8(255), resize_shape))[..., None]


def to_chw(image: np.ndarray) -> np.ndarray:
    """H x W x C to a contiguous C x H x W array."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))



def sorted_images(paths, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files among `paths`, sorted by their path text like the released programs' sorted(glob(...))."""
    return sorted((p for p in paths if p.suffix.lower() in suffixes and p.is_file()), key=str)



def load_images(paths: Sequence[Path], resize_shape: tuple[int, int]) -> np.ndarray:
    """Decode and resize every image once, on a few threads (OpenCV releases the GIL): uint8 N x H x W x 3."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = pool.map(lambda p: read_image_uint8(p, resize_shape), paths)
        return np.stack(list(tqdm(images, total=len(paths), desc="loading training images", leave=False)))
