"""Make a small MVTec-format dataset and a texture-source folder, so DRAEM can be tried without downloads.

Two texture categories are cut from the texture photographs that scikit-image ships (they load
offline). Test defects are drawn with OpenCV as real defects look: thin bright scratches, dark
cuts, stains; not Perlin blobs, so the demo does not test the model on its own training
distribution. The anomaly sources are crops of scikit-image's other sample photographs.

    python -m tools.make_demo_data --output_dir datasets/demo

writes datasets/demo/mvtec/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}
and datasets/demo/textures/images/<name>/*.jpg. Same seed, same files.
"""
import shutil
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import skimage.data

from util.atomic import atomic_write_bytes
from util.errors import DraemInputError

DEMO_CATEGORIES = ("brick", "gravel")
# category: (scikit-image texture, BGR tint, its two defect types)
CATEGORY_STYLES = {
    "brick": ("brick", (0.55, 0.65, 1.0), ("scratch", "spot")),
    "gravel": ("gravel", (0.8, 0.9, 1.0), ("cut", "spot")),
}
DEFECT_TYPES = ("scratch", "spot", "cut")
# scikit-image sample photographs used as anomaly sources (none of them is a demo category's texture).
SOURCE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
    "colorwheel", "camera", "moon", "coins", "text", "page", "cell", "grass",
)


