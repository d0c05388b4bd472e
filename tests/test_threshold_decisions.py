"""Thresholds from calibration to decision: which threshold each decision uses, which set a training run
calibrates on, how the ONNX graph rounds a threshold to float32, and which programs refuse a file made at
another image size.

The fixtures give the image and the pixel threshold values that lead to different decisions, so a decision
taken on the wrong one fails; scores are placed exactly at float32 boundaries, so ">" for ">=" or a threshold
rounded to the nearest float32 (instead of up) fails too.
"""
import argparse
import json
import types

import numpy as np
import pytest
import torch
from test_predict import calibrated_model
from torch import nn

import predict
import test_draem
import train_draem
from engine import calibration
from engine.evaluation import DraemScorer, evaluate_category
from engine.validation import SampleSet
from model_unet import model_from_checkpoint
from util.checkpoints import save_checkpoint
from util.thresholds import (
    TRAINING_SOURCE,
    VALIDATION_SOURCE,
    ThresholdsInUse,
    threshold_path,
    thresholds_in_use,
    write_thresholds,
)

ort = pytest.importorskip("onnxruntime",
                          reason="onnxruntime is not installed (pip install -r requirements.txt)")
pytest.importorskip("onnx", reason="onnx is not installed (pip install -r requirements.txt)")
import export_onnx  # after the skips: it imports onnx and onnxruntime

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread

CPU = torch.device("cpu")
SIZE = 64
BASE = "tiny"
CATEGORY = "brick"


def float32_above(value: float) -> float:
    """The next float32 after float32(value), as a Python float."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def float32_below(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


class StubScorer(nn.Module):
    """Outputs set by hand: the anomaly map is channel 0 of the input, the image score its pixel (0, 0) of
    channel 1."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images[:, :1], images[:, 1, 0, 0]


# Image threshold 0.7, pixel threshold 0.9: float32's nearest to each lies below it (0.69999999, 0.89999998),
# so the graph must round the thresholds up to decide these as Python does in float64 (predict.py,
# test_draem.py).
IMAGE_T, PIXEL_T = 0.7, 0.9
SCORES = [0.8, 0.6, float(np.float32(0.7)), float32_above(0.7)]
MAP_VALUES = [float(np.float32(0.9)), float32_above(0.9), 0.8, 0.1]
EXPECTED_IS_ANOMALOUS = [True, False, False, True]  # scores >= 0.7 in float64
EXPECTED_DEFECT = [False, True, False, False]  # map >= 0.9 in float64
# On the wrong threshold: scores >= 0.9 are [F, F, F, F], maps >= 0.7 are [T, T, T, F]; a threshold rounded to
# the nearest float32 (or passed to torch as is, which rounds it so) calls float32(0.7) and float32(0.9)
# anomalous.


def stub_images() -> torch.Tensor:
    images = torch.zeros(4, 3, 4, 4)
    images[:, 0] = torch.tensor(MAP_VALUES).view(4, 1, 1)
    images[:, 1, 0, 0] = torch.tensor(SCORES)
    return images


def test_python_decisions_at_the_float32_boundaries_are_the_float64_comparisons():
    """The fixture itself: Python compares the float32 values exactly against the float64 thresholds."""
    assert [s >= IMAGE_T for s in SCORES] == EXPECTED_IS_ANOMALOUS
    assert [m >= PIXEL_T for m in MAP_VALUES] == EXPECTED_DEFECT
    csv = predict.scores_csv([f"{i}.png" for i in range(4)], SCORES, [""] * 4, IMAGE_T)
    assert ([line.split(",")[2] for line in csv.splitlines()[1:]]
            == [str(int(d)) for d in EXPECTED_IS_ANOMALOUS])
    mask = predict.defect_mask(torch.tensor(MAP_VALUES).view(1, 2, 2), PIXEL_T)
    assert mask.ravel().tolist() == [255 * d for d in EXPECTED_DEFECT]


