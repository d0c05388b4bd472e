"""Write an MVTec AD 2 submission: every private image's anomaly map and binary mask, then check the tree.

    python -m tools.write_ad2_submission --data_path datasets/mvtec_ad2 --checkpoint_path checkpoints \\
        --base_model_name DRAEM_test_0.0001_700_bs8 --obj_id can --image_size 256 512 --output_dir submission

For each object (--obj_id, default -1: all 8) and each private split (test_private, test_private_mixed),
every image is scored by the test protocol at --image_size, and its map is resized back to the image's
own size (util/ad2.py) and written as
  <output_dir>/anomaly_images/<object>/<split>/<stem>.tiff             one channel, float16, continuous
  <output_dir>/anomaly_images_thresholded/<object>/<split>/<stem>.png  one channel, 0 and 255 only
with the thresholds of the checkpoint pair's threshold file (tools.calibrate; for AD 2, --rule mean_std
calibrates on validation/good, the organisers' baseline recipe). Then the whole output folder is checked:
one map and one mask per private image of every object in it and nothing else, float16 one-channel maps,
0/255 one-channel masks, each at its image's size. The expected files are the images found in the
dataset's private folders; the challenge's counts per split (AD2_PRIVATE_COUNTS) are checked as well when
the submission holds all 8 objects or with --official_counts. A wrong count, type or value, a missing or
an extra file is refused with one line (exit 1). --check_only checks an existing output folder without
writing. Objects written by an earlier run into the same folder are checked along, so objects can be
written one at a time, each at its own --image_size.
"""
import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_loader import LabelledImageDataset
from engine.evaluation import DraemScorer
from model_unet import check_image_size, model_from_checkpoint
from util.ad2 import (
    MAPS_DIR,
    MASK_SUFFIX,
    MASKS_DIR,
    Expected,
    check_submission,
    full_resolution_map,
    png_bytes,
    submission_mask,
    tiff_bytes,
    uses_official_counts,
)
from util.atomic import atomic_write_bytes
from util.checkpoints import run_base_name
from util.cli import ArgumentParser, add_device_flags, add_image_size_flag, at_least, plain_name
from util.errors import DraemInputError, one_line_errors
from util.images import stored_shape
from util.layouts import AD2_OBJECTS, AD2_PRIVATE_SPLITS, ad2_private_images, categories_for
from util.runtime import select_device
from util.thresholds import threshold_path, usable_thresholds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data_path", required=True,
                        help="MVTec AD 2 root: the folder holding <object>/test_private")
    parser.add_argument("--output_dir", required=True,
                        help="folder for anomaly_images/ and anomaly_images_thresholded/ (and nothing else)")
    parser.add_argument("--checkpoint_path", help="folder of the checkpoint pairs and their threshold files")
    parser.add_argument("--base_model_name", default=run_base_name(1e-4, 700, 8), type=plain_name,
                        help="checkpoint base name: files <base>_<object>_.pckl, "
                             "<base>_<object>__seg.pckl and <base>_<object>_threshold.json (default: what "
                             "train_draem.py writes with the paper's settings)")
    parser.add_argument("--obj_id", "--category", dest="obj_id", default="-1", type=plain_name,
                        help=f"an object ({', '.join(AD2_OBJECTS)}), its index, or -1 for all 8")
    add_image_size_flag(parser)
    parser.add_argument("--batch_size", type=at_least(1), default=8, help="images per forward pass")
    parser.add_argument("--workers", type=at_least(0), default=0, help="image-reading worker processes")
    parser.add_argument("--official_counts", action="store_true",
                        help="also require the challenge's image count per private split of every object")
    parser.add_argument("--check_only", action="store_true",
                        help="only check an existing --output_dir, write nothing")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    if not args.check_only and args.checkpoint_path is None:
        parser.error("--checkpoint_path is required (or use --check_only)")
    return args


def expected_files(data_path: str | Path, objects: list[str]) -> Expected:
    """Per object and private split, each image's stem and (height, width): what a submission must hold."""
    return {category: {split: {path.stem: stored_shape(path)
                               for path in ad2_private_images(data_path, category, split)}
                       for split in AD2_PRIVATE_SPLITS}
            for category in objects}


