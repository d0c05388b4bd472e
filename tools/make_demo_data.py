"""Write the demo dataset (util/demo_data.py makes it): two texture categories with drawn defects and a
folder of anomaly-source textures, so DRAEM can be tried without downloads.

    python -m tools.make_demo_data --output_dir datasets/demo

writes datasets/demo/mvtec/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}
and datasets/demo/textures/images/<name>/*.jpg. Same seed, same files.
"""
import argparse
import time

from util.cli import ArgumentParser, at_least
from util.demo_data import DEMO_CATEGORIES, DemoDataset, make_demo_dataset
from util.errors import one_line_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", "--out", dest="output_dir", default="datasets/demo",
                        help="folder to write mvtec/ and textures/ into (default: datasets/demo)")
    parser.add_argument("--image_size", type=at_least(32), default=256,
                        help="side of the square images written, in pixels (default: 256)")
    parser.add_argument("--seed", type=at_least(0), default=0,
                        help="random seed; the same seed writes the same files (default: 0)")
    parser.add_argument("--n_train", type=at_least(1), default=40,
                        help="defect-free training images per category (default: 40)")
    parser.add_argument("--n_test_good", type=at_least(1), default=10,
                        help="defect-free test images per category (default: 10)")
    parser.add_argument("--n_test_per_defect", type=at_least(1), default=5,
                        help="test images per defect type, 2 types per category (default: 5)")
    parser.add_argument("--n_sources", type=at_least(1), default=24,
                        help="anomaly source images written to textures/ (default: 24)")
    parser.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES),
                        help=f"which demo categories to write (default: all of {', '.join(DEMO_CATEGORIES)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo dataset in --out")
    return parser.parse_args(argv)


@one_line_errors
def main(argv: list[str] | None = None) -> DemoDataset:
    args = parse_args(argv)
    start = time.perf_counter()
    demo = make_demo_dataset(
        args.output_dir, args.image_size, args.seed, args.n_train, args.n_test_good, args.n_test_per_defect,
        args.n_sources, tuple(args.categories), args.overwrite,
    )
    print(f"demo dataset: categories {', '.join(demo.categories)} in {demo.mvtec_root}, "
          f"anomaly sources in {demo.texture_root} ({time.perf_counter() - start:.1f} s)")
    return demo


if __name__ == "__main__":
    main()
