"""Every program's answer to a bad or missing flag or input: one line on stderr, a non-zero exit, nothing
lost.

The catalogue below is the one place bad inputs are listed: a new case is one line. Each case runs the
program's `main` in this process (a subprocess per case would cost a torch import each); the
subprocess test at the end checks that a real process exits the same way without a traceback.
Every case must be refused before the slow work: no epoch, no scoring, no export, no calibration
(`no_slow_work` makes each of them fail the case), and a file from elsewhere never runs code (the
payload resume file would create `marker`).
"""
import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

import export_onnx
import predict
import test_draem
import train_draem
from engine import evaluation
from model_unet import DraemModel
from tools import (
    bench_draem,
    bench_synthesis,
    calibrate,
    convert_anomalib,
    make_demo_data,
    write_ad2_submission,
)
from util import atomic
from util.checkpoints import checkpoint_paths, run_base_name, save_checkpoint
from util.errors import DraemInputError
from util.thresholds import threshold_path

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"train": train_draem.main, "test": test_draem.main, "predict": predict.main,
            "export": export_onnx.main, "convert": convert_anomalib.main, "demo_data": make_demo_data.main,
            "bench": bench_draem.main, "bench_synthesis": bench_synthesis.main, "calibrate": calibrate.main,
            "ad2": write_ad2_submission.main}
BASE = run_base_name(1e-4, 2, 4)
DONE = run_base_name(1e-4, 1, 4)  # the finished run in {done}: 1 epoch, batch 4
TINY = "--image_size 64 --base_width 4 --seg_base_width 4 --workers 0"

# (program, arguments with {placeholders} (see PLACES), a phrase the one line must contain)
TRAIN = ("--obj_id brick --dataset folder --data_path {data} --checkpoint_path {ckpt} --log_path {out} "
         "--image_size 64 --workers 0")
# The finished run's own command line (in a copy of its folders): re-running it must not touch it.
AGAIN = (f"--obj_id brick --dataset folder --data_path {{data}} --anomaly_source_path {{sources}} --epochs 1 "
         f"--bs 4 {TINY}")
DONE_RUN = AGAIN + " --checkpoint_path {done}/ckpt --log_path {done}/logs"
TEST = ("--obj_id brick --dataset folder --data_path {data} --checkpoint_path {ckpt} --image_size 64 "
        "--output_dir {out}")
PREDICT = (f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick --output_dir {{out}} "
           f"--image_size 64")
PREDICT_DONE = (f"--base_model_name {DONE} --obj_id brick --output_dir {{out}} --image_size 64 --input "
                f"{{data}} --checkpoint_path")
EXPORT = f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick --image_size 64"
CALIBRATE = (f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick --dataset folder "
             f"--data_path {{data}}")
