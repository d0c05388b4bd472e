"""Export a DRAEM checkpoint as one ONNX graph: image → anomaly map, image score (and decisions), then check
parity.

    python export_onnx.py --checkpoint_path checkpoints --base_model_name DRAEM_test_0.0001_700_bs8 \\
        --obj_id carpet --output draem_carpet.onnx

The graph holds both subnetworks and the test protocol's scoring:
  input  `image`        float32 batch×3×H×W, BGR in [0, 1], resized to H×W = --image_size (as predict.py reads
                        images)
  output `anomaly_map`  float32 batch×1×H×W, softmax channel 1 of the discriminative network
  output `image_score`  float32 batch, max of the 21×21 average-pooled map (stride 1, padding 10, zeros
                        counted)
When a threshold is known (the checkpoint pair's threshold file from tools/calibrate.py, calibrated
without the test set, or --threshold, which replaces the file's image threshold), it is baked in:
  output `is_anomalous` bool batch, image_score >= image threshold
  output `defect_mask`  bool batch×1×H×W, anomaly_map >= pixel threshold (only with the file's pixel
                        threshold)
Without a threshold the graph has the first two outputs only.
The batch axis is dynamic; the image height and width are fixed at export. Before the file is written, the
graph is run with onnxruntime (CPU) on seeded random images at batch sizes 1 and 3 and compared with PyTorch;
the largest differences are printed, and a difference above --tolerance is an error (nothing is
written). The decisions must be equal, except where ONNX's and PyTorch's float values fall on
opposite sides of the threshold (float rounding decides those; the float outputs' own check bounds it).

Uses torch's TorchScript-based exporter (dynamo=False): the torch.export-based one needs the extra
`onnxscript` package, and this model (no data-dependent control flow) traces exactly.
"""
import argparse
import io
import warnings

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from engine.evaluation import DraemScorer
from model_unet import check_image_size, model_from_checkpoint
from util.atomic import atomic_write_bytes, check_output_file
from util.cli import (
    ArgumentParser,
    add_checkpoint_flags,
    add_image_size_flag,
    at_least,
    finite_float,
    positive_float,
)
from util.errors import ParityCheckFailed, one_line_errors
from util.images import image_shape
from util.thresholds import thresholds_in_use

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "image_score")
IS_ANOMALOUS, DEFECT_MASK = "is_anomalous", "defect_mask"
DEFAULT_OPSET = 17
PARITY_BATCH_SIZES = (1, 3)


def float32_at_least(value: float) -> float:
    """The smallest float32 >= `value`: a float32 x >= it exactly when x >= `value`, as predict.py compares in
    Python."""
    rounded = np.float32(value)
    if float(rounded) < value:  # compared in float64: NumPy would round `value` to float32 first
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


class ThresholdedScorer(nn.Module):
    """A DraemScorer with decisions at baked-in thresholds: (map, score, is_anomalous[, defect_mask]),
    decisions bool."""

    def __init__(self, scorer: DraemScorer, image_threshold: float, pixel_threshold: float | None = None):
        super().__init__()
        self.scorer = scorer
        # Per decision: the float output it is taken on and its threshold, as the graph compares in float32.
        self.decisions = {IS_ANOMALOUS: (OUTPUT_NAMES[1], float32_at_least(image_threshold))}
        if pixel_threshold is not None:
            self.decisions[DEFECT_MASK] = (OUTPUT_NAMES[0], float32_at_least(pixel_threshold))
        self.output_names = (*OUTPUT_NAMES, *self.decisions)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        amap, scores = self.scorer(images)
        values = dict(zip(OUTPUT_NAMES, (amap, scores)))
        return amap, scores, *(values[name] >= threshold for name, threshold in self.decisions.values())


def output_names(scorer: nn.Module) -> tuple[str, ...]:
    """The graph outputs of a DraemScorer or a ThresholdedScorer, in order."""
    return scorer.output_names if isinstance(scorer, ThresholdedScorer) else OUTPUT_NAMES


def onnx_bytes(scorer: DraemScorer | ThresholdedScorer, image_size: int | tuple[int, int],
               opset: int = DEFAULT_OPSET) -> bytes:
    """The scorer as a serialized ONNX model with a dynamic batch axis, checked by the ONNX checker;
    image_size is the side of square images or (height, width)."""
    scorer = scorer.eval().cpu()
    names = output_names(scorer)
    example = torch.rand(1, 3, *image_shape(image_size))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The model's input-size checks read shapes as Python values while tracing; they are meant to be
        # constants of the graph, so the tracer's warnings about them are noise. The TorchScript exporter is
        # chosen on purpose (see the module docstring), so its deprecation notices are too.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            scorer, (example,), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(names),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *names)},
        )
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_model_from_string(data))
    return data


