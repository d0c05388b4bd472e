"""Export a DRAEM checkpoint as one ONNX graph: image → anomaly map and image score, then check parity.

    python export_onnx.py --checkpoint_path checkpoints --base_model_name DRAEM_test_0.0001_700_bs8 \\
        --obj_id carpet --output draem_carpet.onnx

The graph holds both subnetworks and the test protocol's scoring:
  input  `image`        float32 batch×3×S×S, BGR in [0, 1], resized to S = --image_size (as predict.py reads images)
  output `anomaly_map`  float32 batch×1×S×S, softmax channel 1 of the discriminative network
  output `image_score`  float32 batch, max of the 21×21 average-pooled map (stride 1, padding 10, zeros counted)
The batch axis is dynamic; the image side is fixed at export. After writing the file, the graph is
run with onnxruntime (CPU) on seeded random images at batch sizes 1 and 3 and compared with PyTorch;
the largest differences are printed, and a difference above --tolerance is an error.

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

from atomic import atomic_write_bytes
from checkpoints import model_from_checkpoint
from cli import ArgumentParser, add_checkpoint_flags, at_least, positive_float
from errors import ParityCheckFailed, one_line_errors
from evaluation import DraemScorer
from model_unet import check_image_size

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "image_score")
DEFAULT_OPSET = 17
PARITY_BATCH_SIZES = (1, 3)


def onnx_bytes(scorer: DraemScorer, image_size: int, opset: int = DEFAULT_OPSET) -> bytes:
    """The scorer as a serialized ONNX model with a dynamic batch axis, checked by the ONNX checker."""
    scorer = scorer.eval().cpu()
    example = torch.rand(1, 3, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The model's input-size checks read shapes as Python values while tracing; they are meant to be
        # constants of the graph, so the tracer's warnings about them are noise. The TorchScript exporter is
        # chosen on purpose (see the module docstring), so its deprecation notices are too.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            scorer, (example,), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
        )
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_model_from_string(data))
    return data


@torch.no_grad()
def parity(
    scorer: DraemScorer, model_bytes: bytes, image_size: int, batch_sizes=PARITY_BATCH_SIZES, seed: int = 0
) -> dict[str, float]:
    """Largest absolute difference between onnxruntime (CPU) and PyTorch per output, over seeded random batches."""
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    scorer = scorer.eval().cpu()
    generator = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys(OUTPUT_NAMES, 0.0)
    for batch_size in batch_sizes:
        images = torch.rand(batch_size, 3, image_size, image_size, generator=generator)
        onnx_outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
        for name, expected, got in zip(OUTPUT_NAMES, scorer(images), onnx_outputs):
            if got.shape != tuple(expected.shape):
                raise ParityCheckFailed(f"ONNX output {name} has shape {got.shape} at batch {batch_size}, "
                                        f"PyTorch {tuple(expected.shape)}")
            worst[name] = max(worst[name], float(np.abs(got - expected.numpy()).max()))
    return worst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    add_checkpoint_flags(parser)
    parser.add_argument("--output", required=True, help="ONNX file to write, e.g. draem_carpet.onnx")
    parser.add_argument("--image_size", type=int, default=256,
                        help="image side the graph takes, a multiple of 32 (released: 256)")
    parser.add_argument("--opset", type=at_least(7), default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="largest ONNX-vs-PyTorch difference accepted in the parity check")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of the random images of the parity check")
    return parser.parse_args(argv)


@one_line_errors
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    check_image_size(args.image_size)
    scorer = DraemScorer(model_from_checkpoint(args.checkpoint_path, args.base_model_name, args.obj_id))
    model_bytes = onnx_bytes(scorer, args.image_size, args.opset)
    atomic_write_bytes(args.output, model_bytes)
    print(f"wrote {args.output} ({len(model_bytes) / 2**20:.1f} MiB, opset {args.opset}): "
          f"{INPUT_NAME} [batch,3,{args.image_size},{args.image_size}] -> {OUTPUT_NAMES[0]} "
          f"[batch,1,{args.image_size},{args.image_size}], {OUTPUT_NAMES[1]} [batch]")
    worst = parity(scorer, model_bytes, args.image_size, seed=args.seed)
    sizes = ", ".join(str(b) for b in PARITY_BATCH_SIZES)
    print(f"parity with PyTorch (onnxruntime {onnxruntime.__version__}, CPU, random images, batch sizes {sizes}): "
          + ", ".join(f"{name} max |diff| {value:.2e}" for name, value in worst.items()))
    if max(worst.values()) > args.tolerance:
        raise ParityCheckFailed(f"ONNX output differs from PyTorch by {max(worst.values()):.2e} "
                                f"> --tolerance {args.tolerance:g}; "
                                f"try another --opset")
    return worst


if __name__ == "__main__":
    main()
