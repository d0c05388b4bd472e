"""MVTec AD 2's submission: maps at each image's own resolution, the binary masks, the files and their check.

What goes to the evaluation server, per object and private split (util.layouts.AD2_PRIVATE_SPLITS):
- `anomaly_images/<object>/<split>/<stem>.tiff`: the anomaly map, one channel, float16, continuous scores,
  at the image's own height and width (`full_resolution_map`: the working-size map resized bilinearly, as
  OpenCV resizes the images, then rounded to float16);
- `anomaly_images_thresholded/<object>/<split>/<stem>.png`: the binary mask, one channel, 0 and 255 only
  (`submission_mask`), from which the server computes SegF1 and ClassF1;
and nothing else. Every private split of an object holds AD2_PRIVATE_COUNTS[object] images.

The decisions, one definition each (METHOD.md §6): a pixel is anomalous where its float16 map value is at
or above the pixel threshold, in an image whose image score is at or above the image threshold (an image
called normal gets an empty mask); an image is anomalous when its mask has any anomalous pixel
(`image_decision`), which is how the server can read ClassF1 off the submitted masks.

OpenCV 5 writes a float16 array to TIFF as 8-bit (it falls back to CV_8U with a warning), so the maps go
through tifffile, which writes and reads float16 TIFF pages as they are.
"""
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np
import tifffile

from util.errors import DraemInputError
from util.layouts import AD2_OBJECTS, AD2_PRIVATE_SPLITS

# Images per private split (test_private and test_private_mixed alike), as the challenge publishes them.
AD2_PRIVATE_COUNTS = {
    "can": 321, "fabric": 314, "fruit_jelly": 255, "rice": 277,
    "sheet_metal": 142, "vial": 276, "wallplugs": 232, "walnuts": 228,
}
MAPS_DIR = "anomaly_images"
MASKS_DIR = "anomaly_images_thresholded"
MAP_SUFFIX, MASK_SUFFIX = ".tiff", ".png"
# expected[object][split][stem] = (height, width) of the private image
Expected = Mapping[str, Mapping[str, Mapping[str, tuple[int, int]]]]


def full_resolution_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An H×W working-size anomaly map (float32) at an image's own (height, width): bilinear, then float16."""
    if amap.shape != tuple(shape):
        amap = cv2.resize(np.ascontiguousarray(amap, dtype=np.float32), dsize=(shape[1], shape[0]))
    return amap.astype(np.float16)


def submission_mask(
    amap: np.ndarray, image_score: float, image_threshold: float, pixel_threshold: float
) -> np.ndarray:
    """The binary mask of one image (bool H×W): map >= pixel threshold where image score >= image threshold,
    else empty.

    Compared in float64, as predict.py compares: NumPy would round a threshold to the map's precision first.
    """
    if float(image_score) < image_threshold:
        return np.zeros(amap.shape, dtype=bool)
    return amap.astype(np.float64) >= pixel_threshold


def image_decision(mask: np.ndarray) -> bool:
    """Whether an image is called anomalous (ClassF1): any pixel of its submitted mask is anomalous."""
    return bool(mask.any())


def tiff_bytes(amap: np.ndarray) -> bytes:
    """A float16 H×W map as a one-page, one-channel TIFF file."""
    if amap.dtype != np.float16 or amap.ndim != 2:
        raise ValueError(f"expected an H×W float16 map, got {amap.dtype} {amap.shape}")
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, amap)
    return buffer.getvalue()


def png_bytes(mask: np.ndarray) -> bytes:
    """A bool H×W mask as a one-channel 8-bit PNG holding 0 and 255."""
    return cv2.imencode(".png", mask.astype(np.uint8) * np.uint8(255))[1].tobytes()


def _refuse(path: Path, problem: str) -> NoReturn:
    raise DraemInputError(f"submission not valid: {path} {problem}; fix it or delete the output folder and "
                          "write it again")


