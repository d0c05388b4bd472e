"""Score your own images with a trained DRAEM checkpoint: one image score per file, optional heat maps.

    python predict.py --checkpoint_path checkpoints --base_model_name DRAEM_test_0.0001_700_bs8 \\
        --obj_id carpet --input my_images --output_dir predictions --save_images

Every image under --input (recursively: png, jpg, jpeg, bmp, tif, tiff; or one image file) is
read and resized exactly as the test program reads test images, and scored with the test
protocol's image score (max of the 21×21 average-pooled anomaly map), so a score here equals the
score test_draem.py gives the same image. Results go to <output_dir>/scores.csv, one row per file
in sorted path order; a file that cannot be read gets an empty score and its error, and the run
goes on. With --save_images, <output_dir>/overlays/<path relative to --input>.png shows each image
beside its anomaly heat map.

Thresholds: when the checkpoint pair has a threshold file (tools/calibrate.py, calibrated without the test
set), its image threshold adds an is_anomalous column (1 where image score >= threshold), and with
--save_images its pixel threshold gives a binary defect mask per image,
<output_dir>/masks/<path relative to --input>.png (255 where anomaly map >= pixel threshold, else 0).
--threshold replaces the file's image threshold (the masks keep the file's pixel threshold).
"""
import argparse
import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from engine.evaluation import DraemScorer
from model_unet import check_image_size, model_from_checkpoint
from util.atomic import atomic_write_text, check_output_files, check_output_folder
from util.cli import (
    ArgumentParser,
    add_checkpoint_flags,
    add_device_flags,
    add_fast_flags,
    add_image_size_flag,
    at_least,
    finite_float,
)
from util.errors import DraemInputError, one_line_errors
from util.images import FOLDER_IMAGE_SUFFIXES, find_images, image_shape, read_image, to_chw
from util.pictures import heatmap_overlay, save_png
from util.runtime import prepare_model, select_device
from util.thresholds import thresholds_in_use

CSV_NAME = "scores.csv"
OVERLAY_DIR = "overlays"
MASK_DIR = "masks"


def input_images(input_path: str | Path, skip_dir: str | Path | None = None) -> list[Path]:
    """The image files under a folder (recursively, sorted), or the one image file given.

    Files under `skip_dir` are left out, so an output folder inside the input folder does not get its
    own overlays scored on the next run.
    """
    input_path = Path(input_path)
    if input_path.is_file():
        if input_path.suffix.lower() not in FOLDER_IMAGE_SUFFIXES:
            raise DraemInputError(f"--input {input_path} is not an image file "
                                  f"(expected one of {', '.join(FOLDER_IMAGE_SUFFIXES)})")
        return [input_path]
    return find_images(input_path, "--input", hint=" (give an image file or a folder of images)",
                       skip=skip_dir)


