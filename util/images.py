"""Image reading: THE preprocessing every program shares (METHOD.md §1).

OpenCV decodes (BGR; grayscale files become 3 equal channels), cv2.resize (default bilinear) to the
working size, float32 in [0, 1]. Masks are read in grayscale and resized the same way. The working size
is (height, width): `--image_size 256` is 256 x 256, `--image_size 256 384` is 256 high, 384 wide.
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
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # a PNG's first 8 bytes; its IHDR chunk (width, height) follows

# The first bytes of each image format we accept; a file without one of them is not an image.
SIGNATURES = {PNG_SIGNATURE: "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"II*\x00": "TIFF",
              b"MM\x00*": "TIFF"}
LOSSLESS_FORMATS = ("PNG", "BMP", "TIFF")

# Unreadable files are reported as one DraemInputError line; OpenCV's own warnings would only add noise.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def image_shape(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a working size given as one side (square) or as (height, width)."""
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    height, width = (int(side) for side in size)
    return height, width


def shape_record(shape: int | Sequence[int]) -> int | list[int]:
    """A working size as threshold files store it: the side when square (as before non-square sizes), else [H,
    W]."""
    height, width = image_shape(shape)
    return height if height == width else [height, width]


def shape_text(shape: int | Sequence[int]) -> str:
    """A working size for messages: '256' when square, else '256x384' (height x width)."""
    height, width = image_shape(shape)
    return str(height) if height == width else f"{height}x{width}"


def _decode(path: str | os.PathLike, flags: int) -> np.ndarray:
    """cv2 decode of a file, or a DraemInputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DraemInputError(f"image file not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise DraemInputError(f"cannot read image {path}: not an image OpenCV can decode (corrupt or "
                              f"truncated?)")
    return image


def image_format(path: str | os.PathLike, what: str = "image") -> str:
    """The format a file's first bytes say it holds (PNG, JPEG, BMP, TIFF); a missing, empty, unreadable or
    non-image file is a one-line error naming it. Cheap (a few bytes), so whole folders are checked before the
    slow work."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
    except OSError as exc:
        raise DraemInputError(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__})") from None
    if not head:
        raise DraemInputError(f"{what} {path} is empty (0 bytes): replace it or remove it")
    for signature, name in SIGNATURES.items():
        if head.startswith(signature):
            return name
    raise DraemInputError(f"{what} {path} is not a PNG, JPEG, BMP or TIFF image (its first bytes are "
                          f"{head[:4]!r})")


def mask_files(path: str | os.PathLike) -> list[Path]:
    """The mask files of a ground truth: the file itself, or every .png of a folder (MVTec LOCO AD: several
    masks per image, 000.png, 001.png, ...); a folder without one is a one-line error."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = sorted_images(path.iterdir(), (".png",))
    if not files:
        raise DraemInputError(f"ground-truth folder {path} holds no .png mask")
    return files


def check_mask_file(path: str | os.PathLike) -> None:
    """A ground-truth mask must hold lossless data: JPEG noise would mark stray pixels, whatever the file is
    called. A folder of masks: each of them."""
    if Path(path).is_dir():
        for file in mask_files(path):
            check_mask_file(file)
        return
    found = image_format(path, "ground-truth mask")
    if found not in LOSSLESS_FORMATS:
        raise DraemInputError(f"ground-truth mask {path} holds {found} data (whatever its name says), whose "
                              f"compression noise would mark stray pixels: save it as PNG")


def _resize(image: np.ndarray, resize_shape: tuple[int, int]) -> np.ndarray:
    """cv2.resize (default bilinear) to (H, W) as in the released programs."""
    return cv2.resize(image, dsize=(resize_shape[1], resize_shape[0]))


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """A colour image at its own resolution, as OpenCV decodes it (BGR; grayscale as 3 equal channels): uint8
    H x W x 3."""
    return _decode(path, cv2.IMREAD_COLOR)


def stored_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file: from a PNG's header when it is a PNG, else by decoding it."""
    if not Path(path).is_file():
        raise DraemInputError(f"image file not found: {path}")
    with open(path, "rb") as file:
        header = file.read(24)
    if header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR":
        return int.from_bytes(header[20:24], "big"), int.from_bytes(header[16:20], "big")
    return decode_image(path).shape[:2]


