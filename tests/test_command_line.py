"""Every program's answer to a bad or missing flag or input: one line on stderr, a non-zero exit, nothing lost.

The catalogue below is the one place bad inputs are listed: a new case is one line. Each case runs the
program's `main` in this process (a subprocess per case would cost a torch import each); the
subprocess test at the end checks that a real process exits the same way without a traceback.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export_onnx
import predict
import test_draem
import train_draem
from model_unet import DraemModel
from tools import bench_draem, bench_synthesis, calibrate, convert_anomalib, make_demo_data
from util.checkpoints import run_base_name, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"train": train_draem.main, "test": test_draem.main, "predict": predict.main, "export": export_onnx.main,
            "convert": convert_anomalib.main, "demo_data": make_demo_data.main, "bench": bench_draem.main,
            "bench_synthesis": bench_synthesis.main, "calibrate": calibrate.main}
BASE = run_base_name(1e-4, 2, 4)

# (program, arguments with {data} {sources} {ckpt} {out} placeholders, a phrase the one line must contain)
TRAIN = "--obj_id brick --dataset folder --data_path {data} --checkpoint_path {ckpt} --log_path {out} --image_size 64 --workers 0"
TEST = "--obj_id brick --dataset folder --data_path {data} --checkpoint_path {ckpt} --image_size 64 --output_dir {out}"
PREDICT = f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick --output_dir {{out}} --image_size 64"
CALIBRATE = f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick --dataset folder --data_path {{data}}"
CATALOGUE = [
    ("train", "--obj_id brick", "--data_path is required"),
    ("train", TRAIN + " --bs 0", "--bs: must be 1 or more"),
    ("train", TRAIN + " --epochs 0", "--epochs: must be 1 or more"),
    ("train", TRAIN + " --workers -1", "--workers: must be 0 or more"),
    ("train", TRAIN + " --lr -1", "--lr: must be greater than 0"),
    ("train", TRAIN + " --lr abc", "--lr: expected a number"),
    ("train", TRAIN + " --device tpu9", "--device 'tpu9' is not a device"),
    ("train", TRAIN + " --image_size 100", "--image_size must be a positive multiple of 32"),
    ("train", TRAIN + " --seed -3", "--seed: must be 0 or more"),
    ("train", TRAIN.replace("brick", "brikc"), "unknown category 'brikc'"),
    ("train", TRAIN.replace("{data}", "{out}/nowhere"), "does not exist"),
    ("train", TRAIN.replace("--dataset folder", "--dataset mvtec").replace("brick", "carpet").replace("{data}", "{empty}"),
     "no .png/.jpg/.jpeg training images"),
    ("train", TRAIN + " --no_such_flag", "unrecognized arguments: --no_such_flag"),
    ("train", TRAIN + " --epochs 2 --bs 4 --resume", "cannot read resume file"),
    ("test", "--data_path {data}", "--checkpoint_path"),
    ("test", TEST + " --batch_size 0", "--batch_size: must be 1 or more"),
    ("test", TEST + " --base_model_name nothing_here", "checkpoint not found"),
    ("predict", PREDICT, "--input"),
    ("predict", PREDICT + " --input {data} --batch_size 0", "--batch_size: must be 1 or more"),
    ("predict", PREDICT + " --input {out}/missing", "does not exist"),
    ("export", f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick", "--output"),
    ("export", f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick --output {{out}}/m.onnx --tolerance 0",
     "--tolerance: must be greater than 0"),
    ("convert", "{ckpt}/anything.ckpt --obj_id brick", "--checkpoint_path"),
    ("convert", "{out}/missing.ckpt --checkpoint_path {out} --obj_id brick", "checkpoint not found"),
    ("demo_data", "--output_dir {out}/demo --n_train 0", "--n_train"),
    ("bench", "--device tpu9", "--device 'tpu9' is not a device"),
    ("bench_synthesis", "--samples 0", "--samples"),
    ("calibrate", f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick", "--data_path"),
    ("calibrate", CALIBRATE + " --val_fraction 1.5", "--val_fraction must be between 0 and 1"),
    ("calibrate", CALIBRATE + " --image_size 64 --good_dir {out}/nothing", "--good_dir"),
    ("train", TRAIN + " --good_dir {out}/nothing --epochs 1 --bs 4", "--good_dir"),
]


@pytest.fixture
def places(tiny_mvtec, tmp_path):
    """A checkpoint folder holding one run's pair and a truncated resume file; their bytes, to check nothing changes."""
    ckpt = tmp_path / "ckpt"
    save_checkpoint(DraemModel(4, 4), ckpt, BASE, "brick")
    resume = train_draem.resume_path(ckpt, BASE, "brick")
    torch.save({"model": DraemModel(4, 4).state_dict()}, resume)
    resume.write_bytes(resume.read_bytes()[:1000])  # a run killed while copying the file by hand, say
    (tmp_path / "empty" / "carpet" / "train" / "good").mkdir(parents=True)
    return {"data": tiny_mvtec.mvtec_root, "sources": tiny_mvtec.texture_root, "ckpt": ckpt, "out": tmp_path / "out",
            "empty": tmp_path / "empty"}


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(("program", "arguments", "expected"), CATALOGUE, ids=[f"{p}:{a[-40:]}" for p, a, _ in CATALOGUE])
def test_bad_input_is_one_line_a_nonzero_exit_and_loses_nothing(program, arguments, expected, places, capsys):
    before = contents(places["ckpt"])
    with pytest.raises(SystemExit) as stopped:
        PROGRAMS[program](arguments.format(**places).split())
    assert stopped.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert contents(places["ckpt"]) == before, "a bad input changed the checkpoint folder"


def test_a_real_process_exits_1_with_one_line_and_no_traceback(places):
    argv = TRAIN.format(**places).split() + ["--epochs", "2", "--bs", "4", "--resume"]
    result = subprocess.run([sys.executable, "train_draem.py", *argv], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read resume file" in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_internal_contract_violations_keep_their_traceback():
    """A bug (here: a wrong-size tensor handed to the model by code, not by a flag) is not dressed up as user input."""
    with pytest.raises(ValueError, match="divisible by 32"):
        DraemModel(4, 4)(torch.rand(1, 3, 48, 48))