def test_pytorch_and_onnx_decide_images_on_the_image_threshold_and_pixels_on_the_pixel_threshold():
    scorer = export_onnx.ThresholdedScorer(StubScorer(), IMAGE_T, PIXEL_T)
    images = stub_images()
    _, _, is_anomalous, defect = scorer(images)
    assert is_anomalous.tolist() == EXPECTED_IS_ANOMALOUS
    # flat maps
    assert defect.flatten(1).all(1).tolist() == defect.flatten(1).any(1).tolist() == EXPECTED_DEFECT

    session = ort.InferenceSession(export_onnx.onnx_bytes(scorer, 4), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert names == ["anomaly_map", "image_score", "is_anomalous", "defect_mask"]
    _, scores, graph_is_anomalous, graph_defect = session.run(None, {"image": images.numpy()})
    np.testing.assert_array_equal(scores, np.float32(SCORES))  # the values reach the comparison unchanged
    assert graph_is_anomalous.tolist() == EXPECTED_IS_ANOMALOUS
    assert graph_defect.reshape(4, -1).all(1).tolist() == EXPECTED_DEFECT
    assert graph_defect.reshape(4, -1).any(1).tolist() == EXPECTED_DEFECT


def test_thresholds_in_use_take_the_image_threshold_for_images_and_the_pixel_one_for_masks(tmp_path):
    write_thresholds(tmp_path, BASE, CATEGORY,
                     {"image_threshold": 0.25, "pixel_threshold": 0.75, "image_size": SIZE})
    file = threshold_path(tmp_path, BASE, CATEGORY)
    assert (thresholds_in_use(tmp_path, BASE, CATEGORY, SIZE, None)
            == ThresholdsInUse(0.25, f"from {file}", 0.75, file))
    # --threshold replaces the image threshold only; the masks keep the file's pixel threshold.
    assert (thresholds_in_use(tmp_path, BASE, CATEGORY, SIZE, 0.5)
            == ThresholdsInUse(0.5, "--threshold", 0.75, file))
    assert thresholds_in_use(tmp_path, "other", CATEGORY, SIZE, None).image is None


@pytest.fixture
def checkpoint(tmp_path):
    save_checkpoint(calibrated_model(4, seed=0), tmp_path / "ckpt", BASE, CATEGORY)
    return tmp_path / "ckpt"


def test_draem_precision_and_recall_use_the_image_threshold_with_a_score_exactly_at_it_called(
        tiny_mvtec, checkpoint, tmp_path):
    model = model_from_checkpoint(checkpoint, BASE, CATEGORY)
    result = evaluate_category(DraemScorer(model), tiny_mvtec.mvtec_root, CATEGORY, SIZE, CPU)
    scores, labels = result.scores.astype(np.float64), result.labels
    assert len(set(scores.tolist())) == len(scores) and labels.sum() == 4
    # The threshold is exactly the best-scoring anomalous image's float32 score: called at ">=", not at ">".
    threshold = float(scores[labels == 1].max())
    called, hits = int((scores >= threshold).sum()), int((scores[labels == 1] >= threshold).sum())
    assert hits == 1 and called >= 1
    # The pixel threshold (2.0) calls nothing; used for the images it would give precision NaN and recall 0.
    write_thresholds(checkpoint, BASE, CATEGORY,
                     {"image_threshold": threshold, "pixel_threshold": 2.0, "image_size": SIZE})

    metrics = test_draem.main(["--obj_id", CATEGORY, "--data_path", str(tiny_mvtec.mvtec_root),
                               "--checkpoint_path", str(checkpoint), "--base_model_name", BASE,
                               "--image_size", str(SIZE), "--device", "cpu", "--output_dir",
                               str(tmp_path / "results")])[CATEGORY]

    assert metrics["image_precision_at_t"] == pytest.approx(1 / called, abs=1e-12)
    assert metrics["image_recall_at_t"] == pytest.approx(1 / 4, abs=1e-12)
    # 2 TP / (called + positives)
    assert metrics["image_f1_at_t"] == pytest.approx(2 * 1 / (called + 4), abs=1e-12)


def reader_args(program: str, tiny_mvtec, checkpoint, tmp_path) -> list[str]:
    pair = ["--checkpoint_path", str(checkpoint), "--base_model_name", BASE, "--obj_id", CATEGORY,
            "--image_size", str(SIZE)]
    return {
        "predict.py": [*pair, "--input", str(tiny_mvtec.mvtec_root / CATEGORY / "test"), "--output_dir",
                       str(tmp_path / "out"), "--device", "cpu"],
        "export_onnx.py": [*pair, "--output", str(tmp_path / "out" / "m.onnx")],
        "test_draem.py": [*pair, "--data_path", str(tiny_mvtec.mvtec_root), "--output_dir",
                          str(tmp_path / "out"), "--device", "cpu"],
    }[program]


@pytest.mark.parametrize("program", ["predict.py", "export_onnx.py", "test_draem.py"])
def test_every_reader_refuses_a_threshold_file_made_at_another_image_size(
        program, tiny_mvtec, checkpoint, tmp_path, capsys):
    main = {"predict.py": predict.main, "export_onnx.py": export_onnx.main,
            "test_draem.py": test_draem.main}[program]
    write_thresholds(checkpoint, BASE, CATEGORY,
                     {"image_threshold": 0.5, "pixel_threshold": 0.6, "image_size": 2 * SIZE})
    with pytest.raises(SystemExit) as exc:
        main(reader_args(program, tiny_mvtec, checkpoint, tmp_path))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    # after test_draem's progress bar, if any
    assert err.count("\n") == 1 and err.splitlines()[-1].startswith("error: ")
    assert str(threshold_path(checkpoint, BASE, CATEGORY)) in err and f"image size {2 * SIZE}" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))  # nothing written


