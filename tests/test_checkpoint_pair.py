"""A crash between the files of an epoch never leaves a run whose checkpoints disagree once it is resumed.

Per epoch, train_draem.py writes the resume file (the record of the run), then the reconstructive and
the discriminative checkpoint, then the log. A crash in between leaves the pair mixed: one file of
this epoch, one of the last. --resume rewrites the pair and the log from the resume file first.
"""
import json

import pytest
import torch

import train_draem
from util import checkpoints
from util.checkpoints import checkpoint_paths, run_base_name

BASE = run_base_name(1e-4, 2, 4, seed=5)


def train_args(data, folder):
    return ["--obj_id", "brick", "--dataset", "folder", "--data_path", str(data.mvtec_root),
            "--anomaly_source_path", str(data.texture_root), "--epochs", "2", "--bs", "4", "--image_size",
            "64", "--base_width", "4", "--seg_base_width", "4", "--workers", "0", "--seed", "5",
            "--checkpoint_path", str(folder / "ckpt"), "--log_path", str(folder / "logs")]


def read_pair(folder):
    return [torch.load(path, weights_only=True) for path in checkpoint_paths(folder / "ckpt", BASE, "brick")]


def crash_before_the_second_discriminative_checkpoint(monkeypatch):
    """Let every write through except the epoch-2 `_seg.pckl`, where the process 'dies'
    (KeyboardInterrupt)."""
    real_save, seg_writes = checkpoints.atomic_torch_save, []

    def save(obj, path):
        if str(path).endswith("__seg.pckl"):
            seg_writes.append(path)
            if len(seg_writes) == 2:
                raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(checkpoints, "atomic_torch_save", save)
    return real_save


def test_resume_heals_a_pair_left_mixed_by_a_crash_between_its_files(tiny_mvtec, tmp_path, monkeypatch):
    train_draem.main(train_args(tiny_mvtec, tmp_path / "full"))
    real_save = crash_before_the_second_discriminative_checkpoint(monkeypatch)
    with pytest.raises(SystemExit):
        train_draem.main(train_args(tiny_mvtec, tmp_path / "cut"))
    monkeypatch.setattr(checkpoints, "atomic_torch_save", real_save)

    full, cut = read_pair(tmp_path / "full"), read_pair(tmp_path / "cut")
    assert all(torch.equal(full[0][k], cut[0][k]) for k in full[0]), (
        "the reconstructive file of epoch 2 was written")
    assert not all(torch.equal(full[1][k], cut[1][k]) for k in full[1]), (
        "the crash should have left epoch 1's _seg file")

    train_draem.main([*train_args(tiny_mvtec, tmp_path / "cut"), "--resume"])  # all epochs done: only heals
    for complete, healed in zip(full, read_pair(tmp_path / "cut")):
        assert list(complete) == list(healed)
        assert all(torch.equal(complete[k], healed[k]) for k in complete)
    log = (tmp_path / "cut" / "logs" / f"{BASE}_brick_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]
