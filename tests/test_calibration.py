"""Thresholds calibrated without the test set: the F1-max rule, the threshold file, calibrate.py, and scoring
at a threshold."""
import json
import math
import shutil

import cv2
import numpy as np
import pytest
import torch
from test_predict import calibrated_model
from torch import nn

import train_draem
from engine.calibration import calibrate, calibrate_normal_only
from model_unet import anomaly_map, model_from_checkpoint
from tools import calibrate as calibrate_program
from util.checkpoints import save_checkpoint
from util.errors import DraemInputError
from util.metrics import image_scores
from util.thresholds import (
    NORMAL_RULE,
    RULE,
    TRAINING_SOURCE,
    MeanStd,
    metrics_at_threshold,
    read_thresholds,
    threshold_path,
    usable_thresholds,
    write_thresholds,
)

CPU = torch.device("cpu")
SIZE = 64
CATEGORY = "brick"
BASE_NAME = "tiny"


class LookupScorer(nn.Module):
    """Stands in for DraemScorer, outputs set by hand: the map is an image's channel 0, the score pixel (0, 0)
    of channel 1."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images[:, :1], images[:, 1, 0, 0]


def calibration_set(scores: list[float], labels: list[int], maps: list[float] | None = None,
                    mask: list[int] | None = None):
    """Images N×3×2×2 whose LookupScorer score is `scores[i]`; maps and masks (N×1×2×2) from the flat `maps`
    and `mask`."""
    n = len(scores)
    images = torch.zeros(n, 3, 2, 2)
    images[:, 1, 0, 0] = torch.tensor(scores)
    masks = torch.zeros(n, 1, 2, 2)
    if maps is None:  # a map that tells the pixels apart, so the image tests have a defined pixel threshold
        maps, mask = [0.5] * (4 * n), [1] + [0] * (4 * n - 1)
    images[:, 0] = torch.tensor(maps).reshape(n, 2, 2)
    masks[:, 0] = torch.tensor(mask, dtype=torch.float32).reshape(n, 2, 2)
    return images, masks, torch.tensor(labels, dtype=torch.float32)


# Scores are multiples of 1/32 and map values of 1/8: exact in float32, so the expected thresholds are exact
# literals.
def test_image_threshold_maximises_f1():
    # Called anomalous at >= t, positives 29, 26, 10 (/32): F1 = 2 TP / (called + 3) is 0.5, 0.8, 4/6, 4/7,
    # 0.75, 6/9 from the highest threshold down, so 26/32 is the F1-max threshold.
    scores = [3 / 32, 13 / 32, 11 / 32, 26 / 32, 10 / 32, 29 / 32]
    result = calibrate(LookupScorer(), *calibration_set(scores, [0, 0, 0, 1, 1, 1]), CPU, batch_size=4)
    assert result["image_threshold"] == 26 / 32
    assert result["image_f1"] == pytest.approx(0.8, abs=1e-12)  # 4 / 5 in float64
    assert (result["n_normal"], result["n_anomalous"], result["image_size"]) == (3, 3, 2)
    assert result["rule"] == RULE == "F1-max on synthetic anomalies + normal images, never the test set"
    assert result["source"] == TRAINING_SOURCE


def test_image_threshold_tie_goes_to_the_lowest_threshold_and_every_batch_counts():
    # Four negatives above the first positive (27), six between it and the second (20): F1 = 2/7 at t = 27/32
    # (TP 1 of 5 called) and at t = 20/32 (TP 2 of 12 called), lower everywhere else. 2PR/(P+R) from rounded
    # precision and recall makes the higher one larger in the last bit; the rule wants the lower. The
    # positive at 20/32 comes last, alone in the last batch of 4, so a dropped partial batch moves the
    # threshold.
    scores = [31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 3, 20]
    labels = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    result = calibrate(LookupScorer(), *calibration_set([s / 32 for s in scores], labels), CPU, batch_size=4)
    assert result["image_threshold"] == 20 / 32
    assert result["image_f1"] == 2 / 7


def test_pixel_threshold_maximises_f1_over_all_pixels_lowest_on_ties():
    # Eight pixels of two 2x2 maps (/8): anomalous 7, 5, 2; normal 6, 4, 3, 1, 0. F1 from the top:
    # 2/4, 2/5, 4/6, 4/7, 4/8, 6/9, 6/10, 6/11: a tie of 2/3 at 5/8 and 2/8, so 2/8.
    maps = [7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]
    mask = [1, 0, 1, 0, 0, 1, 0, 0]
    result = calibrate(LookupScorer(), *calibration_set([0.25, 0.75], [0, 1], maps, mask), CPU, batch_size=1)
    assert result["pixel_threshold"] == 0.25
    assert result["pixel_f1"] == pytest.approx(2 / 3, abs=1e-12)  # 6 / 9 in float64
    assert result["image_threshold"] == 0.75  # the one anomalous image alone: F1 = 1


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_a_set_without_both_classes_is_a_one_line_error(labels):
    with pytest.raises(DraemInputError, match="--samples"):
        calibrate(LookupScorer(), *calibration_set([0.1, 0.2, 0.3], labels), CPU)


def test_normal_only_rule_is_mean_plus_k_population_std_on_literal_scores():
    # Scores 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, population variance 5 /
    # 4, so with k = 3 the threshold is 2.5 + 3·sqrt(1.25) = 2.5 + 3.3541019662496847 = 5.854101966249685.
    stats = MeanStd()
    stats.update(np.array([1.0, 2.0]))  # in two chunks, as the maps of two batches
    stats.update(np.array([3.0, 4.0]))
    assert (stats.count, stats.mean, stats.std) == (4, 2.5, pytest.approx(math.sqrt(1.25), abs=1e-15))
    assert stats.threshold(3) == pytest.approx(5.854101966249685, abs=1e-14)
    assert stats.threshold(0) == 2.5


def test_normal_only_calibration_takes_image_scores_and_every_pixel_of_every_map():
    # Image scores 1, 2, 3, 4 (/8) in batches of 3 and 1: mean 2.5/8, population std sqrt(1.25)/8, k = 3:
    # (2.5 + 3·sqrt(1.25)) / 8 = 5.854101966249685 / 8 = 0.7317627457812106.
    # Pixels: the 2×2 maps hold 0, 0, 0, 1 (/8) each: 16 values, mean 1/32, variance 1/64·(1/4 - 1/16) =
    # 3/1024, std sqrt(3)/32; threshold 1/32 + 2·sqrt(3)/32 (k = 2) = 0.13950317547305482.
    maps = [0.0, 0.0, 0.0, 1 / 8] * 4
    images, _, _ = calibration_set([1 / 8, 2 / 8, 3 / 8, 4 / 8], [0, 0, 0, 0], maps, [0] * 16)
    three = calibrate_normal_only(LookupScorer(), images, CPU, batch_size=3, k=3.0,
                                  source="validation/good images")
    assert three["image_threshold"] == pytest.approx(0.7317627457812106, abs=1e-15)
    assert three["pixel_threshold"] == pytest.approx((1 + 3 * math.sqrt(3)) / 32, abs=1e-15)
    two = calibrate_normal_only(LookupScorer(), images, CPU, batch_size=1, k=2.0, source="s")
    assert two["pixel_threshold"] == pytest.approx(0.13950317547305482, abs=1e-15)
    assert (three["rule"] == NORMAL_RULE
            == "mean + k·std of the scores on normal images only, never the test set")
    assert (three["k"], three["source"], three["n_normal"], three["n_anomalous"], three["image_size"]) == (
        3.0, "validation/good images", 4, 0, 2)
    with pytest.raises(DraemInputError, match="at least 2 normal images"):
        calibrate_normal_only(LookupScorer(), images[:1], CPU, source="s")


def test_threshold_file_round_trips(tmp_path):
    thresholds = {"image_threshold": 0.123456789012345, "pixel_threshold": 0.5, "image_f1": 0.75,
                  "pixel_f1": 0.5, "rule": RULE, "source": "training images", "n_normal": 3, "n_anomalous": 5,
                  "image_size": 64}
    path = write_thresholds(tmp_path / "ckpt", "base", "carpet", thresholds)

    assert (path == tmp_path / "ckpt" / "base_carpet_threshold.json"
            == threshold_path(tmp_path / "ckpt", "base", "carpet"))
    # every digit of the floats kept
    assert read_thresholds(tmp_path / "ckpt", "base", "carpet") == thresholds
    assert path.read_text() == json.dumps(thresholds, indent=2) + "\n"
    # written atomically: no temporary file left
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert read_thresholds(tmp_path / "ckpt", "base", "wood") is None
    assert usable_thresholds(tmp_path / "ckpt", "base", "carpet", 64) == thresholds
    with pytest.raises(DraemInputError, match="image size 64"):
        usable_thresholds(tmp_path / "ckpt", "base", "carpet", 128)
    for broken in ("{not json", '{"image_threshold": 0.5}',
                   '{"image_threshold": 0.5, "pixel_threshold": "high"}'):
        path.write_text(broken)  # not JSON, no pixel threshold, not a number: each a one-line error, not a
                                 # KeyError later
        with pytest.raises(DraemInputError, match="calibrate"):
            read_thresholds(tmp_path / "ckpt", "base", "carpet")


def test_metrics_at_threshold_literal_cases():
    labels, scores = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.5, 0.7, 0.2])
    # >= 0.5 calls images 2, 3, 4 (0.5 itself included): 2 of them anomalous, 2 of the 3 anomalous found.
    assert metrics_at_threshold(labels, scores, 0.5) == pytest.approx(
        {"image_precision_at_t": 2 / 3, "image_recall_at_t": 2 / 3, "image_f1_at_t": 2 / 3}, abs=1e-12)
    # 4 called, all 3 anomalous: P 3/4, R 1, F1 6/7
    assert metrics_at_threshold(labels, scores, 0.2) == pytest.approx(
        {"image_precision_at_t": 3 / 4, "image_recall_at_t": 1.0, "image_f1_at_t": 6 / 7}, abs=1e-12)
    # nothing called: precision undefined, nothing found
    above_all = metrics_at_threshold(labels, scores, 0.9)
    assert math.isnan(above_all["image_precision_at_t"]) and above_all["image_recall_at_t"] == 0.0
    assert above_all["image_f1_at_t"] == 0.0
    no_anomaly = metrics_at_threshold(np.zeros(5, dtype=int), scores, 0.5)
    assert no_anomaly["image_precision_at_t"] == 0.0 and math.isnan(no_anomaly["image_recall_at_t"])
    assert math.isnan(no_anomaly["image_f1_at_t"])
    assert all(math.isnan(v) for v in metrics_at_threshold(labels, scores, None).values())
    # A float32 score just below 0.7 (float32's nearest to 0.7, 0.69999999) is below the threshold 0.7, as in
    # predict.py.
    below = metrics_at_threshold(np.array([1]), np.array([0.7], dtype=np.float32), 0.7)
    assert below["image_recall_at_t"] == 0.0


def reference_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """The lowest threshold of maximal F1 by walking the scores from the top (independent of the code under
    test)."""
    order = np.argsort(-scores, kind="stable")
    ranked, truth = scores[order], labels[order].astype(np.int64)
    hits, called = np.cumsum(truth), np.arange(1, len(ranked) + 1)
    group_end = np.r_[ranked[1:] != ranked[:-1], True]  # equal scores are called together
    f1 = (2 * hits / (called + truth.sum()))[group_end]
    candidates = ranked[group_end]
    return float(candidates[f1 == f1.max()].min())


@pytest.fixture
def trained_setup(tiny_mvtec, tmp_path) -> dict:
    """A copy of one category WITHOUT its test folder, and a small checkpoint pair for it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_mvtec.mvtec_root / CATEGORY, data / CATEGORY)
    shutil.rmtree(data / CATEGORY / "test")  # calibration must never need it
    save_checkpoint(calibrated_model(4, seed=0), tmp_path / "ckpt", BASE_NAME, CATEGORY)
    args = ["--checkpoint_path", str(tmp_path / "ckpt"), "--base_model_name", BASE_NAME, "--obj_id", CATEGORY,
            "--data_path", str(data), "--anomaly_source_path", str(tiny_mvtec.texture_root), "--image_size",
            str(SIZE), "--samples", "16", "--seed", "1", "--device", "cpu", "--batch_size", "5"]
    return {"data": data, "ckpt": tmp_path / "ckpt", "args": args, "tmp": tmp_path}


