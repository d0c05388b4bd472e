"""Benchmark DRAEM's fast path side by side on whatever device is present; print a table, write JSON.

    python -m tools.bench_draem                                   # paper size: widths 128/64, 256 px, batch 8
    python -m tools.bench_draem --base_width 16 --image_size 128  # a small model: a minute on a 2-core CPU

Measured in one run, every training row from the same initial weights and the same batch:
- training samples/s of fp32 eager (TF32 convolutions on GPUs, torch's default), then strict fp32 (no
  TF32) and --deterministic (deterministic kernels, matrix upsampling: their cost), bf16 autocast,
  channels_last, torch.compile each alone, then the last three together, and those fed by the device
  synthesis (a uint8 batch -> samples on the device, every step). Each row also gives its first step's
  loss (same weights and batch: the options change it only by rounding, bf16 by about 1e-3) and the loss
  after its steps (these may part by several per cent: Adam's first steps magnify rounding, and the released
  SSIM range rule switches L between 2 and 1 when the reconstruction's minimum crosses -0.5), the achieved
  FLOP rate (FLOPs of one step counted by torch.utils.flop_counter) as a fraction of the device's measured
  bf16 (and fp32) matmul rate, and peak memory (CUDA: allocated by torch; CPU: the process's peak resident
  set so far, so it only grows down the table);
- on a GPU machine whose CPU has AMX-BF16, the CPU's own fp32 and bf16 training rows (`--cpu_bf16`);
- the estimated wall time of the paper's table (15 MVTec categories x 700 epochs) at each row's rate, on
  one device and with --parallel categories over the machine's GPUs;
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
import os
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
from model_unet import DraemModel, check_image_size, deterministic_upsampling
from train_draem import train_step
from util.atomic import atomic_write_text
from util.cli import ArgumentParser, add_device_flags, add_image_size_flag, add_width_flags, at_least
from util.demo_data import make_demo_dataset
from util.distributed import assign_jobs
from util.errors import one_line_errors
from util.images import shape_record
from util.runtime import (
    CUBLAS_DETERMINISTIC_WORKSPACE,
    prepare_model,
    select_device,
    set_deterministic,
    set_fp32_precision,
)

# MVTec AD's training split, images per category (Bergmann et al., CVPR 2019, Table 1): one epoch draws this
# many samples, so the paper's table is 700 epochs over 3629 images.
MVTEC_TRAIN_IMAGES = {"bottle": 209, "cable": 224, "capsule": 219, "carpet": 280, "grid": 264,
                      "hazelnut": 391, "leather": 245, "metal_nut": 220, "pill": 267, "screw": 320,
                      "tile": 230, "toothbrush": 60, "transistor": 213, "wood": 247, "zipper": 240}
PAPER_EPOCHS = 700


@dataclass(frozen=True)
class Options:
    """One column of fast-path switches; the label names what is on."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    device_synthesis: bool = False  # the training batch is synthesised on the device every step
    fp32_precision: str = "tf32"  # util.runtime.set_fp32_precision: TF32 convolutions on GPUs, or strict fp32
    deterministic: bool = False  # train_draem --deterministic

    def label(self) -> str:
        parts = [self.precision] if self.precision != "fp32" else []
        parts += ["strict fp32"] if self.fp32_precision == "strict" else []
        parts += ["deterministic"] if self.deterministic else []
        parts += [name for name in ("channels_last", "compile") if getattr(self, name)]
        parts += ["device synthesis"] if self.device_synthesis else []
        return " + ".join(parts) or "fp32 eager"


