"""Multi-process training: torchrun with 2 gloo processes on the CPU, and the single-process defaults.

One torchrun launch (the slow part: every process imports torch) runs this file as its training
script. `probe` then trains four times in each process, recording per rank which files it wrote and
a hash of every training sample it drew:
  full:       2 epochs uninterrupted (DDP);
  cut:        the same run, killed in epoch 2 before that epoch is saved;
  resumed:    the cut run continued with --resume;
  categories: both demo categories with --parallel categories, one per process.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import test_draem
import train_draem
from data_loader import TrainDataset
from model_unet import DraemModel, model_from_checkpoint
from util import checkpoints, distributed
from util.checkpoints import checkpoint_paths, run_base_name, save_checkpoint
from util.errors import DraemInputError
from util.metrics import TABLE_METRICS

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
BASE = run_base_name(1e-4, EPOCHS, 4, seed=5)
RUNS = ("full", "cut", "resumed")
TORCHRUN_TIMEOUT_S = 180


class SimulatedCrash(Exception):
    """Raised in every rank at the same point, as if the job had been killed there."""


def training_args(data_root: Path, texture_root: Path, out: Path) -> list[str]:
    return ["--obj_id", "brick", "--data_path", str(data_root), "--anomaly_source_path", str(texture_root),
            "--epochs", str(EPOCHS), "--checkpoint_path", str(out / "ckpt"), "--log_path", str(out / "logs"),
            "--image_size", "64", "--base_width", "4", "--seg_base_width", "4", "--bs", "4", "--workers", "0",
            "--seed", "5", "--device", "cpu", "--val_every", "1", "--val_samples", "4", "--save_best",
            "--visualize", "--visualize_every", "1"]


def category_args(data_root: Path, texture_root: Path, out: Path) -> list[str]:
    """Both tiny categories (folder layout: every sub-folder with train/good), 2 epochs, small calibration."""
    return ["--obj_id", "-1", "--dataset", "folder", "--data_path", str(data_root), "--anomaly_source_path",
            str(texture_root), "--epochs", str(EPOCHS), "--checkpoint_path", str(out / "ckpt"), "--log_path",
            str(out / "logs"), "--image_size", "64", "--base_width", "4", "--seg_base_width", "4", "--bs",
            "4", "--workers", "0", "--seed", "5", "--device", "cpu", "--calibration_samples", "16"]


def probe(record_dir: Path, data_root: Path, texture_root: Path) -> None:
    """torchrun's entry point in this file: the three runs, with each rank's writes and samples recorded."""
    rank, run = int(os.environ["RANK"]), {"name": ""}

    def note(**event) -> None:
        with (record_dir / f"rank{rank}.jsonl").open("a") as f:
            f.write(json.dumps({"run": run["name"], **event}) + "\n")

    def recording(module, name: str, path_arg: int) -> None:
        write = getattr(module, name)

        def wrapper(*args, **kwargs):
            note(wrote=str(args[path_arg]))
            return write(*args, **kwargs)

        setattr(module, name, wrapper)

    recording(checkpoints, "atomic_torch_save", 1)  # save_checkpoint's writes
    recording(train_draem, "atomic_torch_save", 1)  # the resume file
    recording(train_draem, "atomic_write_text", 0)  # the log
    recording(train_draem, "save_png", 0)  # the sample grids
    draw = TrainDataset.__getitem__

    def recorded_draw(self, index):
        sample = draw(self, index)
        digest = hashlib.sha1(b"".join(sample[k].tobytes()
                                       for k in ("image", "augmented_image", "anomaly_mask")))
        note(sample=digest.hexdigest(), idx=sample["idx"])
        return sample

    TrainDataset.__getitem__ = recorded_draw
    step = train_draem.train_step

    def recorded_step(*args, **kwargs):  # this rank's own loss and parts, before any reduction over the ranks
        train_mode = args[1].training  # the DraemModel itself (args[0] is DDP around it)
        loss, parts, *rest = step(*args, **kwargs)
        note(step_loss=loss.item(), step_parts={name: value.item() for name, value in parts.items()},
             train_mode=train_mode)
        return (loss, parts, *rest)

    train_draem.train_step = recorded_step
    gather = distributed.gather_objects
    calls = {"n": 0}

    def crash_in_epoch_2(obj):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's end, before anything of it is saved
            raise SimulatedCrash
        return gather(obj)

    # One process group for the three runs: train_draem uses a group that exists (re-creating one is slow and
    # racy).
    dist.init_process_group("gloo")
    note(average=distributed.average(torch.tensor([rank + 1.0, 10.0 * (rank + 1)])).tolist())
    run["name"] = "full"
    train_draem.main(training_args(data_root, texture_root, record_dir / "full"))
    run["name"], distributed.gather_objects = "cut", crash_in_epoch_2
    with pytest.raises(SimulatedCrash):
        train_draem.main(training_args(data_root, texture_root, record_dir / "cut"))
    run["name"], distributed.gather_objects = "resumed", gather
    train_draem.main([*training_args(data_root, texture_root, record_dir / "cut"), "--resume"])
    run["name"] = "categories"
    train_draem.main([*category_args(data_root, texture_root, record_dir / "categories"), "--parallel",
                      "categories"])
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tiny_mvtec, tmp_path_factory) -> Path:
    """Launch torchrun once: 2 processes, gloo on the CPU; return the folder with the runs and the per-rank
    records."""
    out = tmp_path_factory.mktemp("ddp")
    # One thread per process (torchrun's own default for several), as the in-process reference runs use.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(out), str(tiny_mvtec.mvtec_root), str(tiny_mvtec.texture_root)]
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=TORCHRUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def records(out: Path, rank: int, run: str, key: str) -> list:
    lines = (out / f"rank{rank}.jsonl").read_text().splitlines()
    return [event[key] for event in map(json.loads, lines) if event["run"] == run and key in event]


def test_two_gloo_processes_train_and_only_rank_0_writes(ddp_runs, tiny_mvtec, tmp_path):
    ckpt = ddp_runs / "full" / "ckpt"
    written = set(records(ddp_runs, 0, "full", "wrote"))
    expected = {*checkpoint_paths(ckpt, BASE, "brick"), *checkpoint_paths(ckpt, f"{BASE}_best", "brick"),
                train_draem.resume_path(ckpt, BASE, "brick"),
                ddp_runs / "full" / "logs" / f"{BASE}_brick_log.jsonl"}
    assert {str(p) for p in expected} <= written
    assert any(p.endswith(".png") for p in written)
    assert all(records(ddp_runs, 1, run, "wrote") == [] for run in RUNS), "rank 1 wrote files"
    assert not list(ckpt.glob("*.tmp")) and not list(ckpt.glob(".*"))

    log = [json.loads(line)
           for line in (ddp_runs / "full" / "logs" / f"{BASE}_brick_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all("val_pixel_ap" in r for r in log)
    state = torch.load(train_draem.resume_path(ckpt, BASE, "brick"), weights_only=False)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    results = test_draem.main(["--obj_id", "brick", "--data_path", str(tiny_mvtec.mvtec_root),
                               "--checkpoint_path", str(ckpt), "--base_model_name", BASE, "--image_size",
                               "64", "--output_dir", str(tmp_path), "--device", "cpu"])
    metrics = results["brick"]
    # rank 0 calibrated a threshold file: the _at_t metrics are there
    assert set(metrics) == set(TABLE_METRICS)
    # Both classes are in the test set, so every metric is defined except precision at the threshold, which is
    # NaN exactly when the threshold calls no test image anomalous; then nothing is found either.
    defined = {name: value for name, value in metrics.items() if name != "image_precision_at_t"}
    assert all(0.0 <= value <= 1.0 for value in defined.values()), defined
    precision = metrics["image_precision_at_t"]
    assert 0.0 <= precision <= 1.0 or (math.isnan(precision) and metrics["image_recall_at_t"] == 0.0), metrics


def test_the_reduction_over_ranks_is_a_mean(ddp_runs):
    for rank in (0, 1):
        # mean of [1, 10] and [2, 20], on every rank
        assert records(ddp_runs, rank, "", "average") == [[1.5, 15.0]]


def test_the_logged_losses_are_the_mean_over_the_ranks(ddp_runs):
    """Each epoch's logged loss and parts are the mean over both ranks of their own per-step values (a sum
    over the ranks would log about twice as much). Each rank takes 3 of the 5 training images per epoch: one
    step of 4."""
    log = [json.loads(line)
           for line in (ddp_runs / "full" / "logs" / f"{BASE}_brick_log.jsonl").read_text().splitlines()]
    losses = [records(ddp_runs, rank, "full", "step_loss") for rank in (0, 1)]
    parts = [records(ddp_runs, rank, "full", "step_parts") for rank in (0, 1)]
    assert len(losses[0]) == len(losses[1]) == EPOCHS
    # the ranks trained on different samples, so the mean is not either rank's value
    assert losses[0] != losses[1]
    for epoch, record in enumerate(log):
        # float32 per step, averaged in float32: 1e-6 relative is far below the factor 2 of a sum.
        assert record["loss"] == pytest.approx((losses[0][epoch] + losses[1][epoch]) / 2, rel=1e-6)
        for name in ("l2", "ssim", "focal"):
            assert (record[name]
                    == pytest.approx((parts[0][epoch][name] + parts[1][epoch][name]) / 2, rel=1e-6)), name


def test_every_step_trains_in_train_mode_also_after_rank_0_validated(ddp_runs):
    """Rank 0 validates after epoch 1 (the model in eval mode); epoch 2 must train with batch statistics
    again."""
    for rank in (0, 1):
        assert records(ddp_runs, rank, "full", "train_mode") == [True] * EPOCHS, rank


def test_ranks_draw_different_samples_and_share_one_epoch(ddp_runs, tiny_mvtec):
    rank0, rank1 = (records(ddp_runs, rank, "full", "sample") for rank in (0, 1))
    assert rank0 != rank1
    assert set(rank1) - set(rank0), "rank 1 drew nothing that rank 0 did not"
    # One image of 6 is held out for validation; each rank draws its half of the other 5 (rounded up) per
    # epoch.
    n_train = len(list((tiny_mvtec.mvtec_root / "brick" / "train" / "good").glob("*.png"))) - 1
    assert len(rank0) == len(rank1) == EPOCHS * math.ceil(n_train / 2)


def test_ddp_resume_continues_every_rank_where_it_stopped(ddp_runs):
    for rank in (0, 1):
        full, resumed = (records(ddp_runs, rank, "full", "sample"),
                         records(ddp_runs, rank, "resumed", "sample"))
        assert resumed == full[len(full) // EPOCHS:], (
            f"rank {rank} drew other samples in epoch 2 after resuming")
    for run_dir in ("full", "cut"):
        assert (ddp_runs / run_dir / "ckpt" / f"{BASE}_best_brick_.pckl").is_file()
    full_logs, cut_logs = ((ddp_runs / run / "logs" / f"{BASE}_brick_log.jsonl").read_text().splitlines()
                           for run in ("full", "cut"))
    assert [json.loads(line)["epoch"] for line in cut_logs] == [1, 2]
    for full_line, cut_line in zip(full_logs, cut_logs):
        full_record, cut_record = json.loads(full_line), json.loads(cut_line)
        for key in ("loss", "val_pixel_ap"):
            assert cut_record[key] == pytest.approx(full_record[key], abs=1e-6), key
    for name in (BASE, f"{BASE}_best"):
        full_model = model_from_checkpoint(ddp_runs / "full" / "ckpt", name, "brick")
        cut_model = model_from_checkpoint(ddp_runs / "cut" / "ckpt", name, "brick")
        for (key, full_value), cut_value in zip(full_model.state_dict().items(),
                                                cut_model.state_dict().values()):
            torch.testing.assert_close(cut_value, full_value, rtol=0, atol=1e-6, msg=f"{name}: {key}")


def test_category_parallel_processes_train_each_category_as_a_single_process_would(ddp_runs, tiny_mvtec,
                                                                                   tmp_path, one_thread):
    """--parallel categories: each process trains one whole category on its own (seed 5 itself, the full
    batch, no gradient averaging) and writes its files; process 0 writes the summary. Every checkpoint
    equals, bit for bit, the one a plain single-process run of both categories writes (here, one thread, as
    each torchrun process)."""
    out = ddp_runs / "categories"
    for rank, category, other in ((0, "brick", "gravel"), (1, "gravel", "brick")):
        written = records(ddp_runs, rank, "categories", "wrote")
        pair = {str(p) for p in checkpoint_paths(out / "ckpt", BASE, category)}
        assert pair <= set(written), f"rank {rank}"
        assert not any(f"_{other}_" in Path(p).name for p in written), f"rank {rank} wrote files of {other}"
    summary_file = out / "logs" / f"{BASE}_summary.json"
    assert str(summary_file) in records(ddp_runs, 0, "categories", "wrote")
    assert str(summary_file) not in records(ddp_runs, 1, "categories", "wrote")
    summary = json.loads(summary_file.read_text())
    assert (summary["parallel"], summary["processes"]) == ("categories", 2)
    assert [(run["category"], run["process"], run["epochs"]) for run in summary["runs"]] == [
        ("brick", 0, 2), ("gravel", 1, 2)]

    train_draem.main(category_args(tiny_mvtec.mvtec_root, tiny_mvtec.texture_root, tmp_path))
    for category in ("brick", "gravel"):
        pairs = (checkpoint_paths(out / "ckpt", BASE, category),
                 checkpoint_paths(tmp_path / "ckpt", BASE, category))
        for parallel_file, single_file in zip(*pairs, strict=True):
            parallel, single = (torch.load(f, weights_only=True) for f in (parallel_file, single_file))
            assert list(parallel) == list(single)
            for key in single:
                assert torch.equal(parallel[key], single[key]), f"{category}: {key}"


def test_a_single_process_uses_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    model = DraemModel(4, 4)
    with distributed.process_group("cpu") as device:
        assert device == torch.device("cpu") and not dist.is_initialized()
        assert distributed.wrap_model(model, device) is model
        assert distributed.rank_sampler(range(6)) is None
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)


@pytest.fixture
def one_process_group():
    """A gloo process group of one process in this pytest process, removed afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wraps_the_model_and_refuses_sync_bn_on_the_cpu(one_process_group):
    model = DraemModel(4, 4)
    wrapped = distributed.wrap_model(model, torch.device("cpu"))
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.module is model
    assert len(distributed.rank_sampler(range(6))) == 6
    with pytest.raises(DraemInputError, match="--sync_bn needs CUDA"):
        distributed.wrap_model(DraemModel(4, 4), torch.device("cpu"), sync_bn=True)


def test_sync_bn_keeps_the_checkpoint_format(tmp_path):
    model = DraemModel(4, 4)
    plain = {key: value.clone() for key, value in model.state_dict().items()}
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what wrap_model does with --sync_bn
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    save_checkpoint(model, tmp_path, "sync", "brick")
    loaded = model_from_checkpoint(tmp_path, "sync", "brick")
    assert list(loaded.state_dict()) == list(plain)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, plain[key], rtol=0, atol=0, msg=key)


if __name__ == "__main__":
    probe(*map(Path, sys.argv[1:4]))
