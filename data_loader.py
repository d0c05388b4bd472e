"""MVTec AD data for DRAEM: the category list, THE image preprocessing, and training-sample synthesis (spec §1, §2).

Training samples are random as in the released program (the dataset index is ignored) yet
reproducible. Each sample draws everything from its own NumPy Generator, seeded by one draw from
torch's random stream. torch seeds that stream per DataLoader worker (from the DataLoader's
generator), so a run is reproducible for any number of workers when the training script calls
`seed_everything(seed)` and passes `generator=torch.Generator().manual_seed(seed)` and
`worker_init_fn=worker_init_fn` to its DataLoader; no two workers share a stream. NumPy's and
Python's global generators (not used here) get per-worker seeds from torch's too: torch >= 1.9
does it itself, `worker_init_fn` states it explicitly.

Speed without changing a sample: training images are decoded and resized once (uint8, kept in
memory); resized anomaly sources go to a bounded cache; the Perlin noise is vectorised; each
image is converted to float32 exactly once; normal samples skip the work whose result they
would throw away (drawing a source, augmenting it, the Perlin mask).
"""
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from augment import augment_source, rotate
from errors import DraemInputError
from perlin import perlin_mask

# The released programs' --obj_id order: id i is CATEGORIES[i]; -1 means all of them.
CATEGORIES = (
    "capsule", "bottle", "carpet", "leather", "pill", "transistor", "tile", "cable",
    "zipper", "toothbrush", "metal_nut", "hazelnut", "screw", "grid", "wood",
)
TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood")
OBJECT_CATEGORIES = tuple(c for c in CATEGORIES if c not in TEXTURE_CATEGORIES)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ROTATE_IMAGE_PROBABILITY = 0.3  # training images are rotated by [-90, 90] degrees with this probability
IMAGE_ROTATION_DEGREES = 90.0
ANOMALY_PROBABILITY = 0.5
MAX_BETA = 0.8  # anomaly opacity: beta uniform in [0, 0.8)

# Unreadable files are reported as one DraemInputError line; OpenCV's own warnings would only add noise.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def resolve_categories(
    obj_id: str | int, known: Sequence[str] = CATEGORIES, data_root: str | os.PathLike | None = None
) -> list[str]:
    """Categories meant by a name, an integer id into `known` (int or text), or -1 for all of `known`.

    A name outside `known` is accepted when `data_root/<name>` is a folder: a category of your own
    laid out like MVTec AD.
    """
    text = str(obj_id).strip()
    if text in known or (data_root is not None and text and (Path(data_root) / text).is_dir()):
        return [text]
    try:
        number = int(text)
    except ValueError:
        number = None
    if number == -1:
        return list(known)
    if number is not None and 0 <= number < len(known):
        return [known[number]]
    raise DraemInputError(
        f"unknown category {obj_id!r}: use a name ({', '.join(known)}), an id 0..{len(known) - 1}, or -1 for all"
    )


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
    """Ground-truth mask read in grayscale, resized like the images: float32 H x W x 1 in [0, 1] (spec §6)."""
    return to_float(_resize(_decode(path, cv2.IMREAD_GRAYSCALE), resize_shape))[..., None]