def _check_map(path: Path, shape: tuple[int, int]) -> None:
    try:
        with tifffile.TiffFile(path) as tiff:
            pages = len(tiff.pages)
            amap = tiff.pages[0].asarray()
    except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:  # not a TIFF, truncated, no page
        _refuse(path, f"cannot be read as TIFF ({type(exc).__name__})")
    if pages != 1 or amap.ndim != 2:
        _refuse(path, f"is not one single-channel image ({pages} page(s), shape {amap.shape})")
    if amap.dtype != np.float16:
        _refuse(path, f"holds {amap.dtype}, not float16")
    if amap.shape != tuple(shape):
        _refuse(path, f"is {amap.shape[0]}x{amap.shape[1]}, not the image's {shape[0]}x{shape[1]}")
    if not np.isfinite(amap).all():
        _refuse(path, "holds values that are not finite")


def _check_mask(path: Path, shape: tuple[int, int]) -> None:
    data = np.fromfile(path, dtype=np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None:
        _refuse(path, "cannot be read as PNG")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        _refuse(path, f"is not one 8-bit channel ({mask.dtype}, shape {mask.shape})")
    values = np.unique(mask)
    if not np.isin(values, (0, 255)).all():
        others = ", ".join(str(v) for v in values if v not in (0, 255))
        _refuse(path, f"holds values other than 0 and 255 ({others})")
    if mask.shape != tuple(shape):
        _refuse(path, f"is {mask.shape[0]}x{mask.shape[1]}, not the image's {shape[0]}x{shape[1]}")


def _check_entries(folder: Path, expected: set[str], what: str) -> None:
    """`folder` exists and holds exactly `expected` names (files or folders)."""
    if not folder.is_dir():
        _refuse(folder, f"is missing (expected {what})")
    present = {entry.name for entry in folder.iterdir()}
    if missing := sorted(expected - present):
        _refuse(folder / missing[0], f"is missing ({len(missing)} missing in {folder})")
    if extra := sorted(present - expected):
        _refuse(folder / extra[0], f"is not part of a submission ({len(extra)} extra in {folder}: expected "
                                   f"{what} only)")


def check_submission(output_dir: str | os.PathLike, expected: Expected, official_counts: bool) -> int:
    """Refuse (DraemInputError, one line) a submission tree that is not exactly `expected`; return its file
    count.

    Checks: the two trees and nothing else; in each, the objects and private splits of `expected` and nothing
    else; per split one map and one mask for each expected stem and nothing else, and with `official_counts`
    as many as AD2_PRIVATE_COUNTS says; every map a one-page, one-channel float16 TIFF, finite, at its image's
    size; every mask a one-channel uint8 PNG of 0 and 255 only, at its image's size.
    """
    root = Path(output_dir)
    _check_entries(root, {MAPS_DIR, MASKS_DIR}, f"{MAPS_DIR}/ and {MASKS_DIR}/")
    files = 0
    for tree, suffix, check in ((MAPS_DIR, MAP_SUFFIX, _check_map), (MASKS_DIR, MASK_SUFFIX, _check_mask)):
        _check_entries(root / tree, set(expected), f"the objects {', '.join(sorted(expected))}")
        for category, splits in expected.items():
            _check_entries(root / tree / category, set(AD2_PRIVATE_SPLITS), " and ".join(AD2_PRIVATE_SPLITS))
            for split in AD2_PRIVATE_SPLITS:
                stems = splits[split]
                folder = root / tree / category / split
                if official_counts and len(stems) != AD2_PRIVATE_COUNTS[category]:
                    raise DraemInputError(f"submission not valid: {category}/{split} has {len(stems)} "
                                          f"images, the challenge's {AD2_PRIVATE_COUNTS[category]}: is "
                                          "--data_path the complete MVTec AD 2?")
                names = {f"{stem}{suffix}" for stem in stems}
                _check_entries(folder, names, f"one {suffix} per {split} image")
                for stem, shape in stems.items():
                    path = folder / f"{stem}{suffix}"
                    if not path.is_file():
                        _refuse(path, "is not a file")
                    check(path, shape)
                    files += 1
    return files


def uses_official_counts(objects: set[str], asked: bool) -> bool:
    """Whether the official per-split counts apply: when asked for, or when the submission holds all 8
    objects."""
    return asked or objects == set(AD2_OBJECTS)