@torch.no_grad()
def parity(
    scorer: DraemScorer | ThresholdedScorer, model_bytes: bytes, image_size: int | tuple[int, int],
    batch_sizes=PARITY_BATCH_SIZES, seed: int = 0,
) -> dict[str, float]:
    """ONNX (onnxruntime, CPU) against PyTorch per output, over seeded random batches.

    Float outputs: the largest absolute difference. Decisions: the number of elements that differ although
    ONNX's and PyTorch's float values lie on the same side of the threshold (exact equality is required
    there).
    """
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    scorer = scorer.eval().cpu()
    names = output_names(scorer)
    decisions = scorer.decisions if isinstance(scorer, ThresholdedScorer) else {}
    generator = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys(names, 0.0)
    for batch_size in batch_sizes:
        images = torch.rand(batch_size, 3, *image_shape(image_size), generator=generator)
        got = dict(zip(names, session.run(list(names), {INPUT_NAME: images.numpy()})))
        expected = {name: output.numpy() for name, output in zip(names, scorer(images))}
        for name in names:
            if got[name].shape != expected[name].shape or got[name].dtype != expected[name].dtype:
                raise ParityCheckFailed(f"ONNX output {name} is {got[name].dtype} {got[name].shape} at batch "
                                        f"{batch_size}, PyTorch {expected[name].dtype} "
                                        f"{expected[name].shape}")
            if name in decisions:
                value, threshold = decisions[name]
                rounding_decides = (got[value] >= threshold) != (expected[value] >= threshold)
                worst[name] += float(((got[name] != expected[name]) & ~rounding_decides).sum())
            else:
                worst[name] = max(worst[name], float(np.abs(got[name] - expected[name]).max()))
    return worst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    add_checkpoint_flags(parser)
    parser.add_argument("--output", required=True, help="ONNX file to write, e.g. draem_carpet.onnx")
    add_image_size_flag(parser)
    parser.add_argument("--opset", type=at_least(7), default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="largest ONNX-vs-PyTorch difference accepted in the parity check")
    parser.add_argument("--seed", type=at_least(0), default=0,
                        help="seed of the random images of the parity check")
    parser.add_argument("--threshold", type=finite_float, default=None,
                        help="image threshold (finite) baked in as output is_anomalous (image_score >= "
                             "threshold); default: the image threshold of the checkpoint pair's threshold "
                             "file (tools/calibrate.py), if it has one")
    return parser.parse_args(argv)


def thresholded(scorer: DraemScorer, args: argparse.Namespace) -> tuple[DraemScorer | ThresholdedScorer, str]:
    """The scorer with the thresholds known for the checkpoint pair baked in (if any), and a line saying
    which."""
    image_threshold, image_source, pixel_threshold, path = thresholds_in_use(
        args.checkpoint_path, args.base_model_name, args.obj_id, args.image_size, args.threshold)
    if image_threshold is None:
        return (scorer, f"no thresholds baked in ({path} not found: run python -m tools.calibrate, or give "
                        f"--threshold)")
    baked = ThresholdedScorer(scorer, image_threshold, pixel_threshold)
    line = (f"thresholds baked in: {IS_ANOMALOUS} = {OUTPUT_NAMES[1]} >= {image_threshold:.6g} "
            f"({image_source})")
    if pixel_threshold is not None:
        line += f", {DEFECT_MASK} = {OUTPUT_NAMES[0]} >= {pixel_threshold:.6g} (from {path})"
    return baked, line


@one_line_errors
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    check_image_size(args.image_size)
    model = model_from_checkpoint(args.checkpoint_path, args.base_model_name, args.obj_id)
    scorer, baked_line = thresholded(DraemScorer(model), args)
    check_output_file(args.output, "--output")  # before the export, not after it
    model_bytes = onnx_bytes(scorer, args.image_size, args.opset)
    print(baked_line)
    # Checked before anything is written: a graph that fails the check never lies under the requested name.
    worst = parity(scorer, model_bytes, args.image_size, seed=args.seed)
    sizes = ", ".join(str(b) for b in PARITY_BATCH_SIZES)
    print(f"parity with PyTorch (onnxruntime {onnxruntime.__version__}, CPU, random images, batch sizes "
          f"{sizes}): "
          + ", ".join(f"{name} max |diff| {value:.2e}" if name in OUTPUT_NAMES
                      else f"{name} mismatches {value:.0f}"
                      for name, value in worst.items()))
    largest = max(worst[name] for name in OUTPUT_NAMES)
    if largest > args.tolerance:
        raise ParityCheckFailed(f"ONNX output differs from PyTorch by {largest:.2e} > --tolerance "
                                f"{args.tolerance:g}; try another --opset")
    mismatched = {name: value for name, value in worst.items() if name not in OUTPUT_NAMES and value > 0}
    if mismatched:
        raise ParityCheckFailed("ONNX decisions differ from PyTorch's away from the threshold: "
                                + ", ".join(f"{name} {value:.0f} elements"
                                            for name, value in mismatched.items()))
    atomic_write_bytes(args.output, model_bytes)
    side = ",".join(str(s) for s in args.image_size)
    shapes = {OUTPUT_NAMES[0]: f"[batch,1,{side}]", OUTPUT_NAMES[1]: "[batch]", IS_ANOMALOUS: "[batch] bool",
              DEFECT_MASK: f"[batch,1,{side}] bool"}
    print(f"wrote {args.output} ({len(model_bytes) / 2**20:.1f} MiB, opset {args.opset}): {INPUT_NAME} "
          f"[batch,3,{side}] -> "
          + ", ".join(f"{name} {shapes[name]}" for name in output_names(scorer)))
    return worst


if __name__ == "__main__":
    main()