CATALOGUE = [
    ("train", "--obj_id brick", "--data_path is required"),
    ("train", TRAIN + " --bs 0", "--bs: must be 1 or more"),
    ("train", TRAIN + " --epochs 0", "--epochs: must be 1 or more"),
    ("train", TRAIN + " --workers -1", "--workers: must be 0 or more"),
    ("train", TRAIN + " --lr -1", "--lr: must be greater than 0"),
    ("train", TRAIN + " --lr abc", "--lr: expected a number"),
    ("train", TRAIN + " --lr inf", "--lr: must be a finite number"),
    ("train", TRAIN + " --sspcab_lambda nan", "--sspcab_lambda: must be a finite number"),
    ("train", TRAIN + " --base_width 0", "--base_width: must be 1 or more"),
    ("train", TRAIN + " --device tpu9", "--device 'tpu9' is not a device"),
    ("train", TRAIN + " --image_size 100", "--image_size must be a positive multiple of 32"),
    ("train", TRAIN + " --seed -3", "--seed: must be 0 or more"),
    ("train", TRAIN.replace("brick", "brikc"), "unknown category 'brikc'"),
    ("train", TRAIN.replace("brick", "../textures"), "'../textures' is not a plain name"),
    ("train", TRAIN.replace("{data}", "{out}/nowhere"), "does not exist"),
    ("train",
     TRAIN.replace("--dataset folder", "--dataset mvtec").replace("brick", "carpet").replace(
         "{data}", "{empty}"), "no .png/.jpg/.jpeg training images"),
    ("train",
     TRAIN.replace("--dataset folder", "--dataset visa").replace("{data}", "{visa}").replace(
         "brick", "candle"), "cannot read VisA split file"),
    ("train", TRAIN + " --no_such_flag", "unrecognized arguments: --no_such_flag"),
    ("train", TRAIN + " --epochs 2 --bs 4 --resume", "cannot read resume file"),
    ("train", TRAIN + " --epochs 1 --bs 4 --resume", "--resume: there is no resume file"),
    ("train", TRAIN + " --epochs 1 --resume --overwrite", "give one of them"),
    ("train", TRAIN.replace("{ckpt}", "{afile}") + " --epochs 1 --bs 4",
     "--checkpoint_path {afile} is a file, not a folder"),
    ("train", TRAIN.replace("{out}", "{afile}") + " --epochs 1 --bs 4",
     "--log_path {afile} is a file, not a folder"),
    ("train", TRAIN.replace("{ckpt}", "{afile}/ckpt") + " --epochs 1 --bs 4", "cannot write there"),
    ("train", TRAIN + " --epochs 1 --bs 4 --anomaly_source_path {textfile_src}",
     "is not a PNG, JPEG, BMP or TIFF image"),
    ("train", TRAIN + " --epochs 1 --bs 4 --anomaly_source_path {empty_src}", "is empty (0 bytes)"),
    ("train", TRAIN + " --good_dir {out}/nothing --epochs 1 --bs 4", "--good_dir"),
    ("train", TRAIN + " --good_dir {textfile_src} --epochs 1 --bs 4", "--good_dir image"),
    ("train", DONE_RUN.replace("{done}", "{payload}") + " --resume",
     "holds a pickled exec, not only tensors"),
    ("train", DONE_RUN.replace("{done}", "{edited}") + " --resume",
     "epoch is not what train_draem.py writes"),
    ("train", DONE_RUN, "a run named " + DONE + " for brick is there; add --resume"),
    ("train", DONE_RUN.replace("{done}/logs", "{out}"), "a run named " + DONE + " for brick is there"),
    ("train", DONE_RUN + " --resume --image_size 96",
     "written with --image_size 64, this run has --image_size 96"),
    ("train", DONE_RUN + " --resume --base_width 8",
     "written with --base_width 4, this run has --base_width 8"),
    ("train", DONE_RUN + " --resume --synthesis gpu", "--synthesis cpu, this run has --synthesis gpu"),
    ("train", DONE_RUN + " --resume --deterministic",
     "--deterministic False, this run has --deterministic True"),
    ("train", DONE_RUN + " --resume --fp32_precision strict",
     "--fp32_precision tf32, this run has --fp32_precision strict"),
    ("train", DONE_RUN.replace(" --anomaly_source_path {sources}", "") + " --resume",
     "--anomaly_source_path a folder"),
    ("train", DONE_RUN.replace("{done}", "{locked}"), "another run (pid"),
    ("train", DONE_RUN.replace("{done}", "{renamed}").replace("brick", "gravel") + " --resume",
     "--obj_id brick, this run"),
    ("train", DONE_RUN.replace("{done}", "{stale_pair}") + " --resume", "cannot be resumed"),
    ("test", "--data_path {data}", "--checkpoint_path"),
    ("test", TEST + " --batch_size 0", "--batch_size: must be 1 or more"),
    ("test", TEST + " --base_model_name nothing_here", "checkpoint not found"),
    ("test", TEST + f" --base_model_name {BASE} nothing_here", "checkpoint not found"),
    ("test", TEST.replace("brick", "../textures"), "'../textures' is not a plain name"),
    ("test", TEST.replace("{out}", "{afile}") + f" --base_model_name {BASE}",
     "--output_dir {afile} is a file"),
    ("test", TEST.replace("{data}", "{jpeg_mask}") + f" --base_model_name {BASE}",
     "holds JPEG data (whatever its name says)"),
    ("test", TEST.replace("{ckpt}", "{text_threshold}") + f" --base_model_name {DONE}",
     "image_threshold is '0.5'"),
    ("predict", PREDICT, "--input"),
    ("predict", PREDICT + " --input {data} --batch_size 0", "--batch_size: must be 1 or more"),
    ("predict", PREDICT + " --input {out}/missing", "does not exist"),
    ("predict", PREDICT + " --input {data} --threshold nan", "--threshold: must be a finite number"),
    ("predict", PREDICT.replace("obj_id brick", "obj_id ../brick") + " --input {data}",
     "'../brick' is not a plain name"),
    ("predict", PREDICT.replace("{out}", "{afile}") + " --input {data}",
     "--output_dir {afile} is a file, not a folder"),
    ("predict", PREDICT.replace("{out}", "{csv_folder}") + " --input {data}", "scores.csv is a folder"),
    ("predict", PREDICT_DONE + " {text_threshold}",
     "{text_threshold}/" + DONE + "_brick_threshold.json: image_threshold is"),
    ("predict", PREDICT_DONE + " {nan_threshold}", "pixel_threshold is nan, not a finite number"),
    ("predict", PREDICT_DONE + " {text_size_threshold}", "image_size is '64', not a positive whole number"),
    ("export", f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick", "--output"),
    ("export", EXPORT + " --output {out}/m.onnx --tolerance 0", "--tolerance: must be greater than 0"),
    ("export", EXPORT + " --output {out}/m.onnx --tolerance inf", "--tolerance: must be a finite number"),
    ("export", EXPORT + " --output {out}/m.onnx --threshold nan", "--threshold: must be a finite number"),
    ("export", EXPORT + " --output {adir}", "--output {adir} is a folder, not a file"),
    ("convert", "{ckpt}/anything.ckpt --obj_id brick", "--checkpoint_path"),
    ("convert", "{out}/missing.ckpt --checkpoint_path {out} --obj_id brick", "checkpoint not found"),
    ("convert", "{out}/missing.ckpt --checkpoint_path {out} --obj_id ../brick",
     "'../brick' is not a plain name"),
    ("demo_data", "--output_dir {out}/demo --n_train 0", "--n_train"),
    ("bench", "--device tpu9", "--device 'tpu9' is not a device"),
    ("bench_synthesis", "--samples 0", "--samples"),
    ("calibrate", f"--checkpoint_path {{ckpt}} --base_model_name {BASE} --obj_id brick", "--data_path"),
    ("calibrate", CALIBRATE + " --val_fraction 1.5", "--val_fraction: must be between 0 and 1"),
    ("calibrate", CALIBRATE + " --image_size 64 --good_dir {out}/nothing", "--good_dir"),
    ("calibrate", CALIBRATE + " --image_size 64 --good_dir {textfile_src}", "--good_dir image"),
    ("calibrate", CALIBRATE.replace("obj_id brick", "obj_id ../brick"), "'../brick' is not a plain name"),
    ("train", TRAIN + " --good_dir {out}/nothing --epochs 1 --bs 4", "--good_dir"),
    ("train", TRAIN + " --image_size 64 64 64", "--image_size takes one side or height and width, got 3"),
    ("test", TEST + " --image_size 64 100", "--image_size must be a positive multiple of 32 per side"),
    ("train", TRAIN + " --threshold_rule mean_std --epochs 1",
     "the normal-only rule (mean_std) needs normal images"),
    ("calibrate", CALIBRATE + " --image_size 64 --rule mean_std",
     "the normal-only rule (mean_std) needs normal images"),
    ("calibrate", CALIBRATE + " --image_size 64 --rule mean_std --k -1", "--k: must be 0 or more"),
    ("train", TRAIN.replace("folder", "mvtec_ad2").replace("brick", "can"),
     "expected <mvtec_ad2>/<category>/train/good"),
    ("ad2", "--data_path {data} --output_dir {out}/submission", "--checkpoint_path is required"),
    ("ad2", "--data_path {data} --output_dir {out}/submission --check_only --obj_id can", "nothing to check"),
    ("ad2", "--data_path {data} --output_dir {out}/submission --checkpoint_path {ckpt} --obj_id tin",
     "unknown category 'tin'"),
]


class Payload:
    """Unpickling this runs `code` (pickle calls exec): what a crafted resume file from elsewhere could
    hold."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.fixture(scope="module")
def done_run(tiny_mvtec, tmp_path_factory) -> Path:
    """A finished 1-epoch run (pair, resume file, thresholds, log) in <folder>/ckpt and <folder>/logs: copy
    before use."""
    folder = tmp_path_factory.mktemp("done")
    places = {"data": tiny_mvtec.mvtec_root, "sources": tiny_mvtec.texture_root, "done": folder}
    train_draem.main(DONE_RUN.format(**places).split())
    return folder


def copy_of_done(done_run: Path, to: Path) -> Path:
    shutil.copytree(done_run, to)
    return to


def edit_thresholds(done_run: Path, to: Path, **changes) -> Path:
    """A copy of the finished run's checkpoint folder whose threshold file has `changes`."""
    ckpt = copy_of_done(done_run, to) / "ckpt"
    path = threshold_path(ckpt, DONE, "brick")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return ckpt


def jpeg_mask_dataset(tiny_mvtec, to: Path) -> Path:
    """A copy of the dataset where one ground-truth mask is a JPEG under its .png name."""
    shutil.copytree(tiny_mvtec.mvtec_root, to)
    mask = to / "brick" / "ground_truth" / "scratch" / "000_mask.png"
    mask.write_bytes(cv2.imencode(".jpg", cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE))[1].tobytes())
    return to