def to_chw(image: np.ndarray) -> np.ndarray:
    """H x W x C to a contiguous C x H x W array."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def _sorted_images(paths) -> list[Path]:
    """Image files among `paths`, sorted by their path text like the released programs' sorted(glob(...))."""
    return sorted((p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=str)


def find_anomaly_sources(path: str | os.PathLike) -> list[Path]:
    """Every .jpg/.jpeg/.png under `path`, recursively (so both dtd/ and dtd/images/ work), sorted."""
    path = Path(path)
    if not path.is_dir():
        raise DraemInputError(
            f"anomaly source folder {path} does not exist: pass the DTD folder (dtd/ or dtd/images/), "
            "or leave the option out to use random-noise sources"
        )
    sources = _sorted_images(path.rglob("*"))
    if not sources:
        raise DraemInputError(f"no .jpg/.jpeg/.png images under anomaly source folder {path}")
    return sources


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
    """One training sample as in spec §2, every random choice drawn from `rng`.

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


def _training_image_paths(root_dir: Path) -> list[Path]:
    if not root_dir.is_dir():
        raise DraemInputError(f"training folder {root_dir} does not exist: expected <mvtec>/<category>/train/good")
    paths = _sorted_images(root_dir.iterdir())
    if not paths:
        raise DraemInputError(f"no .png/.jpg/.jpeg training images in {root_dir}")
    return paths


def load_images(paths: Sequence[Path], resize_shape: tuple[int, int]) -> np.ndarray:
    """Decode and resize every image once, on a few threads (OpenCV releases the GIL): uint8 N x H x W x 3."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = pool.map(lambda p: read_image_uint8(p, resize_shape), paths)
        return np.stack(list(tqdm(images, total=len(paths), desc="loading training images", leave=False)))


class MVTecDRAEMTrainDataset(Dataset):
    """Synthetic-anomaly training samples from `<category>/train/good` (spec §2).

    Each item is a dict: image, augmented_image (float32 3 x H x W, BGR, [0, 1]), anomaly_mask
    (float32 1 x H x W, binary), has_anomaly (float32 (1,)), idx (the training image used).
    Without `anomaly_source_path` the anomaly sources are uniform noise (weaker than DTD).
    `source_cache_size` bounds the resized sources kept in memory per process (256x256: 192 KiB each).
    """

    def __init__(
        self,
        root_dir: str | os.PathLike,
        anomaly_source_path: str | os.PathLike | None = None,
        resize_shape: tuple[int, int] = (256, 256),
        source_cache_size: int = 512,
    ):
        self.root_dir = Path(root_dir)
        self.resize_shape = tuple(resize_shape)
        self.image_paths = _training_image_paths(self.root_dir)
        self.source_paths = [] if anomaly_source_path is None else find_anomaly_sources(anomaly_source_path)
        self.images = load_images(self.image_paths, self.resize_shape)
        self.source_cache_size = source_cache_size
        self._source_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        # The index is ignored, as in the released program: every item is an independent random draw.
        seed = int(torch.randint(2**62, ()).item())
        return make_training_sample(np.random.default_rng(seed), len(self.images), self.images.__getitem__, self.draw_source)

    def draw_source(self, rng: np.random.Generator) -> np.ndarray:
        """A uniformly drawn anomaly source, resized (uint8 H x W x 3); random noise when there is no source folder."""
        if not self.source_paths:
            return random_noise_source(self.resize_shape, rng)
        index = int(rng.integers(len(self.source_paths)))
        if index not in self._source_cache:
            if len(self._source_cache) >= self.source_cache_size:
                # Sources are drawn uniformly, so evicting the oldest entry is as good as least-recently-used.
                self._source_cache.pop(next(iter(self._source_cache)))
            self._source_cache[index] = read_image_uint8(self.source_paths[index], self.resize_shape)
        return self._source_cache[index]


class MVTecDRAEMTestDataset(Dataset):
    """Test images of `<category>/test/<defect>/*` sorted, with labels (`good` = 0) and ground-truth masks.

    Each item is a dict: image (float32 3 x H x W), has_anomaly (float32 (1,)), mask (float32
    1 x H x W in [0, 1], resized bilinearly and NOT thresholded: the evaluation applies the
    released uint8 cast), idx, path (str).
    """

    def __init__(self, root_dir: str | os.PathLike, resize_shape: tuple[int, int] = (256, 256)):
        self.root_dir = Path(root_dir)
        self.resize_shape = tuple(resize_shape)
        if not self.root_dir.is_dir():
            raise DraemInputError(f"test folder {self.root_dir} does not exist: expected <mvtec>/<category>/test")
        self.image_paths = _sorted_images(self.root_dir.glob("*/*"))
        if not self.image_paths:
            raise DraemInputError(f"no test images in {self.root_dir}/<defect>/ (expected e.g. test/good/000.png)")
        for path in self.image_paths:
            mask = self.mask_path(path)
            if mask is not None and not mask.is_file():
                raise DraemInputError(f"ground-truth mask {mask} is missing for test image {path}")

    def mask_path(self, image_path: Path) -> Path | None:
        """`<category>/ground_truth/<defect>/<stem>_mask.png`, or None for a `good` image."""
        defect = image_path.parent.name
        if defect == "good":
            return None
        return self.root_dir.parent / "ground_truth" / defect / f"{image_path.stem}_mask.png"

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, idx: int) -> dict:
        path = self.image_paths[idx]
        image = read_image(path, self.resize_shape)
        mask_path = self.mask_path(path)
        if mask_path is None:
            mask = np.zeros((*self.resize_shape, 1), dtype=np.float32)
        else:
            mask = read_mask(mask_path, self.resize_shape)
        return {
            "image": to_chw(image),
            "has_anomaly": np.array([float(mask_path is not None)], dtype=np.float32),
            "mask": to_chw(mask),
            "idx": idx,
            "path": str(path),
        }


def worker_init_fn(worker_id: int) -> None:
    """DataLoader hook: seed NumPy's and Python's global generators from this worker's torch seed.

    Recent torch already gives each worker its own NumPy/Python seeds; this keeps that guarantee
    explicit (forked workers would otherwise all inherit the parent's NumPy state).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy's and Python's global generators in this process."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