class DemoDataset(NamedTuple):
    mvtec_root: Path
    texture_root: Path
    categories: tuple[str, ...]


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def _as_bgr(photo: np.ndarray) -> np.ndarray:
    """scikit-image photographs (gray, RGB or RGBA) as 3-channel BGR uint8."""
    if photo.ndim == 2:
        return cv2.cvtColor(photo, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(photo[..., :3], cv2.COLOR_RGB2BGR)


def texture_image(texture: np.ndarray, tint: tuple[float, float, float], size: int,
                  rng: np.random.Generator) -> np.ndarray:
    """One defect-free sample of a texture: random crop (3/4 of the side), flip, lighting and sensor noise,
    tinted BGR."""
    crop = texture.shape[0] * 3 // 4
    y, x = rng.integers(0, texture.shape[0] - crop + 1), rng.integers(0, texture.shape[1] - crop + 1)
    patch = texture[y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    gray = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    gray = gray * rng.uniform(0.9, 1.1) + rng.normal(0.0, 2.0, gray.shape)
    return np.clip(gray[..., None] * np.float32(tint), 0, 255).astype(np.uint8)


def _random_point(size: int, rng: np.random.Generator) -> np.ndarray:
    """A point well inside the image, so defects are not cut off by the border."""
    return rng.uniform(0.2 * size, 0.8 * size, size=2)


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of `kind` on a copy of `image`; return it and its ground-truth mask (uint8, 0 or 255).

    scratch: a thin bright polyline; cut: a thick dark straight line; spot: one to three dark elliptic stains.
    The mask is drawn with the same geometry, so it covers exactly the changed pixels.
    """
    size = image.shape[0]
    canvas = np.zeros(image.shape[:2], dtype=np.uint8)
    if kind == "scratch":
        steps = rng.normal(0.0, size / 8, size=(int(rng.integers(2, 5)), 2))
        points = np.cumsum(np.vstack([_random_point(size, rng), steps]), axis=0)
        cv2.polylines(canvas, [np.clip(points, 0, size - 1).astype(np.int32)], False, 255, max(2, size // 64))
        paint = np.full(3, rng.uniform(215, 255), dtype=np.float32)
    elif kind == "cut":
        start, angle = _random_point(size, rng), rng.uniform(0, 2 * np.pi)
        end = start + rng.uniform(0.2, 0.5) * size * np.array([np.cos(angle), np.sin(angle)])
        cv2.line(canvas, tuple(start.astype(int)), tuple(np.clip(end, 0, size - 1).astype(int)), 255,
                 max(3, size // 40))
        paint = np.full(3, rng.uniform(5, 30), dtype=np.float32)
    elif kind == "spot":
        for _ in range(int(rng.integers(1, 4))):
            axes = tuple(int(a) for a in rng.uniform(size / 40, size / 14, size=2))
            center = tuple(int(c) for c in _random_point(size, rng))
            cv2.ellipse(canvas, center, axes, rng.uniform(0, 180), 0, 360, 255, -1)
        paint = image[canvas > 0] * np.float32(0.35)  # a stain darkens the texture but keeps it
    else:
        raise ValueError(f"unknown defect type {kind!r}; known: {', '.join(DEFECT_TYPES)}")
    defective = image.copy()
    defective[canvas > 0] = paint.astype(np.uint8)
    return defective, canvas


def write_category(
    folder: Path, category: str, size: int, seed: int, n_train: int, n_test_good: int, n_test_per_defect: int
) -> None:
    """One MVTec-format category: train/good, test/good, test/<defect> and
    ground_truth/<defect>/<name>_mask.png."""
    texture_name, tint, defects = CATEGORY_STYLES[category]
    texture = getattr(skimage.data, texture_name)()
    rng = np.random.default_rng([seed, DEMO_CATEGORIES.index(category)])
    for i in range(n_train):
        atomic_write_bytes(folder / "train" / "good" / f"{i:03d}.png",
                           _png(texture_image(texture, tint, size, rng)))
    for i in range(n_test_good):
        atomic_write_bytes(folder / "test" / "good" / f"{i:03d}.png",
                           _png(texture_image(texture, tint, size, rng)))
    for defect in defects:
        for i in range(n_test_per_defect):
            image, mask = draw_defect(texture_image(texture, tint, size, rng), defect, rng)
            atomic_write_bytes(folder / "test" / defect / f"{i:03d}.png", _png(image))
            atomic_write_bytes(folder / "ground_truth" / defect / f"{i:03d}_mask.png", _png(mask))


def write_sources(folder: Path, seed: int, count: int) -> None:
    """`count` JPEG anomaly sources laid out like DTD (images/<name>/<name>_<i>.jpg): crops of sample
    photographs, 200-400 px."""
    rng = np.random.default_rng([seed, len(DEMO_CATEGORIES)])
    photos = {name: _as_bgr(getattr(skimage.data, name)())
              for name in SOURCE_PHOTOS[: min(count, len(SOURCE_PHOTOS))]}
    names = list(photos)
    for i in range(count):
        name = names[i % len(names)]
        photo = photos[name]
        crop = int(rng.uniform(0.5, 1.0) * min(photo.shape[:2]))
        y, x = rng.integers(0, photo.shape[0] - crop + 1), rng.integers(0, photo.shape[1] - crop + 1)
        side = int(rng.integers(200, 401))
        patch = cv2.resize(photo[y : y + crop, x : x + crop], (side, side), interpolation=cv2.INTER_AREA)
        jpeg = cv2.imencode(".jpg", patch, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        atomic_write_bytes(folder / "images" / name / f"{name}_{i:03d}.jpg", jpeg)


def _holds_only_demo_data(demo: DemoDataset) -> bool:
    """Whether mvtec/ and textures/ hold nothing but what this script writes, so --overwrite may delete
    them."""
    categories = [p.name for p in demo.mvtec_root.iterdir()] if demo.mvtec_root.is_dir() else []
    texture_sets = [p.name for p in demo.texture_root.iterdir()] if demo.texture_root.is_dir() else []
    return set(categories) <= set(DEMO_CATEGORIES) and set(texture_sets) <= {"images"}


def make_demo_dataset(
    root: str | Path,
    image_size: int = 256,
    seed: int = 0,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 5,
    n_sources: int = 24,
    categories: tuple[str, ...] = DEMO_CATEGORIES,
    overwrite: bool = False,
) -> DemoDataset:
    """Write the demo dataset under `root` (root/mvtec/<category>/..., root/textures/...) and return its
    folders.

    It is built in a scratch folder and moved into place at the end (mvtec/ last), so an
    interrupted run never leaves a partial dataset where a training script would use it.
    An existing demo dataset is an error unless `overwrite`; anything else there is never deleted.
    """
    root = Path(root)
    unknown = [c for c in categories if c not in DEMO_CATEGORIES]
    if unknown or not categories:
        raise DraemInputError(f"unknown demo categories {unknown}: choose from {', '.join(DEMO_CATEGORIES)}")
    if image_size < 32:
        raise DraemInputError(f"demo image size must be at least 32 pixels, got {image_size}")
    final = DemoDataset(root / "mvtec", root / "textures", tuple(categories))
    if final.mvtec_root.exists() or final.texture_root.exists():
        if not overwrite:
            raise DraemInputError(f"{final.mvtec_root} or {final.texture_root} already exists: delete it or "
                                  f"pass --overwrite")
        if not _holds_only_demo_data(final):
            raise DraemInputError(f"{root} holds data that is not a demo dataset (e.g. MVTec AD itself); "
                                  f"choose another folder")
    scratch = root / ".demo-building"
    shutil.rmtree(scratch, ignore_errors=True)
    for category in categories:
        write_category(scratch / "mvtec" / category, category, image_size, seed, n_train, n_test_good,
                       n_test_per_defect)
    write_sources(scratch / "textures", seed, n_sources)
    for built, target in ((scratch / "textures", final.texture_root), (scratch / "mvtec", final.mvtec_root)):
        shutil.rmtree(target, ignore_errors=True)
        built.replace(target)
    scratch.rmdir()
    return final