FAST = Options("bf16", channels_last=True, compile=True)
TRAIN_CONFIGS = (Options(), Options(fp32_precision="strict"), Options(deterministic=True), Options("bf16"),
                 Options(channels_last=True), Options(compile=True), FAST,
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
    parser.add_argument("--cpu_bf16", choices=("auto", "on", "off"), default="auto",
                        help="also time training on the CPU in fp32 and bf16: auto = on a CUDA run whose CPU "
                             "has AMX-BF16 (/proc/cpuinfo flag amx_bf16), where CPU bf16 is fast")
    parser.add_argument("--gpus", type=at_least(1),
                        help="GPUs for the --parallel categories estimate of the paper's table (default: "
                             "this machine's)")
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
    return (time.perf_counter() - start) / max(calls, 1)  # no calls (--warmup 0): no time


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


def make_model(args: argparse.Namespace, device: torch.device, channels_last: bool, compile: bool,
               deterministic: bool = False) -> DraemModel:
    torch.manual_seed(args.seed)
    model = DraemModel(args.base_width, args.seg_base_width).to(device)
    if deterministic:
        deterministic_upsampling(model)
    return prepare_model(model, channels_last, compile)


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
    set_fp32_precision(options.fp32_precision)
    set_deterministic(options.deterministic)
    try:
        return _bench_training(args, device, options, batch, raw, step_flops, matmul)
    finally:
        set_deterministic(False)
        set_fp32_precision("tf32")


def _bench_training(
    args: argparse.Namespace, device: torch.device, options: Options, batch: dict[str, torch.Tensor],
    raw: dict[str, torch.Tensor], step_flops: int, matmul: dict[str, float],
) -> dict:
    model = make_model(args, device, options.channels_last, options.compile, options.deterministic)
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
        "warmup_s": warmup_seconds, "first_loss": losses[0].item(), "loss_after": losses[-1].item(),
        "achieved_tflops": achieved,
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
    ("first loss", "first_loss", "{:.4f}"), ("loss after", "loss_after", "{:.4f}"),
    ("TFLOP/s", "achieved_tflops", "{:.3f}"),
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
    if "cpu_bf16" in results:
        cpu = results["cpu_bf16"]
        amx = "AMX-BF16" if cpu["amx_bf16"] else "no AMX"
        lines += ["", table_row(f"CPU training ({cpu['threads']} threads, {amx})",
                                ["samples/s", "% bf16 mm"])]
        lines += [table_row(row["config"], [f"{row['samples_per_s']:.2f}",
                                            f"{100 * row['fraction_of_bf16_matmul']:.1f}%"])
                  for row in cpu["train"]]
        lines.append(f"CPU bf16 is {cpu['bf16_speedup']:.2f}x its fp32")
    estimate = results.get("table_estimate")
    if estimate:
        gpus = str(estimate["gpus"])
        columns = ["1"] if gpus == "1" else ["1", gpus]
        lines += ["", table_row(f"paper's table ({estimate['samples']} samples) at this width",
                                [f"{n} device{'s' if n != '1' else ''} h" for n in columns])]
        lines += [table_row(config, [f"{hours[n]:.1f}" for n in columns])
                  for config, hours in estimate["hours"].items()]
    return "\n".join(lines)


def without_unavailable(options: Options, compile_on: bool, bf16_on: bool, cuda: bool) -> Options:
    """`options` less the switches this run leaves out (TF32 exists only on CUDA GPUs: on a CPU fp32 is
    strict)."""
    return replace(options, compile=options.compile and compile_on,
                   precision=options.precision if bf16_on else "fp32",
                   fp32_precision=options.fp32_precision if cuda else "tf32")


def skip_reasons(options: Options, args: argparse.Namespace, compile_on: bool, bf16_on: bool,
                 matmul: dict[str, float], cuda: bool) -> list[str]:
    reasons = []
    if options.fp32_precision == "strict" and not cuda:
        reasons.append("there is no TF32 on a CPU: its fp32 is always strict")
    if options.compile and not compile_on:
        reasons.append("--compile off" if args.compile == "off" else
                       "torch.compile is off (--compile auto leaves it out on CPU, where inductor's C++ "
                       "build takes minutes)")
    if options.precision == "bf16" and not bf16_on:
        reasons.append("--bf16 off" if args.bf16 == "off" else
                       f"bf16 is emulated here (bf16 matmul {1e3 * matmul['bf16']:.1f} GFLOP/s "
                       f"vs fp32 {1e3 * matmul['fp32']:.1f}; --bf16 on measures it anyway)")
    return reasons


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
    return set(next(flags, []))


def bench_cpu_bf16(args: argparse.Namespace, batch: dict[str, torch.Tensor], flags: set[str]) -> dict:
    """fp32 and bf16 training rows on the CPU at the benchmark's widths (batch 2, a few steps): AMX makes bf16
    fast."""
    cpu = torch.device("cpu")
    small = argparse.Namespace(**{**vars(args), "batch_size": 2, "steps": 2, "warmup": 1})
    cpu_batch = {key: value[:2].to(cpu) for key, value in batch.items()}
    matmul = {"bf16": matmul_tflops(cpu, 1024, torch.bfloat16),
              "fp32": matmul_tflops(cpu, 1024, torch.float32)}
    step_flops = count_train_flops(small, cpu, cpu_batch)
    rows = [bench_training(small, cpu, options, cpu_batch, cpu_batch, step_flops, matmul)
            for options in (Options(), Options("bf16"))]
    return {"threads": torch.get_num_threads(), "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "matmul_tflops": matmul, "train": rows,
            "bf16_speedup": rows[1]["samples_per_s"] / rows[0]["samples_per_s"]}


def table_hours(samples_per_s: float, processes: int = 1) -> float:
    """Hours to train the paper's table (15 MVTec categories x 700 epochs) at `samples_per_s` per process,
    the categories spread over `processes` as train_draem --parallel categories spreads them."""
    counts = list(MVTEC_TRAIN_IMAGES.values())
    loads = [0] * processes
    for count, owner in zip(counts, assign_jobs(counts, processes)):
        loads[owner] += count
    return PAPER_EPOCHS * max(loads) / samples_per_s / 3600


def table_estimates(rows: list[dict], gpus: int) -> dict:
    """Per training row: the paper's table in hours on one device and over `gpus` GPUs (category-parallel)."""
    return {"gpus": gpus, "samples": PAPER_EPOCHS * sum(MVTEC_TRAIN_IMAGES.values()),
            "hours": {row["config"]: {"1": table_hours(row["samples_per_s"]),
                                      str(gpus): table_hours(row["samples_per_s"], gpus)} for row in rows}}


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # The --deterministic row needs cuBLAS's fixed workspace, which cuBLAS reads once, at its first use.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    device = select_device(args.device, args.gpu_id)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size, steps, warmup, repeats, synthesis_samples, matmul_side = DEFAULTS[device.type]
    args.batch_size = args.batch_size or batch_size
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    seed_everything(args.seed)
    matmul = {"bf16": matmul_tflops(device, matmul_side, torch.bfloat16),
              "fp32": matmul_tflops(device, matmul_side, torch.float32)}
    compile_on = args.compile == "on" or (args.compile == "auto" and cuda)
    # Native bf16 doubles the fp32 rate or better; emulated bf16 (CPUs without AVX512-BF16/AMX) is many times
    # slower.
    bf16_on = args.bf16 == "on" or (args.bf16 == "auto" and matmul["bf16"] >= 0.5 * matmul["fp32"])
    results = {"device": (torch.cuda.get_device_name(device) if cuda
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
            effective = without_unavailable(options, compile_on, bf16_on, cuda)
            if effective != options and effective.label() in {row["config"] for row in results["train"]}:
                results["skipped"][options.label()] = "; ".join(
                    skip_reasons(options, args, compile_on, bf16_on, matmul, cuda))
                continue
            print(f"training: {effective.label()} ...", flush=True)
            results["train"].append(bench_training(args, device, effective, batch, raw, step_flops, matmul))
        print("synthesis ...", flush=True)
        results["synthesis"] = bench_synthesis(args, device, cpu_dataset, raw_dataset, synthesis_samples)
        flags = cpu_flags()
        if args.cpu_bf16 == "on" or (args.cpu_bf16 == "auto" and cuda and "amx_bf16" in flags):
            print("CPU fp32 and bf16 training ...", flush=True)
            results["cpu_bf16"] = bench_cpu_bf16(args, batch, flags)
        else:
            results["skipped"]["CPU bf16"] = ("the CPU has no AMX-BF16" if "amx_bf16" not in flags
                                              else "--cpu_bf16 auto measures it on CUDA runs")
    gpus = args.gpus or (torch.cuda.device_count() if cuda else 1)
    results["table_estimate"] = table_estimates(results["train"], gpus)
    for options in INFERENCE_CONFIGS:
        effective = without_unavailable(options, compile_on, bf16_on, cuda)
        print(f"inference: {effective.label()} ...", flush=True)
        results["inference"].append(bench_inference(args, device, effective, repeats))
    print(format_table(results))
    atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