def folder_with(to: Path, files: dict[str, bytes]) -> Path:
    to.mkdir(parents=True)
    for name, data in files.items():
        (to / name).write_bytes(data)
    return to


def payload_run(done_run: Path, to: Path, marker: Path) -> Path:
    """The finished run, its resume file replaced by one whose unpickling would create `marker`."""
    copy_of_done(done_run, to)
    state = {key: 0 for key in train_draem.RESUME_KEYS}
    state["model"] = Payload(f"open({str(marker)!r}, 'w').close()")
    torch.save(state, train_draem.resume_path(to / "ckpt", DONE, "brick"))
    return to


def edited_run(done_run: Path, to: Path) -> Path:
    """The finished run with its resume file's epoch edited into text."""
    copy_of_done(done_run, to)
    path = train_draem.resume_path(to / "ckpt", DONE, "brick")
    state = torch.load(path, weights_only=True)
    torch.save({**state, "epoch": "1"}, path)
    return to


def locked_folder(to: Path) -> Path:
    """Folders where a live run (this very process) holds the lock of the finished run's name."""
    for folder in ("ckpt", "logs"):
        (to / folder).mkdir(parents=True)
        (to / folder / f"{DONE}_brick.lock").write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
    return to


def renamed_run(done_run: Path, to: Path) -> Path:
    """The finished brick run's files renamed to gravel's names (copied by hand, say)."""
    copy_of_done(done_run, to)
    for path in to.rglob(f"{DONE}_brick*"):
        path.rename(path.with_name(path.name.replace("_brick", "_gravel")))
    return to