def test_calibrate_program_writes_the_f1_max_thresholds_without_the_test_folder(
        trained_setup, monkeypatch, capsys):
    seen = {}

    def recording_calibrate(scorer, images, masks, labels, *args, **kwargs):
        seen.update(images=images, masks=masks, labels=labels)
        return calibrate(scorer, images, masks, labels, *args, **kwargs)

    monkeypatch.setattr(calibrate_program, "calibrate", recording_calibrate)
    path = calibrate_program.main(trained_setup["args"])

    assert path == threshold_path(trained_setup["ckpt"], BASE_NAME, CATEGORY)
    stored = json.loads(path.read_text())
    out = capsys.readouterr().out
    assert (str(path) in out and f"{stored['image_threshold']:.6g}" in out
            and f"{stored['pixel_threshold']:.6g}" in out)
    assert (stored["n_normal"] + stored["n_anomalous"] == 16 and stored["n_normal"] > 0
            and stored["n_anomalous"] > 0)
    assert (stored["image_size"], stored["source"], stored["rule"]) == (SIZE, TRAINING_SOURCE, RULE)
    # The model's maps and scores, computed here directly (test protocol), and F1-max by an independent walk.
    model = model_from_checkpoint(trained_setup["ckpt"], BASE_NAME, CATEGORY).eval()
    with torch.no_grad():
        maps = anomaly_map(model(seen["images"])[1])
    scores = image_scores(maps).numpy()
    assert len(set(scores.tolist())) >= 12  # a model that tells the samples apart (a normal image drawn twice
                                            # scores alike)
    assert stored["image_threshold"] == reference_f1_max(seen["labels"].numpy(), scores)
    assert stored["pixel_threshold"] == reference_f1_max(seen["masks"].numpy().ravel(), maps.numpy().ravel())