class BrightnessModel(nn.Module):
    """Stands in for DraemModel: its anomaly map is the input's channel 0 (logits 0 and logit(x)), so the
    thresholds calibrated on a set depend on how bright that set's images are."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = images[:, :1].clamp(1e-4, 1 - 1e-4)
        return images, torch.cat([torch.zeros_like(p), torch.log(p) - torch.log1p(-p)], dim=1)


def run_calibration(monkeypatch, tmp_path, val_set: SampleSet | None,
                    training_images: np.ndarray) -> tuple[dict, dict]:
    """train_draem.calibrate_thresholds with a recorder on calibration.calibrate; (what it was given, the
    file)."""
    seen = {}
    real = calibration.calibrate

    def recording(scorer, images, masks, labels, device, batch_size=8, *, source):
        seen.update(images=images, labels=labels, source=source)
        return real(scorer, images, masks, labels, device, batch_size, source=source)

    monkeypatch.setattr(calibration, "calibrate", recording)
    args = argparse.Namespace(good_dir=None, image_size=32, precision="fp32", channels_last=False, bs=8,
                              calibration_samples=24, seed=3, checkpoint_path=str(tmp_path),
                              threshold_rule="f1", dataset="mvtec")
    dataset = types.SimpleNamespace(images=training_images,
                                    draw_source=lambda rng: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    run = types.SimpleNamespace(args=args, model=BrightnessModel(), dataset=dataset, val_set=val_set,
                                base_name=BASE, category=CATEGORY, device=CPU)
    train_draem.calibrate_thresholds(run)
    return seen, json.loads(threshold_path(tmp_path, BASE, CATEGORY).read_text())


def test_training_calibrates_on_the_held_out_set_when_it_validated_else_on_its_training_images(
        monkeypatch, tmp_path):
    """Held-out images dark (0.2), training images bright (0.8): the two sets give other thresholds, so the
    file tells which one the run calibrated on."""
    bright = np.full((3, 32, 32, 3), 204, dtype=np.uint8)
    rng = np.random.default_rng(0)
    labels = torch.tensor([0.0, 1.0] * 6)
    masks = torch.zeros(12, 1, 32, 32)
    masks[1::2, :, 8:20, 8:20] = 1
    held_out = torch.full((12, 3, 32, 32), 0.2)
    held_out[1::2, :, 8:20, 8:20] = torch.from_numpy(rng.uniform(0.5, 1.0, (6, 3, 12, 12)).astype(np.float32))
    val_set = SampleSet(held_out, masks, labels)

    seen, with_validation = run_calibration(monkeypatch, tmp_path / "val", val_set, bright)
    assert seen["images"] is val_set.images and seen["source"] == VALIDATION_SOURCE
    assert with_validation["source"] == VALIDATION_SOURCE and with_validation["n_normal"] == 6

    seen, without = run_calibration(monkeypatch, tmp_path / "train", None, bright)
    assert len(seen["images"]) == 24 and without["source"] == TRAINING_SOURCE
    normal = seen["images"][seen["labels"] == 0]
    # Normal training samples are the bright images themselves (some rotated, with black corners).
    assert len(normal) > 0 and ((normal == 0.8) | (normal == 0)).float().mean() > 0.9
    # Different sets, different decisions: every held-out score is below 0.5 (normals 0.2, anomalies at most
    # the window mean around a 12x12 patch of 0.5..1 on 0.2), every training score above (0.8 images,
    # anomalies blended with beta >= 0 of them and a noise source).
    assert with_validation["image_threshold"] < 0.5 < without["image_threshold"]
