"""Training curves: the PNG that train_draem.py redraws from its log after every epoch and on --resume
(util/pictures.py)."""
import json
import os

import cv2
import pytest
from matplotlib.figure import Figure

import train_draem
from util import pictures
from util.errors import WriteFailed

BASE = "DRAEM_test_0.0001_2_bs4"  # run_base_name(1e-4, 2 epochs, bs 4), spelled out as in METHOD.md §5
SMALL = ["--image_size", "64", "--base_width", "4", "--seg_base_width", "4", "--bs", "4", "--workers", "0",
         "--seed", "0"]
PNG_SHAPE = (350, 1200, 3)  # 12 x 3.5 inches at 100 dpi, the size the module promises

# Two epochs as train_draem.py logs them; validation ran after epoch 2 only (as with --val_every 2).
RECORDS = [
    {"category": "brick", "epoch": 1, "step": 2, "lr": 1e-4, "loss": 1.9, "l2": 0.4, "ssim": 0.9,
     "focal": 0.6, "seconds": 1.5},
    {"category": "brick", "epoch": 2, "step": 4, "lr": 2e-5, "loss": 1.2, "l2": 0.2, "ssim": 0.6,
     "focal": 0.4, "seconds": 1.4, "val_pixel_ap": 0.25, "val_image_auroc": 0.75, "val_seconds": 3.0},
]
TRAINING_ONLY = [{k: v for k, v in r.items() if not k.startswith("val_")} for r in RECORDS]


def train_args(data, out) -> list[str]:
    """Two epochs of a tiny model on the `tiny_mvtec` brick category, writing under `out`."""
    return ["--obj_id", "brick", "--data_path", str(data.mvtec_root), "--anomaly_source_path",
            str(data.texture_root), "--epochs", "2", "--checkpoint_path", str(out / "ckpt"), "--log_path",
            str(out / "logs"), *SMALL]


@pytest.fixture
def drawn(monkeypatch) -> list[Figure]:
    """Every Figure that util/pictures.py makes, to inspect what it drew."""
    figures = []

    class RecordedFigure(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(pictures, "Figure", RecordedFigure)
    return figures


def lines_by_label(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_loss_and_learning_rate_are_drawn_from_every_record(drawn, tmp_path):
    pictures.save_training_curves(TRAINING_ONLY, tmp_path / "curves.png")
    loss_ax, lr_ax = drawn[0].axes  # two panels: no validation metrics were logged
    # Exact equality: the plotted data are the logged floats themselves, no arithmetic in between.
    assert lines_by_label(loss_ax) == {"total": ([1, 2], [1.9, 1.2]), "L2 (MSE)": ([1, 2], [0.4, 0.2]),
                                       "1 − SSIM": ([1, 2], [0.9, 0.6]), "focal": ([1, 2], [0.6, 0.4])}
    assert lines_by_label(lr_ax) == {"Adam lr": ([1, 2], [1e-4, 2e-5])}
    assert lr_ax.get_yscale() == "log"
    assert all(ax.get_title() and ax.get_xlabel() == "epoch" and ax.get_ylabel() and ax.get_legend()
               for ax in drawn[0].axes)


def test_metrics_panel_only_when_val_metrics_are_logged_and_only_at_their_epochs(drawn, tmp_path):
    pictures.save_training_curves(TRAINING_ONLY, tmp_path / "train.png")
    pictures.save_training_curves(RECORDS, tmp_path / "val.png")
    assert [len(figure.axes) for figure in drawn] == [2, 3]
    metrics_ax = drawn[1].axes[2]
    # val_seconds is a duration logged beside the metrics, not a fraction: no curve for it.
    assert lines_by_label(metrics_ax) == {"val_pixel_ap": ([2], [0.25]), "val_image_auroc": ([2], [0.75])}
    assert "validation" in metrics_ax.get_title() and metrics_ax.get_legend() is not None


def test_png_is_valid_and_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "curves.png"
    pictures.save_training_curves(RECORDS, path)
    image = cv2.imread(str(path))
    assert image is not None and image.shape == PNG_SHAPE
    # drawn on, not a blank canvas (a white page with a few lines already has std ~40)
    assert image.std() > 10
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left beside it
    before = path.read_bytes()

    def disk_failure(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_failure)  # the write fails after the bytes went out, before they
                                                    # are durable
    # one line naming the file, not a traceback
    with pytest.raises(WriteFailed, match=f"cannot write {path}"):
        pictures.save_training_curves(TRAINING_ONLY, path)
    assert path.read_bytes() == before  # the previous picture survives whole
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_training_run_writes_the_curves_png(tiny_mvtec, tmp_path):
    train_draem.main(train_args(tiny_mvtec, tmp_path))
    image = cv2.imread(str(tmp_path / "logs" / f"{BASE}_brick_curves.png"))
    assert image is not None and image.shape == PNG_SHAPE and image.std() > 10


def test_curves_exist_after_epoch_1_and_resume_redraws_them_from_the_whole_log(
        tiny_mvtec, tmp_path, monkeypatch):
    argv, png = train_args(tiny_mvtec, tmp_path), tmp_path / "logs" / f"{BASE}_brick_curves.png"
    real_save, calls = train_draem.save_training_curves, []

    def record(records, path, crash=False):
        real_save(records, path)
        calls.append([r["epoch"] for r in records])
        if crash:
            raise KeyboardInterrupt  # as if the process were killed right after epoch 1 was saved

    monkeypatch.setattr(train_draem, "save_training_curves",
                        lambda records, path: record(records, path, crash=True))
    with pytest.raises(SystemExit):
        train_draem.main(argv)
    assert calls == [[1]] and cv2.imread(str(png)) is not None
    after_epoch_1 = png.read_bytes()

    calls.clear()
    monkeypatch.setattr(train_draem, "save_training_curves", record)
    train_draem.main([*argv, "--resume"])
    # Redrawn at once from the resume file's log, then after epoch 2 from both records: continued, not
    # restarted.
    assert calls == [[1], [1, 2]]
    logged = [json.loads(line)["epoch"]
              for line in (tmp_path / "logs" / f"{BASE}_brick_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2] and png.read_bytes() != after_epoch_1
