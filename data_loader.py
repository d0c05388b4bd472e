"""Data for DRAEM: dataset layouts, category lists, THE image preprocessing, training-sample synthesis (spec §1, §2).

Dataset layouts (`LAYOUTS`; the scripts' --dataset), all read into the same two datasets:
- mvtec: MVTec AD, `<root>/<category>/train/good/*.png`, `test/<good|defect>/*.png`, masks
  `ground_truth/<defect>/<stem>_mask.png` (0/255, read as value / 255). Every defect image needs its mask.
- folder: your own images laid out like MVTec AD, `<root>/<category>/train/good/*`,
  `test/<good|defect>/*` (png, jpg, jpeg, bmp, tif, tiff), optional masks
  `ground_truth/<defect>/<stem><mask_suffix>.<png|bmp|tif|tiff>` where every non-zero pixel is
  anomalous (so 0/1 and 0/255 masks both work; JPEG masks are refused: their compression noise
  would mark stray pixels). A defect image without a mask is allowed: it counts as anomalous
  with an all-zero mask, so image metrics stay valid while pixel metrics treat its pixels as
  normal (NaN, with a warning, when no defect image has a mask).
- visa: VisA as published, `<root>/split_csv/1cls.csv` with the columns object,split,label,image,mask
  (paths relative to <root>, label `normal` or `anomaly`, mask empty for normal images). VisA's
  masks mark defects with small non-zero values (1, not 255); like VisA's own preparation script
  (amazon-science/spot-diff prepare_data.py: mask != 0 becomes 255) every non-zero pixel is
  anomalous, so masks read as they would after converting VisA to the MVTec layout.

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
import csv
import os
import random
import warnings
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

# VisA's objects in its published order (split_csv/1cls.csv).
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
LAYOUTS = ("mvtec", "folder", "visa")
ImageRecord = tuple[Path, Path | None, int]  # (test image, its mask or None, label: 0 good, 1 anomalous)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # MVTec AD's training and test images, and anomaly sources
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
GOOD = "good"
MVTEC_MASK_SUFFIX = "_mask"
VISA_SPLIT_FILE = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}
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


def _sorted_images(paths, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files among `paths`, sorted by their path text like the released programs' sorted(glob(...))."""
    return sorted((p for p in paths if p.suffix.lower() in suffixes and p.is_file()), key=str)


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


def _training_image_paths(root_dir: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES, root: str = "<mvtec>") -> list[Path]:
    if not root_dir.is_dir():
        raise DraemInputError(f"training folder {root_dir} does not exist: expected {root}/<category>/train/good")
    paths = _sorted_images(root_dir.iterdir(), suffixes)
    if not paths:
        raise DraemInputError(f"no {'/'.join(suffixes)} training images in {root_dir}")
    return paths


