"""Convert an anomalib DRAEM checkpoint to the released two-file format, for BGR input (see
util/checkpoints.py).

    python -m tools.convert_anomalib draem.ckpt --checkpoint_path checkpoints --obj_id carpet \\
        --base_model_name DRAEM_anomalib

The converted pair loads in test_draem.py, predict.py and export_onnx.py like any other and computes, on our
BGR images, the anomaly map anomalib computed on RGB ones. anomalib checkpoints trained with SSPCAB are
refused.
"""
from util.checkpoints import convert_anomalib_checkpoint
from util.cli import ArgumentParser, plain_name
from util.errors import one_line_errors
from util.thresholds import threshold_path


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("anomalib_checkpoint",
                        help="anomalib .ckpt (Lightning) or a plain state dict with model.* keys")
    parser.add_argument("--checkpoint_path", required=True, help="folder to write the .pckl pair into")
    parser.add_argument("--obj_id", "--category", dest="obj_id", required=True, type=plain_name,
                        help="category name used in the file names, e.g. carpet")
    parser.add_argument("--base_model_name", default="DRAEM_anomalib", type=plain_name,
                        help="base name of the written files")
    parser.add_argument("--trust", action="store_true",
                        help="load a Lightning .ckpt, whose pickled hyper-parameters can run code: only for "
                             "files you trust (without it, only tensors and plain values are read)")
    args = parser.parse_args(argv)
    written = convert_anomalib_checkpoint(args.anomalib_checkpoint, args.checkpoint_path,
                                          args.base_model_name, args.obj_id, args.trust)
    # New weights: a threshold file calibrated for the pair they replaced must not stay beside them.
    threshold_path(args.checkpoint_path, args.base_model_name, args.obj_id).unlink(missing_ok=True)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
