"""Benchmark the training-sample synthesis: samples per second, ours next to the released program's way.

"released-style" does per sample what the released program does: decode and resize the training
image and the anomaly source from disk, Perlin noise in float64 NumPy with full-size gradient
tiles, all of it even for the half of the samples that end up normal. (imgaug itself no longer
installs; our augmentation functions stand in for it, so its own cost is left out.) "ours" is
TrainDataset: images decoded once, a bounded source cache, vectorised Perlin, no work
for normal samples. Ours gives the released program's samples for the same seed (masks bit for bit,
images to float32 rounding; tests/test_data_loader.py checks it against a reference written in the
tests). Both run on one core in the main process, then in N DataLoader workers.

    python -m tools.bench_synthesis               # demo images of MVTec size (1024 px), made in a temp folder
    python -m tools.bench_synthesis --train_dir mvtec/carpet/train/good --anomaly_source_path dtd/images
"""
import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from augment import augment_source, rotate
from data_loader import (
    ANOMALY_PROBABILITY,
    IMAGE_ROTATION_DEGREES,
    MAX_BETA,
    ROTATE_IMAGE_PROBABILITY,
    TrainDataset,
    blend_anomaly,
    worker_init_fn,
)
from perlin import MASK_ROTATION_DEGREES, MASK_THRESHOLD, PERLIN_SCALE_EXPONENTS
from util.atomic import atomic_write_text
from util.cli import ArgumentParser, at_least
from util.demo_data import make_demo_dataset
from util.errors import DraemInputError, one_line_errors
from util.images import read_image_uint8, to_chw, to_float


