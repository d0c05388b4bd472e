"""Benchmark DRAEM's fast path side by side on whatever device is present; print a table, write JSON.

    python -m tools.bench_draem                                   # paper size: widths 128/64, 256 px, batch 8
    python -m tools.bench_draem --base_width 16 --image_size 128  # a small model: a minute on a 2-core CPU

Measured in one run, every training row from the same initial weights and the same batch:
- training samples/s of fp32 eager, then bf16 autocast, channels_last, torch.compile each alone, then
  all of them together, and all of them fed by the device synthesis (a uint8 batch -> samples on the
  device, every step). Each row also gives the loss after its steps (the options should change it only
  by rounding), the achieved FLOP rate (FLOPs of one step counted by torch.utils.flop_counter) as a
  fraction of the device's measured bf16 (and fp32) matmul rate, and peak memory (CUDA: allocated by
  torch; CPU: the process's peak resident set so far, so it only grows down the table);
- synthesis samples/s: the CPU path (TrainDataset, one process) next to the device path
  (TrainImageDataset in one process + synthesize_batch, and synthesize_batch alone);
- inference latency at batch 1 and batch 8, fp32 eager and with the fast options.
Compilation happens in the untimed warm-up steps. Two options are left out where they cannot pay off,
unless asked for: torch.compile on CPU (`--compile auto`: inductor's C++ build takes minutes there)
and bf16 where the device emulates it (`--bf16 auto`: CPUs without AVX512-BF16/AMX run it tens of times
slower than fp32). A row whose options are all left out is reported as skipped, with the reason.
On CPU the defaults are also a smaller batch and fewer steps.
"""
import argparse
import functools
import json
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from data_loader import TrainDataset, TrainImageDataset, seed_everything
from device_synthesis import device_generator, synthesize_batch
from engine.evaluation import DraemScorer
from loss import DraemLoss
from model_unet import DraemModel, check_image_size
from train_draem import train_step
from util.atomic import atomic_write_text
from util.cli import ArgumentParser, add_device_flags, add_image_size_flag, add_width_flags, at_least
from util.demo_data import make_demo_dataset
from util.errors import one_line_errors
from util.images import shape_record
from util.runtime import prepare_model, select_device


@dataclass(frozen=True)
class Options:
    """One column of fast-path switches; the label names what is on."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    device_synthesis: bool = False  # the training batch is synthesised on the device every step

    def label(self) -> str:
        parts = [self.precision] if self.precision != "fp32" else []
        parts += [name for name in ("channels_last", "compile") if getattr(self, name)]
        parts += ["device synthesis"] if self.device_synthesis else []
        return " + ".join(parts) or "fp32 eager"


FAST = Options("bf16", channels_last=True, compile=True)
TRAIN_CONFIGS = (Options(), Options("bf16"), Options(channels_last=True), Options(compile=True), FAST,
                 replace(FAST, device_synthesis=True))
INFERENCE_CONFIGS = (Options(), FAST)
# Per device type: batch size, timed steps, warm-up steps, latency repeats, synthesis samples, matmul side.
DEFAULTS = {"cuda": (8, 20, 3, 20, 512, 8192), "cpu": (2, 3, 1, 2, 32, 512)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    add_width_flags(parser)
    add_image_size_flag(parser)
    parser.add_argument("--batch_size", type=at_least(1),
                        help="training batch size (default: 8 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=at_least(1),
                        help="timed training steps per configuration (default: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=at_least(0),
                        help="untimed steps first, compilation included (default: 3 on CUDA, 1 on CPU)")
    add_device_flags(parser)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="include torch.compile: auto = on CUDA only (on CPU the C++ build takes "
                             "minutes)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="include bf16 autocast: auto = where the measured bf16 matmul rate is at least "
                             "half the fp32 one (native bf16; CPUs without it emulate bf16 tens of times "
                             "slower)")
    parser.add_argument("--data_path",
                        help="a train/good folder for the synthesis rows (default: demo images made in a "
                             "temp folder)")
    parser.add_argument("--anomaly_source_path",
                        help="texture folder for the synthesis rows (default: the demo textures)")
    parser.add_argument("--threads", type=at_least(1),
                        help="CPU threads for torch (default: torch's choice); on a CPU shared with other "
                             "jobs, 1 (or OMP_WAIT_POLICY=PASSIVE) avoids OpenMP threads spinning against "
                             "each other")
    parser.add_argument("--seed", type=at_least(0), default=0,
                        help="seed of the weights, the batch and the synthesis")
    parser.add_argument("--output", default="results/bench_draem.json",
                        help="JSON file for the results (written atomically)")
    args = parser.parse_args(argv)
    check_image_size(args.image_size)
    for name in ("base_width", "seg_base_width", "batch_size", "steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean wall time of `fn` over `calls` calls, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak memory allocated by torch since the last reset. CPU: peak resident set of this process so
    far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if platform.system() == "Darwin" else kib / 2**10  # macOS reports bytes


def matmul_tflops(device: torch.device, side: int, dtype: torch.dtype) -> float:
    """Measured rate of a square matmul in `dtype`: the device's practical peak for dense math."""
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    seconds_per_call(lambda: a @ b, 1, device)
    calls = 1
    while (elapsed := seconds_per_call(lambda: a @ b, calls, device) * calls) < 0.5 and calls < 1000:
        calls *= 4
    return 2 * side**3 * calls / elapsed / 1e12