def objects_in(output_dir: Path) -> set[str]:
    """The object folders already in a submission tree (anything else is the check's to refuse)."""
    return {entry.name for tree in (MAPS_DIR, MASKS_DIR) if (output_dir / tree).is_dir()
            for entry in (output_dir / tree).iterdir() if entry.name in AD2_OBJECTS}


@torch.no_grad()
def write_object(args: argparse.Namespace, category: str, device: torch.device,
                 shapes: Mapping[str, Mapping[str, tuple[int, int]]]) -> int:
    """Score one object's private images and write their maps and masks at their stored sizes (`shapes`: per
    split, each image's stem and (height, width), as expected_files read them); return how many images."""
    thresholds = usable_thresholds(args.checkpoint_path, args.base_model_name, category, args.image_size)
    if thresholds is None:
        path = threshold_path(args.checkpoint_path, args.base_model_name, category)
        raise DraemInputError(f"no threshold file {path}: calibrate one first (python -m tools.calibrate "
                              f"--rule mean_std --dataset mvtec_ad2 --obj_id {category} ...)")
    model = model_from_checkpoint(args.checkpoint_path, args.base_model_name, category)
    scorer = DraemScorer(model).eval().to(device)
    output_dir, count = Path(args.output_dir), 0
    for split in AD2_PRIVATE_SPLITS:
        records = [(path, None, 0) for path in ad2_private_images(args.data_path, category, split)]
        dataset = LabelledImageDataset(resize_shape=args.image_size, records=records)
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
        for batch in tqdm(loader, desc=f"{category} {split}", leave=False, dynamic_ncols=True):
            maps, scores = scorer(batch["image"].to(device))
            for path, amap, score in zip(batch["path"], maps[:, 0].float().cpu().numpy(), scores.tolist()):
                full = full_resolution_map(amap, shapes[split][Path(path).stem])  # read by expected_files
                mask = submission_mask(full, score, thresholds["image_threshold"],
                                       thresholds["pixel_threshold"])
                stem = Path(path).stem
                atomic_write_bytes(output_dir / MAPS_DIR / category / split / f"{stem}.tiff",
                                   tiff_bytes(full))
                atomic_write_bytes(output_dir / MASKS_DIR / category / split / f"{stem}{MASK_SUFFIX}",
                                   png_bytes(mask))
                count += 1
    return count


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_image_size(args.image_size)
    objects = categories_for("mvtec_ad2", args.obj_id, args.data_path)
    output_dir = Path(args.output_dir)
    if args.check_only and not output_dir.is_dir():
        raise DraemInputError(f"--output_dir {output_dir} does not exist: nothing to check")
    if args.check_only and args.obj_id == "-1":
        objects = []  # check the objects the folder holds
    present = sorted(entry.name for entry in output_dir.iterdir()) if output_dir.is_dir() else []
    stray = [name for name in present if name not in (MAPS_DIR, MASKS_DIR)]
    if stray:  # refused before anything is written into someone's folder
        raise DraemInputError(f"--output_dir {output_dir} holds {stray[0]}, which is not part of a "
                              "submission: give a new or empty folder")
    expected = expected_files(args.data_path, objects)  # every private folder read before anything is written
    if not args.check_only:
        device = select_device(args.device, args.gpu_id)
        for category in objects:
            print(f"{category}: wrote {write_object(args, category, device, expected[category])} maps and "
                  f"masks")
    earlier = sorted(objects_in(output_dir) - set(objects))
    expected = {**expected, **expected_files(args.data_path, earlier)}
    if not expected:
        raise DraemInputError(f"--output_dir {output_dir} holds no object of a submission: nothing to check")
    official = uses_official_counts(set(expected), args.official_counts)
    files = check_submission(output_dir, expected, official)
    counts = "the challenge's counts and " if official else ""
    print(f"submission {output_dir}: {files} files for {', '.join(sorted(expected))} ({len(expected)} of 8 "
          f"objects); checked against {counts}the private images in {args.data_path}: complete, float16 "
          "maps, 0/255 masks")
    return files


if __name__ == "__main__":
    main()
