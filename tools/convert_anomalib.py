"""Convert an anomalib DRAEM checkpoint to the released two-file format, for BGR input (see checkpoints.py).

    python convert_anomalib.py draem.ckpt --checkpoint_path checkpoints --obj_id carpet --base_model_name DRAEM_anomalib

The converted pair loads in test_draem.py, predict.py and export_onnx.py like any other and computes, on our BGR
images, the anomaly map anomalib computed on RGB ones. anomalib checkpoints trained with SSPCAB are refused.
"""
from util.checkpoints import convert_anomalib_checkpoint
from util.cli import ArgumentParser
from util.errors import one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("anomalib_checkpoint", help="anomalib .ckpt (Lightning) or a plain state dict with model.* keys")
    parser.add_argument("--checkpoint_path", required=True, help="folder to write the .pckl pair into")
    parser.add_argument("--obj_id", "--category", dest="obj_id", required=True,
                        help="category name used in the file names, e.g. carpet")
    parser.add_argument("--base_model_name", default="DRAEM_anomalib", help="base name of the written files")
    parser.add_argument("--trust", action="store_true", help="unpickle non-tensor objects (only for files you trust)")
    args = parser.parse_args(argv)
    for written in convert_anomalib_checkpoint(args.anomalib_checkpoint, args.checkpoint_path, args.base_model_name,
                                               args.obj_id, args.trust):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