def load_images(paths: Sequence[Path], resize_shape: tuple[int, int]) -> np.ndarray:
    """Decode and resize every image once, on a few threads (OpenCV releases the GIL): uint8 N x H x W x 3."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = pool.map(lambda p: read_image_uint8(p, resize_shape), paths)
        return np.stack(list(tqdm(images, total=len(paths), desc="loading training images", leave=False)))


class MVTecDRAEMTrainDataset(Dataset):
    """Synthetic-anomaly training samples from `<category>/train/good`, or from a list of images of any layout (spec §2).

    Give `root_dir` (an MVTec AD `train/good` folder) or `image_paths` (see `make_train_dataset`).
    Each item is a dict: image, augmented_image (float32 3 x H x W, BGR, [0, 1]), anomaly_mask
    (float32 1 x H x W, binary), has_anomaly (float32 (1,)), idx (the training image used).
    Without `anomaly_source_path` the anomaly sources are uniform noise (weaker than DTD).
    `source_cache_size` bounds the resized sources kept in memory per process (256x256: 192 KiB each).
    """

    def __init__(
        self,
        root_dir: str | os.PathLike | None = None,
        anomaly_source_path: str | os.PathLike | None = None,
        resize_shape: tuple[int, int] = (256, 256),
        source_cache_size: int = 512,
        *,
        image_paths: Sequence[str | os.PathLike] | None = None,
    ):
        if (root_dir is None) == (image_paths is None):
            raise ValueError("give either root_dir or image_paths")
        self.root_dir = None if root_dir is None else Path(root_dir)
        self.resize_shape = tuple(resize_shape)
        if image_paths is None:
            self.image_paths = _training_image_paths(self.root_dir)
        else:
            self.image_paths = [Path(path) for path in image_paths]
        if not self.image_paths:
            raise DraemInputError("no training images were given")
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
    """Test images with labels and ground-truth masks: `<category>/test/<defect>/*` sorted, or records of any layout.

    Give `root_dir` (an MVTec AD `test` folder: label `good` = 0, masks
    `ground_truth/<defect>/<stem>_mask.png`) or `records`, a list of (image, mask or None, label)
    (see `evaluation_records`); `mask_reader` reads a mask file (`read_nonzero_mask` for 0/1 masks).
    Each item is a dict: image (float32 3 x H x W), has_anomaly (float32 (1,)), mask (float32
    1 x H x W in [0, 1], resized bilinearly and NOT thresholded: the evaluation applies the
    released uint8 cast; all zeros without a mask file), idx, path (str).
    """

    def __init__(
        self,
        root_dir: str | os.PathLike | None = None,
        resize_shape: tuple[int, int] = (256, 256),
        *,
        records: Sequence[ImageRecord] | None = None,
        mask_reader: Callable[[Path, tuple[int, int]], np.ndarray] = read_mask,
    ):
        if (root_dir is None) == (records is None):
            raise ValueError("give either root_dir or records")
        self.root_dir = None if root_dir is None else Path(root_dir)
        self.resize_shape = tuple(resize_shape)
        self.mask_reader = mask_reader
        if records is None:
            records = _mvtec_test_records(self.root_dir)
        self.records = [(Path(image), None if mask is None else Path(mask), int(label)) for image, mask, label in records]
        if not self.records:
            raise DraemInputError("no test images were given")
        for image, mask, _ in self.records:
            if not image.is_file():
                raise DraemInputError(f"test image {image} does not exist")
            if mask is not None and not mask.is_file():
                raise DraemInputError(f"ground-truth mask {mask} is missing for test image {image}")
        self.image_paths = [image for image, _, _ in self.records]
        self._mask_paths = {image: mask for image, mask, _ in self.records}

    def mask_path(self, image_path: Path) -> Path | None:
        """The ground-truth mask of a test image of this dataset, or None (a `good` image, or a defect without a mask)."""
        return self._mask_paths[Path(image_path)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict:
        path, mask_path, label = self.records[idx]
        image = read_image(path, self.resize_shape)
        if mask_path is None:
            mask = np.zeros((*self.resize_shape, 1), dtype=np.float32)
        else:
            mask = self.mask_reader(mask_path, self.resize_shape)
        return {
            "image": to_chw(image),
            "has_anomaly": np.array([float(label)], dtype=np.float32),
            "mask": to_chw(mask),
            "idx": idx,
            "path": str(path),
        }


# --- dataset layouts: every layout gives training image paths and test records -----------------

def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise DraemInputError(f"unknown dataset layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


def _test_images(test_dir: Path, suffixes: Sequence[str], root: str) -> list[Path]:
    """`test_dir/<good|defect>/*` images, sorted."""
    if not test_dir.is_dir():
        raise DraemInputError(f"test folder {test_dir} does not exist: expected {root}/<category>/test")
    images = _sorted_images(test_dir.glob("*/*"), suffixes)
    if not images:
        raise DraemInputError(f"no test images in {test_dir}/<defect>/ (expected e.g. test/good/000.png)")
    return images


def _mvtec_test_records(test_dir: Path, mask_suffix: str = MVTEC_MASK_SUFFIX) -> list[ImageRecord]:
    """MVTec AD: `good` images are normal; every other image needs `ground_truth/<defect>/<stem><mask_suffix>.png`."""
    records = []
    for image in _test_images(test_dir, IMAGE_SUFFIXES, "<mvtec>"):
        if image.parent.name == GOOD:
            records.append((image, None, 0))
            continue
        mask = test_dir.parent / "ground_truth" / image.parent.name / f"{image.stem}{mask_suffix}.png"
        if not mask.is_file():
            raise DraemInputError(f"ground-truth mask {mask} is missing for test image {image}")
        records.append((image, mask, 1))
    return records


def _folder_mask(mask_dir: Path, image: Path, mask_suffix: str) -> Path | None:
    """`mask_dir/<stem><mask_suffix>.<png|bmp|tif|tiff>` (either case of the suffix), or None; a JPEG mask is refused."""
    suffixes = [case for suffix in FOLDER_IMAGE_SUFFIXES for case in (suffix, suffix.upper())]
    candidates = (mask_dir / f"{image.stem}{mask_suffix}{suffix}" for suffix in suffixes)
    mask = next((path for path in candidates if path.is_file()), None)
    if mask is not None and mask.suffix.lower() in LOSSY_SUFFIXES:
        raise DraemInputError(f"ground-truth mask {mask} is a JPEG, whose compression noise would mark stray pixels: save it as PNG")
    return mask


def _folder_test_records(test_dir: Path, mask_suffix: str) -> list[ImageRecord]:
    """Generic folder: `good` images are normal, every other one anomalous, with its mask when there is one."""
    records = []
    for image in _test_images(test_dir, FOLDER_IMAGE_SUFFIXES, "<data_path>"):
        if image.parent.name == GOOD:
            records.append((image, None, 0))
        else:
            records.append((image, _folder_mask(test_dir.parent / "ground_truth" / image.parent.name, image, mask_suffix), 1))
    defects = [mask for _, mask, label in records if label == 1]
    if defects.count(None):
        warnings.warn(
            f"{defects.count(None)} of {len(defects)} defect images in {test_dir} have no ground-truth mask "
            f"(ground_truth/<defect>/<stem>{mask_suffix}.png): their pixels count as normal in the pixel metrics "
            "(NaN when no image has a mask); image metrics are unaffected",
            RuntimeWarning,
            stacklevel=3,
        )
    return records


def _visa_split_file(data_path: str | os.PathLike) -> Path:
    split_file = Path(data_path) / VISA_SPLIT_FILE
    if not split_file.is_file():
        raise DraemInputError(
            f"VisA split file {split_file} not found: VisA's layout is <root>/split_csv/1cls.csv beside "
            "<root>/candle/Data/..., as downloaded; point the data path at that root"
        )
    return split_file


def _check_visa_row(row: dict[str, str], where: str) -> None:
    """A row of 1cls.csv: an image, train or test, normal or anomaly, no anomaly in train, a mask for every anomaly."""
    if not row["image"]:
        raise DraemInputError(f"{where}: no image path")
    if row["split"] not in ("train", "test"):
        raise DraemInputError(f"{where}: split {row['split']!r} is neither train nor test")
    if row["label"] not in VISA_LABELS:
        raise DraemInputError(f"{where}: label {row['label']!r} is neither normal nor anomaly")
    anomalous = VISA_LABELS[row["label"]] == 1
    if anomalous and row["split"] == "train":
        raise DraemInputError(f"{where}: an anomalous training image; DRAEM trains on normal images only (use 1cls.csv)")
    if anomalous and not row["mask"]:
        raise DraemInputError(f"{where}: anomalous image {row['image']} has no mask")


def _visa_rows(data_path: str | os.PathLike, category: str, split: str) -> list[ImageRecord]:
    """The rows of `category` and `split` in VisA's 1cls.csv, in file order, as (image, mask or None, label)."""
    split_file = _visa_split_file(data_path)
    with split_file.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        missing = [column for column in VISA_COLUMNS if column not in (reader.fieldnames or ())]
        if missing:
            raise DraemInputError(f"{split_file} has no column {', '.join(missing)}: VisA's header is {','.join(VISA_COLUMNS)}")
        rows = [(line, {key: (row[key] or "").strip() for key in VISA_COLUMNS}) for line, row in enumerate(reader, start=2)]
    objects = sorted({row["object"] for _, row in rows})
    if category not in objects:
        raise DraemInputError(f"{split_file} has no rows for object {category!r}; it has {', '.join(objects) or 'none'}")
    for line, row in rows:
        _check_visa_row(row, f"{split_file} line {line}")
    records = []
    for _, row in rows:
        if row["object"] == category and row["split"] == split:
            label = VISA_LABELS[row["label"]]
            records.append((Path(data_path) / row["image"], Path(data_path) / row["mask"] if label else None, label))
    if not records:
        raise DraemInputError(f"{split_file} has no {split} rows for object {category!r}")
    return records