def read_image_uint8(path: str | os.PathLike, resize_shape: tuple[int, int]) -> np.ndarray:
    """Colour image as OpenCV reads it (BGR; grayscale files become 3 equal channels), resized: uint8 H x W x
    3."""
    return _resize(decode_image(path), resize_shape)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 0..255 to float32 0..1 in one pass (the same values as .astype(float32) / 255)."""
    return np.divide(image, np.float32(255), dtype=np.float32)


def read_image(path: str | os.PathLike, resize_shape: tuple[int, int]) -> np.ndarray:
    """THE image preprocessing of the project: BGR float32 H x W x 3 in [0, 1], resized to (H, W)."""
    return to_float(read_image_uint8(path, resize_shape))


def read_mask(path: str | os.PathLike, resize_shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask read in grayscale, resized like the images: float32 H x W x 1 in [0, 1] (METHOD.md
    §6). Its format is checked once, up front, by whoever lists the masks (check_mask_file)."""
    return to_float(_resize(_decode(path, cv2.IMREAD_GRAYSCALE), resize_shape))[..., None]


def nonzero_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask at its own resolution, True where any channel is non-zero (any bit depth, palette or colour):
    bool H x W.

    A folder (MVTec LOCO AD: several masks per image, 000.png, 001.png, ...) is the union of every mask in it.
    """
    path = Path(path)
    if path.is_dir():
        masks = [nonzero_mask(file) for file in mask_files(path)]
        if any(mask.shape != masks[0].shape for mask in masks):
            raise DraemInputError(f"the masks in {path} have different sizes: "
                                  f"{sorted({m.shape for m in masks})}")
        return np.logical_or.reduce(masks)
    mask = _decode(path, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    return mask[..., :3].any(axis=2) if mask.ndim == 3 else mask != 0


def read_nonzero_mask(path: str | os.PathLike, resize_shape: tuple[int, int]) -> np.ndarray:
    """A mask whose every non-zero pixel is anomalous (VisA's 0/1, any bit depth, palette or colour; a LOCO
    folder of masks merged: `nonzero_mask`), as `read_mask` reads it.

    Binarised to 0/255 at its own size, then resized and scaled exactly like an MVTec AD mask.
    """
    return to_float(_resize(nonzero_mask(path).astype(np.uint8) * np.uint8(255), resize_shape))[..., None]


def to_chw(image: np.ndarray) -> np.ndarray:
    """H x W x C to a contiguous C x H x W array."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def sorted_images(paths, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files among `paths`, sorted by their path text like the released programs' sorted(glob(...))."""
    return sorted((p for p in paths if p.suffix.lower() in suffixes and p.is_file()), key=str)


def find_images(
    folder: str | os.PathLike, what: str, suffixes: Sequence[str] = FOLDER_IMAGE_SUFFIXES, *, hint: str = "",
    skip: str | os.PathLike | None = None, check: str | None = None,
) -> list[Path]:
    """Every image under `folder`, recursively, in `sorted_images` order, leaving out what lies under `skip`.

    A missing folder or one without images is a one-line error naming it as `what` (e.g. "--good_dir"), with
    `hint`.
    With `check` (what one file is called, e.g. "anomaly source"), each file's first bytes are checked too
    (`image_format`): a broken file is one line now, not a failure after the slow work.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DraemInputError(f"{what} {folder} does not exist{hint}")
    skip = None if skip is None else Path(skip).resolve()
    paths = [p for p in sorted_images(folder.rglob("*"), suffixes)
             if skip is None or skip not in p.resolve().parents]
    if not paths:
        raise DraemInputError(f"no images ({', '.join(suffixes)}) found under {what} {folder}")
    if check is not None:
        for path in paths:
            image_format(path, check)
    return paths


def load_images(paths: Sequence[Path], resize_shape: tuple[int, int],
                desc: str = "loading training images") -> np.ndarray:
    """Decode and resize every image once, on a few threads (OpenCV releases the GIL): uint8 N x H x W x 3.
    `desc` labels the progress bar."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = pool.map(lambda p: read_image_uint8(p, resize_shape), paths)
        return np.stack(list(tqdm(images, total=len(paths), desc=desc, leave=False)))