def benchmark_data(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path]:
    """The train/good folder and texture folder the synthesis reads: the flags', else demo data made in
    `scratch`."""
    if args.data_path is not None and args.anomaly_source_path is not None:
        return Path(args.data_path), Path(args.anomaly_source_path)
    demo = make_demo_dataset(scratch, image_size=max(args.image_size), n_train=16, n_test_good=1,
                             n_test_per_defect=1, n_sources=8)
    train_dir = demo.mvtec_root / demo.categories[0] / "train" / "good"
    return Path(args.data_path or train_dir), Path(args.anomaly_source_path or demo.texture_root)


def raw_batch(dataset: TrainImageDataset, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One collated uint8 batch from the raw dataset, on `device`."""
    batch = next(iter(DataLoader(dataset, batch_size=batch_size)))
    return {key: value.to(device) for key, value in batch.items()}


def make_model(args: argparse.Namespace, device: torch.device, channels_last: bool,
               compile: bool) -> DraemModel:
    torch.manual_seed(args.seed)
    return prepare_model(DraemModel(args.base_width, args.seg_base_width).to(device), channels_last, compile)


def count_train_flops(args: argparse.Namespace, device: torch.device, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one fp32 training step (forward + backward) on `batch`."""
    model = make_model(args, device, False, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    with FlopCounterMode(display=False) as counter:
        train_step(model, model, DraemLoss(), optimizer, batch["image"], batch["augmented_image"],
                   batch["anomaly_mask"])
    return counter.get_total_flops()


def bench_training(
    args: argparse.Namespace, device: torch.device, options: Options, batch: dict[str, torch.Tensor],
    raw: dict[str, torch.Tensor], step_flops: int, matmul: dict[str, float],
) -> dict:
    """Time one training configuration; every configuration starts from the same weights and batch."""
    model = make_model(args, device, options.channels_last, options.compile)
    optimizer, criterion = torch.optim.Adam(model.parameters(), lr=1e-4), DraemLoss()
    generator = device_generator(device, args.seed)
    losses = []

    def step() -> None:
        samples = (synthesize_batch(raw["image"], raw.get("source"), generator) if options.device_synthesis
                   else batch)
        loss, *_ = train_step(model, model, criterion, optimizer, samples["image"],
                              samples["augmented_image"], samples["anomaly_mask"], options.precision,
                              options.channels_last)
        losses.append(loss)

    reset_peak_memory(device)
    started = time.perf_counter()
    seconds_per_call(step, args.warmup, device)
    warmup_seconds = time.perf_counter() - started
    seconds = seconds_per_call(step, args.steps, device)
    achieved = step_flops / seconds / 1e12
    return {
        "config": options.label(), "samples_per_s": args.batch_size / seconds, "step_ms": 1000 * seconds,
        "warmup_s": warmup_seconds, "loss_after": losses[-1].item(), "achieved_tflops": achieved,
        "fraction_of_bf16_matmul": achieved / matmul["bf16"],
        "fraction_of_fp32_matmul": achieved / matmul["fp32"], "peak_memory_mib": peak_memory_mib(device),
    }


@torch.no_grad()
def bench_inference(args: argparse.Namespace, device: torch.device, options: Options, repeats: int) -> dict:
    """Latency of scoring a batch (forward in eval mode, anomaly map, image scores) at batch 1 and batch 8."""
    scorer = DraemScorer(make_model(args, device, options.channels_last, options.compile), options.precision,
                         options.channels_last)
    scorer.eval()
    row = {"config": options.label()}
    for batch_size in (1, 8):
        image = torch.rand(batch_size, 3, *args.image_size, device=device)
        forward = functools.partial(scorer, image)
        seconds_per_call(forward, 1, device)  # warm-up (and compilation for this shape)
        row[f"batch{batch_size}_ms"] = 1000 * seconds_per_call(forward, repeats, device)
    return row


def bench_synthesis(
    args: argparse.Namespace, device: torch.device, cpu_dataset: TrainDataset, raw_dataset: TrainImageDataset,
    samples: int
) -> dict:
    """Samples/s of the CPU path and of the device path, at the training image size, with warm source
    caches."""
    for dataset in (cpu_dataset, raw_dataset):
        seconds_per_call(functools.partial(dataset.__getitem__, 0), samples, torch.device("cpu"))
    cpu_seconds = seconds_per_call(functools.partial(cpu_dataset.__getitem__, 0), samples,
                                   torch.device("cpu"))
    generator = device_generator(device, args.seed)
    loader = DataLoader(raw_dataset, batch_size=args.batch_size)
    synchronize(device)
    started, produced = time.perf_counter(), 0
    while produced < samples:  # whole passes over the loader, the way training uses it
        for raw in loader:
            raw = {key: value.to(device) for key, value in raw.items()}
            produced += len(synthesize_batch(raw["image"], raw.get("source"), generator)["image"])
    synchronize(device)
    loader_and_device = produced / (time.perf_counter() - started)
    raw = raw_batch(raw_dataset, args.batch_size, device)
    synthesize_on_device = functools.partial(synthesize_batch, raw["image"], raw.get("source"), generator)
    synthesize_on_device()
    device_only = seconds_per_call(synthesize_on_device, max(1, samples // args.batch_size), device)
    return {
        "cpu_path_samples_per_s": 1 / cpu_seconds,
        "device_path_samples_per_s": loader_and_device,
        "device_synthesis_only_samples_per_s": args.batch_size / device_only,
    }


# (heading, key, format) of the training table's columns after the configuration name.
TRAIN_COLUMNS = (
    ("samples/s", "samples_per_s", "{:.2f}"), ("vs fp32", "speedup", "{:.2f}x"),
    ("step ms", "step_ms", "{:.1f}"), ("warm-up s", "warmup_s", "{:.1f}"),
    ("loss after", "loss_after", "{:.4f}"), ("TFLOP/s", "achieved_tflops", "{:.3f}"),
    ("% bf16 mm", "percent_of_bf16_matmul", "{:.1f}%"), ("% fp32 mm", "percent_of_fp32_matmul", "{:.1f}%"),
    ("peak MiB", "peak_memory_mib", "{:.0f}"),
)


def table_row(name: str, cells: list[str]) -> str:
    return f"{name:52s}" + "".join(f"{cell:>11s}" for cell in cells)


def format_table(results: dict) -> str:
    """The human-readable report of `main`'s results."""
    mm = results["matmul_tflops"]
    lines = [
        (f"device: {results['device']} | torch {results['torch']} | widths {results['widths']} | "
        f"{results['image_size']} px | batch {results['batch_size']}"),
        (f"measured matmul: bf16 {mm['bf16']:.3f} TFLOP/s, fp32 {mm['fp32']:.3f} TFLOP/s; "
        f"one training step: {results['train_flops_per_sample'] / 1e9:.2f} GFLOP per sample"),
        "",
        table_row("training", [heading for heading, _, _ in TRAIN_COLUMNS]),
    ]
    base = results["train"][0]["samples_per_s"]
    for row in results["train"]:
        values = {**row, "speedup": row["samples_per_s"] / base,
                  "percent_of_bf16_matmul": 100 * row["fraction_of_bf16_matmul"],
                  "percent_of_fp32_matmul": 100 * row["fraction_of_fp32_matmul"]}
        lines.append(table_row(row["config"], [fmt.format(values[key]) for _, key, fmt in TRAIN_COLUMNS]))
    lines += [f"{name:52s}skipped: {reason}" for name, reason in results["skipped"].items()]
    synthesis = results["synthesis"]
    lines += [
        "",
        table_row(f"synthesis at {results['image_size']} px", ["samples/s"]),
        table_row("CPU path (1 process)", [f"{synthesis['cpu_path_samples_per_s']:.1f}"]),
        table_row("device path (loader in 1 process)", [f"{synthesis['device_path_samples_per_s']:.1f}"]),
        table_row("device synthesis alone", [f"{synthesis['device_synthesis_only_samples_per_s']:.1f}"]),
        "",
        table_row("inference (eval mode)", ["batch 1 ms", "batch 8 ms"]),
    ]
    lines += [table_row(row["config"], [f"{row['batch1_ms']:.1f}", f"{row['batch8_ms']:.1f}"])
              for row in results["inference"]]
    return "\n".join(lines)


def without_unavailable(options: Options, compile_on: bool, bf16_on: bool) -> Options:
    """`options` less the switches this run leaves out."""
    return replace(options, compile=options.compile and compile_on,
                   precision=options.precision if bf16_on else "fp32")


def skip_reasons(options: Options, compile_on: bool, bf16_on: bool, matmul: dict[str, float]) -> list[str]:
    reasons = []
    if options.compile and not compile_on:
        reasons.append("torch.compile is off (--compile auto leaves it out on CPU, where inductor's C++ "
                       "build takes minutes)")
    if options.precision == "bf16" and not bf16_on:
        reasons.append(f"bf16 is emulated here (bf16 matmul {1e3 * matmul['bf16']:.1f} GFLOP/s "
                       f"vs fp32 {1e3 * matmul['fp32']:.1f}; "
                       "--bf16 on measures it anyway)")
    return reasons


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = select_device(args.device, args.gpu_id)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size, steps, warmup, repeats, synthesis_samples, matmul_side = DEFAULTS[
        "cuda" if device.type == "cuda" else "cpu"]
    args.batch_size = args.batch_size or batch_size
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    seed_everything(args.seed)
    matmul = {"bf16": matmul_tflops(device, matmul_side, torch.bfloat16),
              "fp32": matmul_tflops(device, matmul_side, torch.float32)}
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    # Native bf16 doubles the fp32 rate or better; emulated bf16 (CPUs without AVX512-BF16/AMX) is many times
    # slower.
    bf16_on = args.bf16 == "on" or (args.bf16 == "auto" and matmul["bf16"] >= 0.5 * matmul["fp32"])
    results = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                          else f"cpu ({torch.get_num_threads()} threads)"),
               "torch": torch.__version__, "widths": [args.base_width, args.seg_base_width],
               "image_size": shape_record(args.image_size),
               "batch_size": args.batch_size, "args": vars(args), "matmul_tflops": matmul, "skipped": {},
               "train": [], "inference": []}
    with tempfile.TemporaryDirectory() as scratch:
        train_dir, sources = benchmark_data(args, Path(scratch))
        size = args.image_size
        cpu_dataset, raw_dataset = (TrainDataset(train_dir, sources, size),
                                    TrainImageDataset(train_dir, sources, size))
        raw = raw_batch(raw_dataset, args.batch_size, device)
        batch = synthesize_batch(raw["image"], raw.get("source"), device_generator(device, args.seed))
        step_flops = count_train_flops(args, device, batch)
        results["train_flops_per_sample"] = step_flops / args.batch_size
        for options in TRAIN_CONFIGS:
            effective = without_unavailable(options, compile_on, bf16_on)
            if effective != options and effective.label() in {row["config"] for row in results["train"]}:
                results["skipped"][options.label()] = "; ".join(
                    skip_reasons(options, compile_on, bf16_on, matmul))
                continue
            print(f"training: {effective.label()} ...", flush=True)
            results["train"].append(bench_training(args, device, effective, batch, raw, step_flops, matmul))
        print("synthesis ...", flush=True)
        results["synthesis"] = bench_synthesis(args, device, cpu_dataset, raw_dataset, synthesis_samples)
    for options in INFERENCE_CONFIGS:
        effective = without_unavailable(options, compile_on, bf16_on)
        print(f"inference: {effective.label()} ...", flush=True)
        results["inference"].append(bench_inference(args, device, effective, repeats))
    print(format_table(results))
    atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
