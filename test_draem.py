"""Evaluate DRAEM checkpoints on MVTec-AD-style test sets with the released protocol (METHOD.md §6).

    python test_draem.py --obj_id carpet --data_path datasets/mvtec --checkpoint_path checkpoints
    python test_draem.py --data_path datasets/mvtec --checkpoint_path pretrained \\
        --base_model_name DRAEM_seg_large_ae_large_0.0001_800_bs8      # the authors' released files

Per category: image AUROC / AP / F1-max (image score = max of the 21×21 average-pooled anomaly map),
pixel AUROC / AP with the released uint8 mask cast (only pixels whose resized mask value is exactly 1
count as anomalous, so defect borders drop out, as in the published numbers), and AUPRO to FPR 0.3.
Results go to --output_dir as Markdown, CSV and JSON, beside the paper's values, and as report.html.

Several seeds of one configuration, reported as mean ± std:

    python test_draem.py --obj_id carpet --data_path datasets/mvtec --checkpoint_path checkpoints \\
        --base_model_name DRAEM_test_0.0001_700_bs8 DRAEM_test_0.0001_700_bs8_seed1 \\
        DRAEM_test_0.0001_700_bs8_seed2
"""
import argparse

from engine.evaluation import evaluate_checkpoints
from model_unet import check_image_size
from util.checkpoints import run_base_name
from util.cli import (
    ArgumentParser,
    add_dataset_flags,
    add_device_flags,
    add_fast_flags,
    add_image_size_flag,
    at_least,
    plain_name,
)
from util.errors import one_line_errors
from util.layouts import LAYOUTS, categories_for
from util.provenance import provenance
from util.runtime import select_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    released = parser.add_argument_group("flags of the released program")
    released.add_argument("--gpu_id", type=at_least(0), default=0,
                          help="CUDA device index when testing on a GPU")
    released.add_argument("--base_model_name", nargs="+", default=[run_base_name(1e-4, 700, 8)],
                          type=plain_name, help="checkpoint base name: files <base>_<category>_.pckl and "
                                                "<base>_<category>__seg.pckl "
                               "(default: what train_draem.py writes with the paper's settings); several "
                               "names (runs with different --seed) give each metric as mean ± std over them")
    released.add_argument("--data_path", required=True,
                          help="dataset root: for mvtec, the folder holding <category>/test and "
                               "<category>/ground_truth")
    released.add_argument("--checkpoint_path", required=True, help="folder holding the checkpoint pairs")
    extra = parser.add_argument_group("additions")
    add_dataset_flags(extra, LAYOUTS)
    extra.add_argument("--obj_id", "--category", dest="obj_id", default="-1", type=plain_name,
                       help="category name, released integer id (0 capsule .. 14 wood), or -1 for all")
    add_device_flags(extra, gpu_id=False)
    add_image_size_flag(extra)
    extra.add_argument("--batch_size", type=at_least(1), default=1,
                       help="test batch size (released: 1; larger is faster, same scores)")
    extra.add_argument("--output_dir", default="results",
                       help="folder for the results tables and the overlays")
    extra.add_argument("--save_images", action="store_true",
                       help="save a heat-map overlay (image, ground-truth contour, anomaly map) per test "
                            "image in <output_dir>/overlays/<category>, or overlays/<base>/<category> with "
                            "several base names")
    add_fast_flags(parser.add_argument_group("fast path (off by default)"))
    return parser.parse_args(argv)


@one_line_errors
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    categories = categories_for(args.dataset, args.obj_id, args.data_path)
    check_image_size(args.image_size)
    device = select_device(args.device, args.gpu_id)
    return evaluate_checkpoints(
        checkpoint_path=args.checkpoint_path, base_model_names=args.base_model_name, data_path=args.data_path,
        categories=categories, image_size=args.image_size, device=device,
        provenance=provenance("test_draem.py", args, device), output_dir=args.output_dir,
        batch_size=args.batch_size, layout=args.dataset, mask_suffix=args.mask_suffix,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
        save_images=args.save_images,
    )


if __name__ == "__main__":
    main()
