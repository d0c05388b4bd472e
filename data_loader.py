"""The datasets, the CPU sample synthesis and the training DataLoader (METHOD.md §2; paper §3.3).

One training sample: a training image (rotated with probability 0.3), and with probability 0.5 an
anomaly: a Perlin mask (perlin.py) cuts a region out of an augmented anomaly source (augment.py) and
blends it into the image with a random opacity. The numbers of the method are written here once; the
device path (device_synthesis.py) imports them.

Training samples are random as in the released program (the dataset index is ignored) yet
reproducible. Each sample draws everything from its own NumPy Generator, seeded by one draw from
torch's random stream. torch seeds that stream per DataLoader worker (from the DataLoader's
generator), so a run is reproducible for any number of workers when the training script calls
`seed_everything(seed)` and builds its loader with `train_loader(...,
generator=torch.Generator().manual_seed(seed))`; no two workers share a stream.

Speed without changing a sample: training images are decoded and resized once (uint8, kept in
memory); resized anomaly sources go to a bounded cache; the Perlin noise is vectorised; each
image is converted to float32 exactly once; normal samples skip the work whose result they
would throw away (drawing a source, augmenting it, the Perlin mask).
"""
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from augment import augment_source, rotate
from perlin import perlin_mask
from util.errors import DraemInputError
from util.images import (
    check_mask_file,
    image_format,
    load_images,
    read_image,
    read_image_uint8,
    read_mask,
    read_nonzero_mask,
    to_chw,
    to_float,
)
from util.layouts import (
    MVTEC_MASK_SUFFIX,
    ImageRecord,
    evaluation_records,
    find_anomaly_sources,
    mvtec_test_records,
    training_folder_images,
)

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
    """Paste the augmented source into the image: (1 - beta) * source + beta * image inside the mask, image
    outside.

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


class TrainDataset(Dataset):
    """Synthetic-anomaly training samples (METHOD.md §2): the released MVTecDRAEMTrainDataset, for any layout.

    Give `root_dir` (an MVTec AD `train/good` folder) or `image_paths` (of any layout:
    `layouts.train_image_paths`).
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
            self.image_paths = training_folder_images(self.root_dir)
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
        return make_training_sample(np.random.default_rng(seed), len(self.images), self.images.__getitem__,
                                    self.draw_source)

    def draw_source(self, rng: np.random.Generator) -> np.ndarray:
        """A uniformly drawn anomaly source, resized (uint8 H x W x 3); random noise when there is no source
        folder."""
        if not self.source_paths:
            return random_noise_source(self.resize_shape, rng)
        index = int(rng.integers(len(self.source_paths)))
        if index not in self._source_cache:
            if len(self._source_cache) >= self.source_cache_size:
                # Sources are drawn uniformly, so evicting the oldest entry is as good as least-recently-used.
                self._source_cache.pop(next(iter(self._source_cache)))
            self._source_cache[index] = read_image_uint8(self.source_paths[index], self.resize_shape)
        return self._source_cache[index]


class TrainImageDataset(TrainDataset):
    """What the DataLoader hands to `synthesize_batch`: decoded, resized uint8 images, nothing else.

    The CPU-path training set (same constructor and image list, so the training script builds either alike)
    with another item: {"image": uint8 3×H×W, "source": uint8 3×H×W}, without "source" when
    there is no source folder (the device draws the noise). Training images are decoded once when the
    dataset is built and shared with forked workers; sources go through the CPU dataset's bounded
    cache. As on the CPU path the index is ignored: image and source are drawn uniformly from torch's
    (per-worker) random stream.
    """

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(int(torch.randint(2**62, ()).item()))
        item = {"image": torch.from_numpy(to_chw(self.images[int(rng.integers(len(self.images)))]))}
        if self.source_paths:
            item["source"] = torch.from_numpy(to_chw(self.draw_source(rng)))
        return item


class LabelledImageDataset(Dataset):
    """Test images with labels and ground-truth masks: the released MVTecDRAEMTestDataset, for any layout.

    The images of an MVTec AD `test` folder are `<category>/test/<defect>/*`, sorted.

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
            records = mvtec_test_records(self.root_dir)
        self.records = [(Path(image), None if mask is None else Path(mask), int(label))
                        for image, mask, label in records]
        if not self.records:
            raise DraemInputError("no test images were given")
        for image, mask, _ in self.records:  # checked now (a few bytes each), not after scoring half of them
            if not image.is_file():
                raise DraemInputError(f"test image {image} does not exist")
            image_format(image, "test image")
            if mask is not None:  # a file, or a folder of masks (MVTec LOCO AD): each of them checked
                if not mask.exists():
                    raise DraemInputError(f"ground-truth mask {mask} is missing for test image {image}")
                check_mask_file(mask)  # the readers (read_mask, nonzero_mask) rely on it
        self.image_paths = [image for image, _, _ in self.records]
        self._mask_paths = {image: mask for image, mask, _ in self.records}

    def mask_path(self, image_path: Path) -> Path | None:
        """The ground-truth mask of a test image of this dataset, or None (a `good` image, or a defect without
        a mask)."""
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


def make_test_dataset(
    layout: str,
    data_path: str | os.PathLike,
    category: str,
    resize_shape: tuple[int, int] = (256, 256),
    mask_suffix: str = MVTEC_MASK_SUFFIX,
) -> LabelledImageDataset:
    """The labelled test set of `category` in a dataset of `layout`; masks of the layouts other than mvtec
    count every non-zero pixel (MVTec LOCO AD's several masks per image merged)."""
    records = evaluation_records(layout, data_path, category, mask_suffix)
    mask_reader = read_mask if layout == "mvtec" else read_nonzero_mask
    return LabelledImageDataset(resize_shape=resize_shape, records=records, mask_reader=mask_reader)


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


def train_loader(
    dataset: Dataset, batch_size: int, workers: int, generator: torch.Generator, device: torch.device,
    sampler: Sampler | None = None, persistent_workers: bool = False, prefetch_factor: int = 4,
) -> DataLoader:
    """The training DataLoader: shuffled (unless a DDP `sampler` is given), seeded by `generator`, every
    worker seeded.

    Pinned memory (page-locked, so `.to(device, non_blocking=True)` overlaps the copy) only for CUDA.
    Without `persistent_workers` the workers are forked afresh each epoch and reseeded from
    `generator`, which is what makes --resume bitwise exact. With them (--synthesis gpu: no re-fork,
    caches stay warm, `prefetch_factor` batches ready per worker) they continue their random streams
    from epoch to epoch, so a resumed run is seeded and reproducible from its start but does not
    redraw the exact samples of an uninterrupted one.
    """
    settings: dict = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if persistent_workers and workers > 0:
        settings.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=generator, worker_init_fn=worker_init_fn, drop_last=False, **settings)