def test_calibrate_on_the_held_out_split_is_the_training_runs_validation_set_plus_good_images(
    trained_setup, tiny_mvtec, monkeypatch
):
    good_dir = trained_setup["tmp"] / "good"
    (good_dir / "line2").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "line2/b.jpg"):
        cv2.imwrite(str(good_dir / name), rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    seen = {}

    def recording_calibrate(scorer, images, masks, labels, *args, **kwargs):
        seen.update(images=images, masks=masks, labels=labels)
        return calibrate(scorer, images, masks, labels, *args, **kwargs)

    monkeypatch.setattr(calibrate_program, "calibrate", recording_calibrate)
    path = calibrate_program.main(trained_setup["args"]
                                  + ["--val_fraction", "0.34", "--good_dir", str(good_dir)])

    # What train_draem.py validates on with --val_every and the same split, seed and sample count.
    train_args = train_draem.parse_args([
        "--obj_id", CATEGORY, "--data_path", str(trained_setup["data"]), "--anomaly_source_path",
        str(tiny_mvtec.texture_root), "--image_size", str(SIZE), "--workers", "0", "--seed", "1",
        "--val_every", "1", "--val_fraction", "0.34", "--val_samples", "16", "--checkpoint_path",
        str(trained_setup["tmp"] / "unused")])
    _, val_set = train_draem.make_datasets(train_args, CATEGORY)
    assert torch.equal(seen["images"][:16], val_set.images) and torch.equal(seen["masks"][:16], val_set.masks)
    assert torch.equal(seen["labels"][:16], val_set.labels)
    # Then the good images, read as the test program reads images (sorted paths), normal with empty masks.
    for i, name in enumerate(["a.png", "line2/b.jpg"]):
        expected = cv2.resize(cv2.imread(str(good_dir / name)), (SIZE, SIZE)).astype(np.float32) / 255
        np.testing.assert_array_equal(seen["images"][16 + i].permute(1, 2, 0).numpy(), expected)
    assert seen["labels"][16:].tolist() == [0.0, 0.0] and not seen["masks"][16:].any()
    stored = read_thresholds(trained_setup["ckpt"], BASE_NAME, CATEGORY)
    assert (stored["n_normal"] + stored["n_anomalous"] == 18
            and stored["n_normal"] == 18 - int(val_set.labels.sum()))
    assert "held-out" in stored["source"] and f"2 extra good images from {good_dir}" in stored["source"]
    assert path.is_file()


def test_calibrate_program_bad_flags_are_one_line(trained_setup, capsys):
    for extra in (["--val_fraction", "1.5"], ["--good_dir", str(trained_setup["tmp"] / "missing")]):
        with pytest.raises(SystemExit) as exc:
            calibrate_program.main(trained_setup["args"] + extra)
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert not threshold_path(trained_setup["ckpt"], BASE_NAME, CATEGORY).exists()