def stale_pair(done_run: Path, to: Path) -> Path:
    """The finished run's pair and log, without its resume file."""
    copy_of_done(done_run, to)
    train_draem.resume_path(to / "ckpt", DONE, "brick").unlink()
    return to


# Placeholders made only for the cases that use them: name -> builder(tiny_mvtec, done, tmp_path), where
# done() is the finished run's folder (made once per module, on first use).
PLACES = {
    "afile": lambda data, done, tmp: folder_with(tmp / "files", {"afile": b"not a folder"}) / "afile",
    "adir": lambda data, done, tmp: folder_with(tmp / "adir", {}),
    "textfile_src": lambda data, done, tmp: folder_with(tmp / "textfile_src",
                                                        {"a.png": b"hello, I am text", "b.jpg": b"x"}),
    "empty_src": lambda data, done, tmp: folder_with(tmp / "empty_src", {"a.jpg": b""}),
    "visa": lambda data, done, tmp: folder_with(tmp / "visa" / "split_csv",
                                                {"1cls.csv": b"object\n\xff\xfe\n"}).parent,
    "jpeg_mask": lambda data, done, tmp: jpeg_mask_dataset(data, tmp / "jpeg_mask"),
    "done": lambda data, done, tmp: copy_of_done(done(), tmp / "done"),
    "payload": lambda data, done, tmp: payload_run(done(), tmp / "payload", tmp / "marker"),
    "edited": lambda data, done, tmp: edited_run(done(), tmp / "edited"),
    "locked": lambda data, done, tmp: locked_folder(tmp / "locked"),
    "stale_pair": lambda data, done, tmp: stale_pair(done(), tmp / "stale_pair"),
    "renamed": lambda data, done, tmp: renamed_run(done(), tmp / "renamed"),
    "text_threshold": lambda data, done, tmp: edit_thresholds(done(), tmp / "text_threshold",
                                                              image_threshold="0.5"),
    "nan_threshold": lambda data, done, tmp: edit_thresholds(done(), tmp / "nan_threshold",
                                                             pixel_threshold=float("nan")),
    "text_size_threshold": lambda data, done, tmp: edit_thresholds(done(), tmp / "text_size",
                                                                   image_size="64"),
    "csv_folder": lambda data, done, tmp: folder_with(tmp / "csv_folder" / "scores.csv", {}).parent,
}


