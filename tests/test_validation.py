"""Validation during training: a fixed held-out synthetic set, never trained on, and the best checkpoint."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train_draem
from data_loader import TrainDataset
from engine import validation
from engine.evaluation import DraemScorer
from model_unet import DraemModel, model_from_checkpoint
from util import checkpoints
from util.checkpoints import checkpoint_paths, load_checkpoint, run_base_name
from util.errors import DraemInputError
from util.images import load_images, to_chw, to_float

SIZE = 64
SMALL = ["--image_size", str(SIZE), "--base_width", "4", "--seg_base_width", "4", "--bs", "4", "--workers",
         "0"]


def arguments(data, out, *extra: str) -> list[str]:
    return ["--obj_id", "brick", "--data_path", str(data.mvtec_root), "--anomaly_source_path",
            str(data.texture_root), "--checkpoint_path", str(out / "ckpt"), "--log_path", str(out / "logs"),
            *SMALL, *extra]


def datasets(data, tmp_path, *extra: str) -> tuple[TrainDataset, validation.SampleSet | None]:
    """What train_draem trains and validates on for these flags."""
    return train_draem.make_datasets(train_draem.parse_args(arguments(data, tmp_path, *extra)), "brick")


def test_validation_set_is_fixed_by_the_seed(tiny_mvtec, tmp_path):
    flags = ("--val_every", "1", "--val_samples", "12", "--val_fraction", "0.34")
    first_train, first = datasets(tiny_mvtec, tmp_path, *flags, "--seed", "3")
    second_train, second = datasets(tiny_mvtec, tmp_path, *flags, "--seed", "3")
    _, other = datasets(tiny_mvtec, tmp_path, *flags, "--seed", "4")
    assert first_train.image_paths == second_train.image_paths
    for name in ("images", "masks", "labels"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.images, other.images)
    assert first.images.shape == (12, 3, SIZE, SIZE) and first.masks.shape == (12, 1, SIZE, SIZE)
    assert 0 < int(first.labels.sum()) < 12, "expected the training mix of anomalous and normal samples"
    torch.testing.assert_close(first.labels, first.masks.flatten(1).amax(1))


def test_held_out_images_are_never_trained_on(tiny_mvtec, tmp_path):
    all_paths = sorted((tiny_mvtec.mvtec_root / "brick" / "train" / "good").glob("*.png"))
    default_train, no_val = datasets(tiny_mvtec, tmp_path)
    assert no_val is None and default_train.image_paths == all_paths, (
        "without validation every image is trained on (paper)")

    train, _ = datasets(tiny_mvtec, tmp_path, "--val_every", "2", "--val_fraction", "0.34")
    held = [p for p in all_paths if p not in train.image_paths]
    assert len(held) == 2 and len(train) == len(train.image_paths) == 4
    np.testing.assert_array_equal(train.images, load_images(train.image_paths, (SIZE, SIZE)))
    held_images = [to_chw(to_float(image)) for image in load_images(held, (SIZE, SIZE))]
    torch.manual_seed(0)
    for i in range(40):
        drawn = train[i]["image"]
        assert not any(np.array_equal(drawn, image) for image in held_images), (
            "a training sample used a held-out image")


def test_split_paths_keeps_at_least_one_image_on_each_side_in_order():
    paths = [Path(f"{i:03d}.png") for i in range(6)]
    kept, held = validation.split_paths(paths, 0.01, seed=0)
    assert len(held) == 1 and len(kept) == 5 and sorted(kept + held) == paths and kept == sorted(kept)
    kept, held = validation.split_paths(paths, 0.99, seed=0)
    assert len(kept) == 1 and len(held) == 5 and held == sorted(held)
    with pytest.raises(DraemInputError, match="only 1"):
        validation.split_paths(paths[:1], 0.5, seed=0)


def test_save_best_survives_resume_and_loads(tiny_mvtec, tmp_path, monkeypatch):
    flags = ("--epochs", "2", "--seed", "3", "--val_every", "1", "--val_samples", "8", "--save_best")
    base = run_base_name(1e-4, 2, 4, seed=3)
    best_base = f"{base}_best"  # README: the best pair is <base>_best_<category>_.pckl
    saved, compared = [], []
    real_save, real_validate, real_write = (checkpoints.atomic_torch_save, train_draem.validate,
                                            train_draem.atomic_write_text)
    monkeypatch.setattr(checkpoints, "atomic_torch_save",
                        lambda obj, path: (saved.append(path), real_save(obj, path)))
    monkeypatch.setattr(train_draem, "validate",
                        lambda run, record: (compared.append(run.best), real_validate(run, record)))

    def crash_after_first_epoch(path, text):
        real_write(path, text)
        raise KeyboardInterrupt  # as if the process were killed right after epoch 1 was saved

    monkeypatch.setattr(train_draem, "atomic_write_text", crash_after_first_epoch)
    with pytest.raises(SystemExit):
        train_draem.main(arguments(tiny_mvtec, tmp_path, *flags))
    monkeypatch.setattr(train_draem, "atomic_write_text", real_write)
    train_draem.main(arguments(tiny_mvtec, tmp_path, *flags, "--resume"))

    log = [json.loads(line)
           for line in (tmp_path / "logs" / f"{base}_brick_log.jsonl").read_text().splitlines()]
    assert ([r["epoch"] for r in log] == [1, 2]
            and all("val_pixel_ap" in r and "val_image_auroc" in r for r in log))
    assert compared == [None, log[0]["val_pixel_ap"]], "the resumed run forgot the best value of epoch 1"
    best = max(r["val_pixel_ap"] for r in log)
    assert torch.load(train_draem.resume_path(tmp_path / "ckpt", base, "brick"),
                      weights_only=False)["best_val_pixel_ap"] == best

    best_pair = checkpoint_paths(tmp_path / "ckpt", best_base, "brick")
    assert all(path in saved for path in best_pair), "the best pair was not written by the atomic writer"
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]
    load_checkpoint(DraemModel(4, 4), tmp_path / "ckpt", best_base, "brick")
    model = model_from_checkpoint(tmp_path / "ckpt", best_base, "brick")
    _, val_set = datasets(tiny_mvtec, tmp_path, *flags)
    rescored = validation.evaluate_synthetic(DraemScorer(model), val_set, torch.device("cpu"), batch_size=4)
    assert rescored["val_pixel_ap"] == pytest.approx(best, abs=1e-6), (
        "the best pair is not the model that scored best")


def test_val_test_reports_test_metrics_when_the_test_folder_exists(tiny_mvtec, tmp_path):
    model = DraemScorer(DraemModel(4, 4))
    found = validation.evaluate_test_set(model, tiny_mvtec.mvtec_root, "brick", SIZE, torch.device("cpu"), 4)
    assert {"test_pixel_ap", "test_image_auroc"} <= set(found)
    shutil.copytree(tiny_mvtec.mvtec_root / "brick" / "train", tmp_path / "brick" / "train")
    assert validation.evaluate_test_set(model, tmp_path, "brick", SIZE, torch.device("cpu"), 4) == {}


def test_validation_flags_are_checked(tiny_mvtec, tmp_path, capsys):
    for bad in (["--save_best"], ["--val_test"], ["--val_every", "1", "--val_fraction", "1"],
                ["--val_every", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            train_draem.parse_args(arguments(tiny_mvtec, tmp_path, *bad))
        assert exit_info.value.code == 1
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize(("epoch", "expected"), [(1, False), (2, True), (3, False), (4, True), (5, True)])
def test_validation_runs_every_n_epochs_and_after_the_last(epoch, expected):
    assert train_draem.validation_due(epoch, every=2, epochs=5) is expected
    assert not train_draem.validation_due(epoch, every=0, epochs=5)
