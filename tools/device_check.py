"""One command for a lent GPU machine: the CUDA tests, the benchmark at the paper's size, one summary, all
within 8 minutes.

    python -m tools.device_check                        # on the GPU machine, from the repository root
    python -m tools.device_check --quick --skip_tests   # the same code path on a CPU with tiny settings

1. tests/test_cuda.py under pytest (a subprocess, --tests_timeout), its outcomes read from a JUnit report;
2. tools.bench_draem (a subprocess, --bench_timeout; its JSON read back) at the paper's size (widths
   128/64, 256 px, batch 8): fp32 eager, strict fp32 and --deterministic (their cost), bf16, channels_last
   and compile each alone, the three together, and with the device synthesis; device vs CPU synthesis; the
   achieved fraction of the measured bf16 matmul rate; CPU training in fp32 and bf16 where the CPU has
   AMX-BF16;
3. one summary: the tests (failures named), the speeds, and the estimated wall time of the paper's table
   (15 MVTec categories x 700 epochs) on one GPU of this kind and category-parallel on all of this machine's.
Everything also goes to <output_dir>/device_check.json; the benchmark's own JSON and the JUnit report beside
it.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

from util.atomic import atomic_write_text
from util.cli import ArgumentParser, add_device_flags, at_least
from util.errors import one_line_errors

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = "tests/test_cuda.py"
PAPER_CONFIG = "fp32 eager"  # the paper's training, bit for bit the default
# Timed and warm-up steps per benchmark row: 10 + 2 keep the whole benchmark near 4 minutes on a GPU.
BENCH_STEPS, BENCH_WARMUP = 10, 2
QUICK_BENCH = ["--base_width", "4", "--seg_base_width", "4", "--image_size", "32", "--batch_size", "2",
               "--steps", "1", "--warmup", "0", "--compile", "off", "--bf16", "off", "--cpu_bf16", "off"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="tiny benchmark settings (width 4, 32 px, 1 step, no compile): checks the "
                             "program, measures nothing")
    parser.add_argument("--skip_tests", action="store_true", help="leave out the CUDA tests")
    # 225 + 255 s: the whole check stays within 8 minutes even when both run to their limits.
    parser.add_argument("--tests_timeout", type=at_least(1), default=225,
                        help="seconds the CUDA tests may take")
    parser.add_argument("--bench_timeout", type=at_least(1), default=255,
                        help="seconds the benchmark may take")
    add_device_flags(parser, gpu_id=False)  # passed on to the benchmark
    parser.add_argument("--output_dir", default="results/device_check",
                        help="folder for the JSON files and the JUnit report")
    return parser.parse_args(argv)


def read_junit(path: Path) -> dict:
    """Counts and failure messages of a pytest JUnit XML report."""
    outcome = {"passed": 0, "failed": 0, "skipped": 0, "failures": {}, "skips": {}}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            outcome["failed"] += 1
            message = (problem.get("message") or "").strip()
            first_line = message.splitlines()[0][:200] if message else "(no message)"
            outcome["failures"][case.get("name")] = first_line
        elif skipped is not None:
            outcome["skipped"] += 1
            outcome["skips"][case.get("name")] = (skipped.get("message") or "")[:200]
        else:
            outcome["passed"] += 1
    return outcome


def run_cuda_tests(output_dir: Path, timeout_s: int) -> dict:
    """tests/test_cuda.py in a fresh process (its own CUDA context), outcomes from the JUnit report."""
    report = output_dir / "test_cuda.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", CUDA_TESTS,
               f"--junitxml={report}"]
    started = time.time()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                                check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"the CUDA tests ran past --tests_timeout {timeout_s} s", "seconds": timeout_s}
    if not report.is_file():
        output = result.stdout[-500:] + result.stderr[-500:]
        return {"error": f"pytest exited {result.returncode} without a report: {output}",
                "seconds": time.time() - started}
    return {**read_junit(report), "returncode": result.returncode, "seconds": round(time.time() - started, 1)}


def run_bench(bench_args: list[str], output: Path, timeout_s: int) -> dict:
    """tools.bench_draem in a fresh process, its table on this terminal; its results, or {"error": ...}."""
    command = [sys.executable, "-m", "tools.bench_draem", *bench_args, "--output", str(output)]
    try:
        result = subprocess.run(command, cwd=ROOT, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"the benchmark ran past --bench_timeout {timeout_s} s"}
    if result.returncode != 0 or not output.is_file():
        return {"error": f"the benchmark exited {result.returncode} (its output is above)"}
    return json.loads(output.read_text())


def summary_lines(tests: dict | None, bench: dict, seconds: float) -> list[str]:
    """The one summary: tests, speeds and the paper table's estimated wall time."""
    lines = [f"device check on {bench.get('device', 'this machine')} ({seconds:.0f} s)"]
    if tests is None:
        lines.append("CUDA tests: left out (--skip_tests)")
    elif "error" in tests:
        lines.append(f"CUDA tests: {tests['error']}")
    else:
        lines.append(f"CUDA tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} "
                     f"skipped ({tests['seconds']:.0f} s)")
        lines += [f"  FAILED {name}: {message}" for name, message in tests["failures"].items()]
        lines += [f"  skipped {name}: {message}" for name, message in tests["skips"].items()]
    if "error" in bench:
        return [*lines, f"benchmark: {bench['error']}"]
    rows = bench["train"]
    base = rows[0]["samples_per_s"]  # the paper's configuration, always measured first
    fastest = max(rows, key=lambda row: row["samples_per_s"])
    mm = bench["matmul_tflops"]
    lines.append(f"training samples/s (measured bf16 matmul {mm['bf16']:.1f} TFLOP/s, fp32 "
                 f"{mm['fp32']:.1f}):")
    lines += [f"  {row['config']:48s} {row['samples_per_s']:9.2f}  {row['samples_per_s'] / base:5.2f}x  "
              f"{100 * row['fraction_of_bf16_matmul']:5.1f}% of bf16 matmul" for row in rows]
    lines += [f"  {name:48s} skipped: {reason}" for name, reason in bench.get("skipped", {}).items()]
    synthesis = bench["synthesis"]
    lines.append(f"synthesis samples/s: CPU path {synthesis['cpu_path_samples_per_s']:.1f} (one process), "
                 f"device path {synthesis['device_path_samples_per_s']:.1f}, "
                 f"device alone {synthesis['device_synthesis_only_samples_per_s']:.1f}")
    if "cpu_bf16" in bench:
        lines.append(f"CPU training bf16 vs fp32 ({bench['cpu_bf16']['threads']} threads): "
                     f"{bench['cpu_bf16']['bf16_speedup']:.2f}x")
    estimate = bench["table_estimate"]
    gpus = str(estimate["gpus"])
    paper = estimate["hours"][PAPER_CONFIG]
    fast = estimate["hours"][fastest["config"]]
    one = "this CPU" if bench.get("device", "").startswith("cpu") else "one GPU"
    parallel = f", {paper[gpus]:.1f} h with --parallel categories on {gpus} GPUs" if gpus != "1" else ""
    lines.append(f"paper's table (15 categories x 700 epochs, {estimate['samples']} samples) at "
                 f"{PAPER_CONFIG}: {paper['1']:.1f} h on {one}{parallel}; {fastest['config']} "
                 f"({fastest['samples_per_s'] / base:.2f}x): {fast['1']:.1f} h"
                 + (f", {fast[gpus]:.1f} h" if gpus != "1" else ""))
    return lines


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tests = None if args.skip_tests else run_cuda_tests(output_dir, args.tests_timeout)
    bench_args = QUICK_BENCH if args.quick else ["--steps", str(BENCH_STEPS), "--warmup", str(BENCH_WARMUP)]
    bench = run_bench([*bench_args, "--device", args.device], output_dir / "bench_draem.json",
                      args.bench_timeout)
    lines = summary_lines(tests, bench, time.time() - started)
    print("\n" + "\n".join(lines))
    summary = {"tests": tests, "bench": bench, "summary": lines, "seconds": round(time.time() - started, 1)}
    atomic_write_text(output_dir / "device_check.json", json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