def train_image_paths(layout: str, data_path: str | os.PathLike, category: str) -> list[Path]:
    """The training (normal) images of `category` in a dataset of `layout` (see LAYOUTS and the module docstring)."""
    if _check_layout(layout) == "visa":
        return [image for image, _, _ in _visa_rows(data_path, category, "train")]
    train_dir = Path(data_path) / category / "train" / GOOD
    if layout == "mvtec":
        return _training_image_paths(train_dir)
    return _training_image_paths(train_dir, FOLDER_IMAGE_SUFFIXES, "<data_path>")


def evaluation_records(
    layout: str, data_path: str | os.PathLike, category: str, mask_suffix: str = MVTEC_MASK_SUFFIX
) -> list[ImageRecord]:
    """The test images of `category` as (image, mask or None, label 0 good / 1 anomalous) records.

    `mask_suffix` names masks `<stem><mask_suffix>.<ext>` in the mvtec and folder layouts; VisA's
    split file names its masks itself.
    """
    if _check_layout(layout) == "visa":
        if mask_suffix != MVTEC_MASK_SUFFIX:
            raise DraemInputError(f"a mask suffix ({mask_suffix!r}) applies to the mvtec and folder layouts; VisA's 1cls.csv names its masks")
        return _visa_rows(data_path, category, "test")
    test_dir = Path(data_path) / category / "test"
    if layout == "mvtec":
        return _mvtec_test_records(test_dir, mask_suffix)
    return _folder_test_records(test_dir, mask_suffix)


