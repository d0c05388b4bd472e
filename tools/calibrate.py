"""Calibrate deployable thresholds for a trained checkpoint pair, without the test set.

    python -m tools.calibrate --checkpoint_path checkpoints --base_model_name DRAEM_test_0.0001_700_bs8 \\
        --obj_id carpet --data_path datasets/mvtec --anomaly_source_path datasets/dtd
    python -m tools.calibrate --rule mean_std --dataset mvtec_ad2 --obj_id can \\
        --data_path datasets/mvtec_ad2 --checkpoint_path checkpoints \\
        --base_model_name DRAEM_test_0.0001_700_bs8 --image_size 256 512

Makes --samples training-style samples from the category's training images (about half with a
synthetic anomaly, METHOD.md §2), scores them with the test protocol, and picks the image-score
threshold and the pixel threshold that maximise F1 on them (util/thresholds.py explains the rule and its
limit). Only <category>/train is read, never <category>/test. The thresholds go to
<checkpoint_path>/<base>_<category>_threshold.json, which predict.py and export_onnx.py use by default
and beside which test_draem.py reports precision, recall and F1 at the threshold.

With --val_fraction (and the run's --seed), the samples come from the training images a run with
--val_every held out and never trained on; with --samples equal to its --val_samples they are its
validation set. Without it, all training images are used, which the model has seen: its normal scores
are then lower than on new images, so the threshold tends to be low. --good_dir adds your own
known-good images as normals, to raise the threshold against false alarms on real normal variation.
In the layouts with a normal-only validation/good set (mvtec_ad2, mvtec_loco) the samples are made from
it instead: the model never trained on it.

--rule mean_std: each threshold is mean + --k·std (default 3) of the scores on normal images only,
never synthetic anomalies (util/thresholds.py): the layout's validation/good, else the --val_fraction
held-out training images, plus --good_dir's images.
"""
import argparse
from pathlib import Path

from engine.calibration import (
    calibrate,
    calibrate_normal_only,
    normal_images,
    normal_set,
    synthetic_set,
    with_good_images,
)
from engine.evaluation import DraemScorer
from engine.validation import split_paths
from model_unet import check_image_size, model_from_checkpoint
from util.atomic import check_output_file
from util.cli import (
    ArgumentParser,
    add_checkpoint_flags,
    add_dataset_flags,
    add_device_flags,
    add_fast_flags,
    add_image_size_flag,
    at_least,
    fraction,
)
from util.errors import one_line_errors
from util.images import find_images
from util.layouts import LAYOUTS, VALIDATION_LAYOUTS, train_image_paths, validation_image_paths
from util.provenance import provenance
from util.runtime import prepare_model, select_device, set_fp32_precision
from util.thresholds import (
    DEFAULT_K,
    RULES,
    TRAINING_SOURCE,
    VALIDATION_GOOD_SYNTHETIC_SOURCE,
    VALIDATION_SOURCE,
    threshold_path,
    write_thresholds,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    add_checkpoint_flags(parser)
    parser.add_argument("--data_path", required=True,
                        help="dataset root: for mvtec, the folder holding <category>/train/good (the test "
                             "folder is not read)")
    add_dataset_flags(parser, LAYOUTS)
    parser.add_argument("--anomaly_source_path",
                        help="texture folder (DTD) the model was trained with, searched recursively; "
                             "omitted: random-noise anomalies, as in training without it")
    add_image_size_flag(parser)
    parser.add_argument("--samples", type=at_least(1), default=64,
                        help="synthetic samples to calibrate on, the training mix (about half anomalous)")
    parser.add_argument("--seed", type=at_least(0), default=0,
                        help="seed of the synthesis and of the --val_fraction split (give the training run's "
                             "seed)")
    parser.add_argument("--val_fraction", type=fraction, default=None,
                        help="calibrate on the training images a run with --val_every and this "
                             "--val_fraction held out (never trained on); omitted: on all training images")
    parser.add_argument("--good_dir",
                        help="folder of extra known-good images (searched recursively), added as normal "
                             "samples")
    parser.add_argument("--rule", choices=tuple(RULES), default="f1",
                        help="f1: F1-max on synthetic anomalies and normal images; mean_std: mean + k·std of "
                             "the scores on normal images only (validation/good, or --val_fraction held-out "
                             "images, + --good_dir)")
    parser.add_argument("--k", type=at_least(0, float), default=DEFAULT_K,
                        help="k of the mean_std rule (default 3)")
    parser.add_argument("--batch_size", type=at_least(1), default=8,
                        help="images per forward pass (any value gives the same thresholds)")
    add_device_flags(parser)
    add_fast_flags(parser.add_argument_group("fast path (off by default; as the model is deployed)"))
    return parser.parse_args(argv)


@one_line_errors
def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    check_image_size(args.image_size)
    category = args.obj_id
    # Everything checked before the samples are made: the pair, the threshold file's place, the images.
    model = model_from_checkpoint(args.checkpoint_path, args.base_model_name, category)
    check_output_file(threshold_path(args.checkpoint_path, args.base_model_name, category),
                      "the threshold file")
    if args.good_dir is not None:
        # now, not after the samples are made
        find_images(args.good_dir, "--good_dir", check="--good_dir image")
    set_fp32_precision(args.fp32_precision)
    device = select_device(args.device, args.gpu_id)
    scorer = DraemScorer(prepare_model(model.to(device), args.channels_last, args.compile), args.precision,
                         args.channels_last)
    if args.rule == "mean_std":
        paths, source = normal_set(args.dataset, args.data_path, category, args.val_fraction, args.seed)
        images, source = normal_images(paths, source, args.good_dir, args.image_size)
        thresholds = calibrate_normal_only(scorer, images, device, args.batch_size, k=args.k, source=source)
        described = (f"image threshold {thresholds['image_threshold']:.6g} (mean "
                     f"{thresholds['image_mean']:.4g} + {args.k:g}·std {thresholds['image_std']:.4g}), pixel "
                     f"threshold {thresholds['pixel_threshold']:.6g} (mean {thresholds['pixel_mean']:.4g} + "
                     f"{args.k:g}·std {thresholds['pixel_std']:.4g}) on {thresholds['n_normal']} {source}")
    else:
        if args.dataset in VALIDATION_LAYOUTS:
            paths, source = (validation_image_paths(args.dataset, args.data_path, category),
                             VALIDATION_GOOD_SYNTHETIC_SOURCE)
        else:
            paths, source = train_image_paths(args.dataset, args.data_path, category), TRAINING_SOURCE
            if args.val_fraction is not None:
                _, paths = split_paths(paths, args.val_fraction, args.seed)
                source = VALIDATION_SOURCE
        samples = synthetic_set(paths, args.anomaly_source_path, args.image_size, args.samples, args.seed)
        samples, source = with_good_images(samples, source, args.good_dir, args.image_size)
        thresholds = calibrate(scorer, samples.images, samples.masks, samples.labels, device, args.batch_size,
                               source=source)
        described = (f"image threshold {thresholds['image_threshold']:.6g} (F1 "
                     f"{thresholds['image_f1']:.3f}), pixel threshold {thresholds['pixel_threshold']:.6g} "
                     f"(F1 {thresholds['pixel_f1']:.3f}) on {thresholds['n_normal']} normal and "
                     f"{thresholds['n_anomalous']} anomalous samples "
                     f"from {len(paths)} {source}")
    path = write_thresholds(args.checkpoint_path, args.base_model_name, category, thresholds,
                            provenance("tools/calibrate.py", args, device))
    print(f"{category}: {described}; wrote {path}")
    return path


if __name__ == "__main__":
    main()
