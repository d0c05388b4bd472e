"""Evaluate DRAEM checkpoints on MVTec-AD-style test sets with the released protocol (spec §6).

    python test_draem.py --obj_id carpet --data_path datasets/mvtec --checkpoint_path checkpoints
    python test_draem.py --data_path datasets/mvtec --checkpoint_path pretrained \\
        --base_model_name DRAEM_seg_large_ae_large_0.0001_800_bs8      # the authors' released files

Per category: image AUROC / AP / F1-max (image score = max of the 21×21 average-pooled anomaly map),
pixel AUROC / AP with the released uint8 mask cast (only pixels whose resized mask value is exactly 1
count as anomalous, so defect borders drop out, as in the published numbers), and AUPRO to FPR 0.3.
Results go to --output_dir as Markdown, CSV and JSON, beside the paper's values.
"""
import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoints import model_from_checkpoint, run_base_name
from data_loader import LAYOUTS, categories_for, make_test_dataset
from errors import ArgumentParser, DraemInputError, exit_on_input_error
from metrics import DraemEvaluator, format_markdown, results_rows, write_results
from model_unet import DraemModel, anomaly_map, check_image_size
from runtime import PRECISIONS, autocast, prepare_model, select_device, to_memory_format
from visualize import heatmap_overlay, save_png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    released = parser.add_argument_group("flags of the released program")
    released.add_argument("--gpu_id", type=int, default=0, help="CUDA device index when testing on a GPU")
    released.add_argument("--base_model_name", default=run_base_name(1e-4, 700, 8),
                          help="checkpoint base name: files <base>_<category>_.pckl and <base>_<category>__seg.pckl "
                               "(default: what train_draem.py writes with the paper's settings)")
    released.add_argument("--data_path", required=True, help="dataset root: for mvtec, the folder holding <category>/test and <category>/ground_truth")
    released.add_argument("--checkpoint_path", required=True, help="folder holding the checkpoint pairs")
    extra = parser.add_argument_group("additions")
    extra.add_argument("--dataset", choices=LAYOUTS, default="mvtec",
                       help="layout of --data_path: mvtec | folder (<root>/<category>/train/good, test/<good|defect>, optional "
                            "ground_truth/<defect>/<stem><mask_suffix>.png) | visa (<root>/split_csv/1cls.csv)")
    extra.add_argument("--mask_suffix", default="_mask", help="mask file name ending for mvtec/folder: ground_truth/<defect>/<stem><suffix>.png")
    extra.add_argument("--obj_id", default="-1", help="category name, released integer id (0 capsule .. 14 wood), or -1 for all")
    extra.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, or cuda")
    extra.add_argument("--image_size", type=int, default=256, help="side the test images and masks are resized to (released: 256)")
    extra.add_argument("--batch_size", type=int, default=1, help="test batch size (released: 1; larger is faster, same scores)")
    extra.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: forward under bf16 autocast (metrics stay fp32)")
    extra.add_argument("--channels_last", action="store_true", help="channels-last memory layout for weights and inputs")
    extra.add_argument("--compile", action="store_true", help="torch.compile the model (slow first batch; needs a C compiler)")
    extra.add_argument("--output_dir", default="results", help="folder for the results tables and the overlays")
    extra.add_argument("--save_images", action="store_true", help="save a heat-map overlay (image, ground-truth contour, anomaly map) per test image")
    return parser.parse_args(argv)


@torch.no_grad()
def evaluate_category(
    model: DraemModel, data_path: str | Path, category: str, image_size: int, device: torch.device,
    batch_size: int = 1, overlay_dir: Path | None = None, layout: str = "mvtec", mask_suffix: str = "_mask",
    precision: str = "fp32", channels_last: bool = False,
) -> dict[str, float]:
    """Run the released protocol on one category's test set; optionally save an overlay per image."""
    dataset = make_test_dataset(layout, data_path, category, (image_size, image_size), mask_suffix)
    evaluator = DraemEvaluator(len(dataset), image_size, image_size)
    model.eval().to(device)
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc=f"test {category}", leave=False, dynamic_ncols=True):
        image = to_memory_format(batch["image"].to(device), channels_last)
        with autocast(device, precision):
            _, logits = model(image)
        amap = anomaly_map(logits)
        evaluator.update(amap, batch["mask"], batch["has_anomaly"])
        if overlay_dir is not None:
            batch_scores = evaluator.scores[evaluator.count - len(amap) : evaluator.count]  # just computed by update()
            for i, score in enumerate(batch_scores.tolist()):
                path = Path(batch["path"][i])
                overlay = heatmap_overlay(batch["image"][i], amap[i].cpu(), batch["mask"][i], score=score)
                save_png(overlay_dir / category / f"{path.parent.name}_{path.stem}.png", overlay)
    return evaluator.compute()


@exit_on_input_error
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    if not Path(args.data_path).is_dir():
        raise DraemInputError(f"--data_path {args.data_path} does not exist (point it at the dataset root folder)")
    categories = categories_for(args.dataset, args.obj_id, args.data_path)
    check_image_size(args.image_size)
    device = select_device(args.device, args.gpu_id)
    overlay_dir = Path(args.output_dir) / "overlays" if args.save_images else None
    per_category = {}
    for category in categories:
        model = prepare_model(model_from_checkpoint(args.checkpoint_path, args.base_model_name, category).to(device),
                              args.channels_last, args.compile)
        per_category[category] = evaluate_category(model, args.data_path, category, args.image_size, device, args.batch_size,
                                                   overlay_dir, args.dataset, args.mask_suffix, args.precision, args.channels_last)
    rows = results_rows(per_category)
    written = write_results(rows, args.output_dir, f"results_{args.base_model_name}")
    print(format_markdown(rows))
    print(f"results written to {', '.join(str(p) for p in written.values())}")
    return per_category


if __name__ == "__main__":
    main()