@pytest.fixture
def places(tiny_mvtec, tmp_path):
    """A checkpoint folder holding one run's pair and a truncated resume file; their bytes, to check nothing
    changes."""
    ckpt = tmp_path / "ckpt"
    save_checkpoint(DraemModel(4, 4), ckpt, BASE, "brick")
    resume = train_draem.resume_path(ckpt, BASE, "brick")
    torch.save({"model": DraemModel(4, 4).state_dict()}, resume)
    resume.write_bytes(resume.read_bytes()[:1000])  # a run killed while copying the file by hand, say
    (tmp_path / "empty" / "carpet" / "train" / "good").mkdir(parents=True)
    return {"data": tiny_mvtec.mvtec_root, "sources": tiny_mvtec.texture_root, "ckpt": ckpt,
            "out": tmp_path / "out", "empty": tmp_path / "empty"}


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_slow_work(monkeypatch):
    """Make the slow work of every program fail the test: an epoch, scoring, the ONNX export, calibration
    samples."""

    def slow(*args, **kwargs):
        raise AssertionError("the slow work started before the bad input was refused")

    for module, name in ((train_draem, "tqdm"), (evaluation, "tqdm"), (predict, "tqdm"),
                         (export_onnx, "onnx_bytes"), (calibrate, "synthetic_set")):
        monkeypatch.setattr(module, name, slow)


@pytest.mark.parametrize(("program", "arguments", "expected"), CATALOGUE,
                         ids=[f"{p}:{a[-40:]}" for p, a, _ in CATALOGUE])