class ImageFiles(Dataset):
    """Reads image files with the project's test preprocessing; an unreadable file yields its error
    instead."""

    def __init__(self, paths: list[Path], image_size: int | tuple[int, int]):
        self.paths = paths
        self.resize_shape = image_shape(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        """(index, 3×H×W BGR float image or None, error message or '')."""
        try:
            image = read_image(self.paths[index], self.resize_shape)
        except DraemInputError as exc:
            return index, None, str(exc)
        return index, to_chw(image), ""


def output_image_path(output_dir: Path, folder: str, input_path: Path, image_path: Path) -> Path:
    """Where an image's overlay or mask goes: `<output_dir>/<folder>/<path relative to --input>.png`.

    `.png` is appended rather than substituted, so a.png and a.jpg get different files.
    """
    relative = image_path.relative_to(input_path) if input_path.is_dir() else Path(image_path.name)
    return output_dir / folder / relative.parent / f"{relative.name}.png"


def defect_mask(amap: torch.Tensor, pixel_threshold: float) -> np.ndarray:
    """Binary defect mask H×W uint8 of a 1×H×W anomaly map: 255 where the map >= `pixel_threshold`, else 0."""
    # In float64, like the image scores: torch would round the threshold to the map's float32 first.
    return (amap[0].double() >= pixel_threshold).numpy().astype(np.uint8) * np.uint8(255)


@torch.no_grad()
def predict(
    scorer: DraemScorer, paths: list[Path], image_size: int | tuple[int, int], device: torch.device,
    batch_size: int = 8, num_workers: int = 0,
    on_scored: Callable[[int, np.ndarray, torch.Tensor, float], None] | None = None,
) -> tuple[list[float | None], list[str]]:
    """Score `paths` in order; return (score or None, error or '') per path.

    `on_scored(index, image 3×H×W, anomaly map 1×H×W, score)` is called for each scored image (overlays).
    """
    scores: list[float | None] = [None] * len(paths)
    errors = [""] * len(paths)
    loader = DataLoader(ImageFiles(paths, image_size), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=list)
    scorer.eval().to(device)
    for batch in tqdm(loader, desc="predict", unit="batch", dynamic_ncols=True):
        for index, _, error in batch:
            errors[index] = error
        readable = [(index, image) for index, image, _ in batch if image is not None]
        if not readable:
            continue
        images = torch.from_numpy(np.stack([image for _, image in readable]))
        amaps, batch_scores = scorer(images.to(device))
        for (index, image), amap, score in zip(readable, amaps.cpu(), batch_scores.tolist()):
            scores[index] = score
            if on_scored is not None:
                on_scored(index, image, amap, score)
    return scores, errors


def scores_csv(paths: list[Path], scores: list[float | None], errors: list[str],
               threshold: float | None) -> str:
    """CSV text: path, image_score, [is_anomalous (score >= threshold)], error; empty cells for unread
    files."""
    buffer = io.StringIO()
    columns = ["path", "image_score"] + (["is_anomalous"] if threshold is not None else []) + ["error"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for path, score, error in zip(paths, scores, errors):
        # repr keeps every digit, so the CSV holds exactly the float32 score that was computed.
        row = {"path": str(path), "image_score": "" if score is None else repr(score), "error": error}
        if threshold is not None:
            row["is_anomalous"] = "" if score is None else int(score >= threshold)
        writer.writerow(row)
    return buffer.getvalue()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    add_checkpoint_flags(parser)
    parser.add_argument("--input", required=True,
                        help="an image file, or a folder searched recursively for images")
    parser.add_argument("--output_dir", required=True, help="folder for scores.csv and the overlays")
    parser.add_argument("--threshold", type=finite_float, default=None,
                        help="image threshold (finite) of the is_anomalous column (1 where image score >= "
                             "threshold, else 0); default: the image threshold of the checkpoint pair's "
                             "threshold file, if it has one")
    parser.add_argument("--save_images", action="store_true",
                        help="save a heat-map overlay per image under <output_dir>/overlays and, when the "
                             "threshold file gives a pixel threshold, a 0/255 defect mask per image under "
                             "<output_dir>/masks")
    add_image_size_flag(parser)
    parser.add_argument("--batch_size", type=at_least(1), default=8,
                        help="images per forward pass (any value gives the same scores)")
    parser.add_argument("--workers", "--num_workers", dest="workers", type=at_least(0), default=0,
                        help="image-reading worker processes (0: read in the main process)")
    add_device_flags(parser)
    add_fast_flags(parser)
    return parser.parse_args(argv)


@one_line_errors
def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    check_image_size(args.image_size)
    paths = input_images(args.input, skip_dir=args.output_dir)
    device = select_device(args.device, args.gpu_id)
    model = prepare_model(model_from_checkpoint(args.checkpoint_path, args.base_model_name,
                                                args.obj_id).to(device),
                          args.channels_last, args.compile)
    scorer = DraemScorer(model, args.precision, args.channels_last)
    output_dir = Path(args.output_dir)
    threshold, threshold_source, pixel_threshold, threshold_file = thresholds_in_use(
        args.checkpoint_path, args.base_model_name, args.obj_id, args.image_size, args.threshold)
    # Before the first image: where the results go.
    check_output_folder(output_dir, "--output_dir")
    check_output_files([output_dir / CSV_NAME], "the scores table")
    if args.save_images:
        check_output_folder(output_dir / OVERLAY_DIR, "the overlay folder of --save_images")
        if pixel_threshold is not None:
            check_output_folder(output_dir / MASK_DIR, "the mask folder of --save_images")

    def save_images(index: int, image: np.ndarray, amap: torch.Tensor, score: float) -> None:
        save_png(output_image_path(output_dir, OVERLAY_DIR, Path(args.input), paths[index]),
                 heatmap_overlay(image, amap, score=score))
        if pixel_threshold is not None:
            save_png(output_image_path(output_dir, MASK_DIR, Path(args.input), paths[index]),
                     defect_mask(amap, pixel_threshold))

    scores, errors = predict(scorer, paths, args.image_size, device, args.batch_size, args.workers,
                             on_scored=save_images if args.save_images else None)
    csv_path = output_dir / CSV_NAME
    atomic_write_text(csv_path, scores_csv(paths, scores, errors, threshold))
    failed = sum(1 for error in errors if error)
    summary = f"scored {len(paths) - failed} of {len(paths)} images"
    if failed:
        summary += f"; {failed} could not be read (see the error column)"
    if threshold is not None:
        called = sum(1 for s in scores if s is not None and s >= threshold)
        summary += f"; {called} at or above image threshold {threshold:.6g} ({threshold_source})"
    else:
        summary += (f"; no threshold ({threshold_file} not found: run python -m tools.calibrate, or give "
                    f"--threshold)")
    if args.save_images and pixel_threshold is not None:
        summary += f"; defect masks at pixel threshold {pixel_threshold:.6g} in {output_dir / MASK_DIR}"
    print(f"{summary}; wrote {csv_path}")
    return csv_path


if __name__ == "__main__":
    main()
