"""Calibrate deployable thresholds for a trained checkpoint pair, without the test set.

    python calibrate.py --checkpoint_path checkpoints --base_model_name DRAEM_test_0.0001_700_bs8 \\
        --obj_id carpet --data_path datasets/mvtec --anomaly_source_path datasets/dtd

Makes --samples training-style samples from the category's training images (about half with a
synthetic anomaly, METHOD.md §2), scores them with the test protocol, and picks the image-score
threshold and the pixel threshold that maximise F1 on them (calibration.py explains the rule and its
limit). Only <category>/train is read, never <category>/test. The thresholds go to
<checkpoint_path>/<base>_<category>_threshold.json, which predict.py and export_onnx.py use by default
and beside which test_draem.py reports precision, recall and F1 at the threshold.

With --val_fraction (and the run's --seed), the samples come from the training images a run with
--val_every held out and never trained on; with --samples equal to its --val_samples they are its
validation set. Without it, all training images are used, which the model has seen: its normal scores
are then lower than on new images, so the threshold tends to be low. --good_dir adds your own
known-good images as normals, to raise the threshold against false alarms on real normal variation.
"""
import argparse
from pathlib import Path

from engine.calibration import calibrate, good_image_paths, synthetic_set, with_good_images
from engine.evaluation import DraemScorer
from engine.validation import split_paths
from model_unet import check_image_size, model_from_checkpoint
from util.cli import ArgumentParser, add_checkpoint_flags, add_dataset_flags, add_device_flags, at_least
from util.errors import one_line_errors
from util.layouts import LAYOUTS, train_image_paths
from util.runtime import select_device
from util.thresholds import TRAINING_SOURCE, VALIDATION_SOURCE, write_thresholds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    add_checkpoint_flags(parser)
    parser.add_argument("--data_path", required=True,
                        help="dataset root: for mvtec, the folder holding <category>/train/good (the test folder is not read)")
    add_dataset_flags(parser, LAYOUTS)
    parser.add_argument("--anomaly_source_path",
                        help="texture folder (DTD) the model was trained with, searched recursively; "
                             "omitted: random-noise anomalies, as in training without it")
    parser.add_argument("--image_size", type=int, default=256,
                        help="side images are resized to, a multiple of 32: the size the model is deployed at "
                             "(predict.py and export_onnx.py refuse a file made at another size)")
    parser.add_argument("--samples", type=at_least(1), default=64,
                        help="synthetic samples to calibrate on, the training mix (about half anomalous)")
    parser.add_argument("--seed", type=at_least(0), default=0,
                        help="seed of the synthesis and of the --val_fraction split (give the training run's seed)")
    parser.add_argument("--val_fraction", type=float, default=None,
                        help="calibrate on the training images a run with --val_every and this --val_fraction held out "
                             "(never trained on); omitted: on all training images")
    parser.add_argument("--good_dir",
                        help="folder of extra known-good images (searched recursively), added as normal samples")
    parser.add_argument("--batch_size", type=at_least(1), default=8,
                        help="images per forward pass (any value gives the same thresholds)")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    return args


@one_line_errors
def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    check_image_size(args.image_size)
    category = args.obj_id
    if args.good_dir is not None:
        good_image_paths(args.good_dir)  # now, not after the samples are made
    paths, source = train_image_paths(args.dataset, args.data_path, category), TRAINING_SOURCE
    if args.val_fraction is not None:
        _, paths = split_paths(paths, args.val_fraction, args.seed)
        source = VALIDATION_SOURCE
    samples = synthetic_set(paths, args.anomaly_source_path, args.image_size, args.samples, args.seed)
    samples, source = with_good_images(samples, source, args.good_dir, args.image_size)
    device = select_device(args.device, args.gpu_id)
    scorer = DraemScorer(model_from_checkpoint(args.checkpoint_path, args.base_model_name, category))
    thresholds = calibrate(scorer, samples.images, samples.masks, samples.labels, device, args.batch_size, source=source)
    path = write_thresholds(args.checkpoint_path, args.base_model_name, category, thresholds)
    print(f"{category}: image threshold {thresholds['image_threshold']:.6g} (F1 {thresholds['image_f1']:.3f}), "
          f"pixel threshold {thresholds['pixel_threshold']:.6g} (F1 {thresholds['pixel_f1']:.3f}) on "
          f"{thresholds['n_normal']} normal and {thresholds['n_anomalous']} anomalous samples from {len(paths)} {source}; "
          f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