def test_bad_input_is_one_line_a_nonzero_exit_and_loses_nothing(program, arguments, expected, places,
                                                                tiny_mvtec, tmp_path,
                                                                 request, capsys, monkeypatch):
    for name, build in PLACES.items():
        if f"{{{name}}}" in arguments + expected:
            places[name] = build(tiny_mvtec, lambda: request.getfixturevalue("done_run"), tmp_path)
    before = contents(tmp_path)
    request.getfixturevalue("no_slow_work")
    capsys.readouterr()  # what making the places printed
    with pytest.raises(SystemExit) as stopped:
        PROGRAMS[program](arguments.format(**places).split())
    assert stopped.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected.format(**places) in err[0], err
    assert contents(tmp_path) == before, "a bad input changed a file"
    assert not (tmp_path / "marker").exists(), "a file from elsewhere ran code"


def test_a_real_process_exits_1_with_one_line_and_no_traceback(places):
    argv = TRAIN.format(**places).split() + ["--epochs", "2", "--bs", "4", "--resume"]
    result = subprocess.run([sys.executable, "train_draem.py", *argv], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read resume file" in lines[0] and "Traceback" not in result.stderr, (
        result.stderr)


def test_internal_contract_violations_keep_their_traceback():
    """A bug (here: a wrong-size tensor handed to the model by code, not by a flag) is not dressed up as user
    input."""
    with pytest.raises(ValueError, match="divisible by 32"):
        DraemModel(4, 4)(torch.rand(1, 3, 48, 48))


def undecodable_source(tiny_mvtec, to: Path) -> Path:
    """Anomaly sources whose first bytes say PNG but whose data is not: they pass the quick check, fail
    decoding."""
    return folder_with(to, {"a.png": b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10})


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_input_error_inside_a_loader_worker_is_the_same_one_line(workers, tiny_mvtec, tmp_path, capsys):
    """torch re-raises a worker's error with the worker's traceback as its message; the user still sees one
    line."""
    sources = undecodable_source(tiny_mvtec, tmp_path / "sources")
    argv = f"{AGAIN} --checkpoint_path {tmp_path}/ckpt --log_path {tmp_path}/logs".format(
        data=tiny_mvtec.mvtec_root, sources=sources).split()
    with pytest.raises(SystemExit) as stopped:
        train_draem.main([*argv, "--workers", workers])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (err[-1] == f"error: cannot read image {sources / 'a.png'}: not an image OpenCV can decode "
                       f"(corrupt or truncated?)")
    assert not [line for line in err if "Traceback" in line or "worker" in line], err


class NearlyFullDisk(io.FileIO):
    """A raw file with `room` bytes left on its disk: a short write, then ENOSPC (what a filling disk
    does)."""

    def __init__(self, fd: int, room: int):
        super().__init__(fd, "wb")
        self.room = room

    def write(self, data) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = super().write(memoryview(data).cast("B")[: self.room])
        self.room -= written
        return written


def test_a_failed_write_is_one_line_naming_the_file_and_leaves_no_temporary_file(
        tmp_path, places, monkeypatch, capsys):
    """A full disk when predict.py writes its table: one line naming the file, and no temporary file left
    behind."""

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic._FullWrites, "write", full)
    with pytest.raises(SystemExit) as stopped:
        predict.main(PREDICT.format(**places).split()
                     + ["--input", str(places["data"] / "brick" / "test" / "good")])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: cannot write {places['out'] / 'scores.csv'} (No space left on device: free "
                       f"some space, or choose another folder)")
    assert not [line for line in err if "Traceback" in line]
    assert list(places["out"].iterdir()) == [], "a temporary file was left behind"
    # torch.save on a disk that fills up mid-file: the same one line (torch itself reports "unexpected pos"
    # then)
    monkeypatch.undo()
    for room in (0, 5000):
        monkeypatch.setattr(atomic.os, "fdopen",
                            lambda fd, *args, room=room, **kwargs: NearlyFullDisk(fd, room))
        with pytest.raises(atomic.WriteFailed, match="state.pt .No space left on device"):
            atomic.atomic_torch_save({"weights": torch.zeros(100_000)}, tmp_path / "full" / "state.pt")
        assert list((tmp_path / "full").iterdir()) == [], "a temporary file was left behind"