def released_style_perlin(shape: tuple[int, int], res: tuple[int, int],
                          rng: np.random.Generator) -> np.ndarray:
    """Perlin noise the way the released program computes it: float64, every corner's gradients tiled to full
    size."""
    cell = (shape[0] // res[0], shape[1] // res[1])
    offsets = np.stack(np.meshgrid(np.arange(shape[0]) / cell[0], np.arange(shape[1]) / cell[1],
                                   indexing="ij"), -1) % 1
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def corner(dy: int, dx: int) -> np.ndarray:
        tiled = gradients[dy : dy + res[0], dx : dx + res[1]].repeat(cell[0], axis=0).repeat(cell[1], axis=1)
        return (tiled * (offsets - np.array([dy, dx]))).sum(axis=-1)

    fade = 6 * offsets**5 - 15 * offsets**4 + 10 * offsets**3
    top = (corner(1, 0) - corner(0, 0)) * fade[..., 0] + corner(0, 0)
    bottom = (corner(1, 1) - corner(0, 1)) * fade[..., 0] + corner(0, 1)
    return math.sqrt(2) * ((bottom - top) * fade[..., 1] + top)


class ReleasedStyleDataset(Dataset):
    """The released program's per-sample cost: two decodes, float64 Perlin, no shortcut for normal samples."""

    def __init__(self, image_paths: list[Path], source_paths: list[Path], resize_shape: tuple[int, int]):
        self.image_paths, self.source_paths, self.resize_shape = image_paths, source_paths, resize_shape

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(int(torch.randint(2**62, ()).item()))
        idx = int(rng.integers(len(self.image_paths)))
        image = read_image_uint8(self.image_paths[idx], self.resize_shape)
        if rng.random() < ROTATE_IMAGE_PROBABILITY:
            image = rotate(image, rng.uniform(-IMAGE_ROTATION_DEGREES, IMAGE_ROTATION_DEGREES))
        image = image.astype(np.float32) / 255.0
        # drawn where ours draws it; the work below is done regardless
        anomalous = rng.random() < ANOMALY_PROBABILITY
        source = read_image_uint8(self.source_paths[int(rng.integers(len(self.source_paths)))],
                                  self.resize_shape)
        source = augment_source(source, rng)
        res = tuple(2 ** rng.integers(*PERLIN_SCALE_EXPONENTS, size=2))
        noise = rotate(released_style_perlin(self.resize_shape, res, rng),
                       rng.uniform(-MASK_ROTATION_DEGREES, MASK_ROTATION_DEGREES))
        mask = np.where(noise > MASK_THRESHOLD, 1.0, 0.0)[..., None]
        beta = rng.uniform(0.0, MAX_BETA)
        augmented = blend_anomaly(image, to_float(source), mask, beta).astype(np.float32)
        if not anomalous:
            augmented, mask = image, np.zeros_like(mask)
        return {"image": to_chw(image), "augmented_image": to_chw(augmented),
                "anomaly_mask": to_chw(mask.astype(np.float32)),
                "has_anomaly": np.array([float(mask.any())], dtype=np.float32), "idx": idx}


def samples_per_second(dataset: Dataset, samples: int, workers: int, batch_size: int) -> float:
    """Samples/s drawn through a DataLoader; the first batch (worker start-up) is not timed."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, worker_init_fn=worker_init_fn,
                        sampler=range(samples + batch_size), generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in batches:
        pass
    return samples / (time.perf_counter() - start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--train_dir",
                        help="a <category>/train/good folder; default: demo images made in a temp folder")
    parser.add_argument("--anomaly_source_path",
                        help="anomaly source folder (e.g. dtd/images); default: the demo textures")
    parser.add_argument("--size", type=at_least(32), default=256,
                        help="training resolution, pixels per side (default: 256)")
    parser.add_argument("--samples", type=at_least(1), default=200,
                        help="samples timed per measurement (default: 200)")
    parser.add_argument("--workers", type=at_least(0), default=os.cpu_count() or 1,
                        help="DataLoader workers for the multi-worker rows (default: CPU count)")
    parser.add_argument("--batch_size", type=at_least(1), default=8,
                        help="DataLoader batch size (default: 8, the released one)")
    parser.add_argument("--demo_image_size", type=at_least(32), default=1024,
                        help="side of the demo images when no --train_dir is given (default: 1024, as "
                             "MVTec's textures)")
    parser.add_argument("--seed", type=at_least(0), default=0,
                        help="seed of torch's generator, hence of the samples drawn (default: 0)")
    parser.add_argument("--output", "--out", dest="output", default="results/bench_synthesis.json",
                        help="JSON file for the results (default: results/bench_synthesis.json)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, train_dir: Path, source_dir: Path) -> dict:
    shape = (args.size, args.size)
    start = time.perf_counter()
    ours = TrainDataset(train_dir, source_dir, shape)
    load_seconds = time.perf_counter() - start
    released = ReleasedStyleDataset(ours.image_paths, ours.source_paths, shape)
    rows = []
    for workers in (0, args.workers):
        for name, dataset in (("released-style", released), ("ours", ours)):
            torch.manual_seed(args.seed)
            rate = samples_per_second(dataset, args.samples, workers, args.batch_size)
            rows.append({"path": name, "workers": workers, "samples_per_s": rate,
                         "per_core": rate / max(workers, 1)})
            print(f"{name:15s} {'main' if workers == 0 else workers:>7} {rate:12.1f} "
                  f"{rate / max(workers, 1):10.1f}")
    single = {r["path"]: r["samples_per_s"] for r in rows if r["workers"] == 0}
    return {
        "train_dir": str(train_dir), "anomaly_source_path": str(source_dir), "size": args.size,
        "images": len(ours), "sources": len(ours.source_paths),
        "original_image_shape": list(cv2.imread(str(ours.image_paths[0])).shape),
        "samples": args.samples, "batch_size": args.batch_size, "one_off_load_s": load_seconds,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "rows": rows,
        "speedup_per_core": single["ours"] / single["released-style"],
    }


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # One thread per process, so "main" is one core and N workers are N cores.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as scratch:
        if args.train_dir is None:
            print(f"making demo images ({args.demo_image_size} px) in a temporary folder ...")
            demo = make_demo_dataset(scratch, image_size=args.demo_image_size, categories=("brick",),
                                     n_test_good=0, n_test_per_defect=0)
            train_dir, source_dir = demo.mvtec_root / "brick" / "train" / "good", demo.texture_root
        elif args.anomaly_source_path is None:
            raise DraemInputError("--train_dir needs --anomaly_source_path too: "
                                  "the released-style path reads a source per sample")
        else:
            train_dir, source_dir = Path(args.train_dir), args.anomaly_source_path
        print(f"{'path':15s} {'workers':>7} {'samples/s':>12} {'per core':>10}")
        result = run(args, train_dir, source_dir)
    print(f"speed-up per core (main process): {result['speedup_per_core']:.1f}x")
    atomic_write_text(args.output, json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