def make_train_dataset(
    layout: str,
    data_path: str | os.PathLike,
    category: str,
    anomaly_source_path: str | os.PathLike | None = None,
    resize_shape: tuple[int, int] = (256, 256),
    dataset_class: type[MVTecDRAEMTrainDataset] = MVTecDRAEMTrainDataset,
) -> MVTecDRAEMTrainDataset:
    """The synthetic-anomaly training set of `category` in a dataset of `layout`.

    `dataset_class` may be a subclass with other items, e.g. synthesis_gpu.RawTrainDataset.
    """
    paths = train_image_paths(layout, data_path, category)
    return dataset_class(anomaly_source_path=anomaly_source_path, resize_shape=resize_shape, image_paths=paths)


def make_test_dataset(
    layout: str,
    data_path: str | os.PathLike,
    category: str,
    resize_shape: tuple[int, int] = (256, 256),
    mask_suffix: str = MVTEC_MASK_SUFFIX,
) -> MVTecDRAEMTestDataset:
    """The labelled test set of `category` in a dataset of `layout`; folder and VisA masks count every non-zero pixel."""
    records = evaluation_records(layout, data_path, category, mask_suffix)
    mask_reader = read_mask if layout == "mvtec" else read_nonzero_mask
    return MVTecDRAEMTestDataset(resize_shape=resize_shape, records=records, mask_reader=mask_reader)


def _folder_categories(data_path: str | os.PathLike) -> list[str]:
    """Sub-folders of `data_path` that hold train/good, sorted."""
    root = Path(data_path)
    if not root.is_dir():
        raise DraemInputError(f"data path {root} does not exist: the folder layout is <data_path>/<category>/train/good")
    return sorted(child.name for child in root.iterdir() if (child / "train" / GOOD).is_dir())


def categories_for(layout: str, obj_id: str | int, data_path: str | os.PathLike) -> list[str]:
    """The categories meant by `obj_id` (a name, an id into the layout's list, or -1 for all of them).

    mvtec: `resolve_categories` over CATEGORIES; visa: over VISA_CATEGORIES; folder: over the
    sub-folders of data_path that hold train/good (-1: all of them). In every layout a name with a
    folder under data_path is accepted too.
    """
    if _check_layout(layout) == "mvtec":
        return resolve_categories(obj_id, CATEGORIES, data_path)
    if layout == "visa":
        _visa_split_file(data_path)
        return resolve_categories(obj_id, VISA_CATEGORIES, data_path)
    known, name = _folder_categories(data_path), str(obj_id).strip()
    if not known and not (name and (Path(data_path) / name).is_dir()):
        raise DraemInputError(f"no category folder with train/good under {data_path}: expected <data_path>/<category>/train/good")
    return resolve_categories(obj_id, known, data_path)


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