def test_a_lock_whose_process_has_ended_is_taken_over_and_a_live_one_refused(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid now belongs to no process (the system does not reuse it at once)
    lock = tmp_path / "run.lock"
    lock.write_text(f"{socket.gethostname()} pid {ended.pid}\n")  # a run killed with SIGKILL left it
    with atomic.exclusive_lock([(lock, "run")]):
        assert lock.read_text() == f"{socket.gethostname()} pid {os.getpid()}\n"
        with pytest.raises(DraemInputError,
                           match=f"another run \\(pid {os.getpid()}"), atomic.exclusive_lock([(lock, "run")]):
            pass
        assert lock.exists(), "a refused run removed the lock of the run that holds it"
    assert not lock.exists()
    lock.write_text("")  # killed while writing its lock: no pid in it, so stale
    with atomic.exclusive_lock([(lock, "run")]):
        assert lock.read_text().endswith(f"pid {os.getpid()}\n")


def test_training_anew_over_a_finished_run_first_removes_its_thresholds_and_resume_file(
    done_run, tmp_path, tiny_mvtec,
                                                                                         monkeypatch, capsys):
    """--overwrite: before the first step changes the weights, the old thresholds (calibrated for the old
    weights) and the old resume file are gone; Ctrl-C before an epoch is saved says so."""
    folder = copy_of_done(done_run, tmp_path / "done")
    stale = [threshold_path(folder / "ckpt", DONE, "brick"),
             train_draem.resume_path(folder / "ckpt", DONE, "brick")]
    assert all(path.is_file() for path in stale)
    seen = []

    def first_step(*args, **kwargs):
        seen.append([path.exists() for path in stale])
        raise KeyboardInterrupt

    monkeypatch.setattr(train_draem, "train_step", first_step)
    argv = DONE_RUN.format(data=tiny_mvtec.mvtec_root, sources=tiny_mvtec.texture_root, done=folder).split()
    with pytest.raises(SystemExit) as stopped:
        train_draem.main([*argv, "--overwrite"])
    assert stopped.value.code == 130 and seen == [[False, False]]
    assert (capsys.readouterr().err.strip().splitlines()[-1]
            == ("error: brick: interrupted before its first epoch was "
                                                                "saved; start it again (without --resume)"))
    assert all(path.is_file() for path in checkpoint_paths(folder / "ckpt", DONE, "brick")), (
        "the old pair is kept until replaced")


def test_a_checkpoint_that_carries_code_is_refused_and_only_convert_suggests_trust(
        tmp_path, tiny_mvtec, capsys):
    """A .pckl pair from elsewhere holding a pickled callable: never run; only the program with --trust names
    it."""
    marker = tmp_path / "marker"
    save_checkpoint(DraemModel(4, 4), tmp_path / "ckpt", BASE, "brick")
    rec, _ = checkpoint_paths(tmp_path / "ckpt", BASE, "brick")
    torch.save({"weights": Payload(f"open({str(marker)!r}, 'w').close()")}, rec)
    runs = {"test": TEST + f" --base_model_name {BASE}", "predict": PREDICT + " --input {data}",
            "export": EXPORT + " --output {out}/m.onnx",
            "convert": f"{rec} --checkpoint_path {{out}} --obj_id brick"}
    for program, arguments in runs.items():
        with pytest.raises(SystemExit):
            PROGRAMS[program](arguments.format(data=tiny_mvtec.mvtec_root, ckpt=tmp_path / "ckpt",
                                               out=tmp_path / "out").split())
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cannot read checkpoint {rec} (it holds a pickled exec" in err[0], (
            (program, err))
        assert ("--trust" in err[0]) == (program == "convert"), (program, err)
        assert not marker.exists(), f"{program} ran code from a checkpoint"
