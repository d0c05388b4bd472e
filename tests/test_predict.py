"""predict.py: one CSV row per file, unreadable files not fatal, scores equal to test_draem.py's, calibrated
thresholds used."""
import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_loader import LabelledImageDataset
from engine import evaluation
from engine.evaluation import DraemScorer
from model_unet import DraemModel, anomaly_map, model_from_checkpoint
from predict import defect_mask, main, scores_csv
from util.checkpoints import save_checkpoint
from util.images import read_image, to_chw
from util.metrics import DraemEvaluator, image_scores
from util.pictures import GAP
from util.thresholds import threshold_path, write_thresholds

SIZE = 64
CATEGORY = "widget"
BASE_NAME = "tiny"
REPO = Path(__file__).resolve().parents[1]


def calibrated_model(width: int, seed: int) -> DraemModel:
    """A small random model whose BatchNorm statistics fit its inputs, so scores differ from image to image.

    (Fresh BatchNorm statistics with the tiny initial weights give an almost constant anomaly map.)
    """
    torch.manual_seed(seed)
    model = DraemModel(base_width=width, seg_base_width=width)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0  # running statistics := those of the next batch
    with torch.no_grad():
        model.train()(torch.rand(4, 3, SIZE, SIZE))
    return model.eval()


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    """A tiny MVTec-style category (images of odd sizes, so resizing matters) and a checkpoint pair."""
    rng = np.random.default_rng(0)
    test_dir = tmp_path / "data" / CATEGORY / "test"
    for defect, names in {"good": ["000", "001", "002"], "crack": ["000", "001"]}.items():
        (test_dir / defect).mkdir(parents=True)
        for name in names:
            image = rng.integers(0, 256, (rng.integers(50, 90), rng.integers(50, 90), 3), dtype=np.uint8)
            cv2.imwrite(str(test_dir / defect / f"{name}.png"), image)
            if defect != "good":
                mask = np.zeros(image.shape[:2], np.uint8)
                mask[10:30, 10:30] = 255
                (tmp_path / "data" / CATEGORY / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(tmp_path / "data" / CATEGORY / "ground_truth" / defect / f"{name}_mask.png"),
                            mask)
    save_checkpoint(calibrated_model(4, seed=0), tmp_path / "checkpoints", BASE_NAME, CATEGORY)
    return {"data": tmp_path / "data", "test": test_dir, "checkpoints": tmp_path / "checkpoints",
            "out": tmp_path / "out"}


def predict_args(setup: dict[str, Path], input_path: Path, *extra: str) -> list[str]:
    return ["--checkpoint_path", str(setup["checkpoints"]), "--base_model_name", BASE_NAME, "--category",
            CATEGORY, "--input", str(input_path), "--output_dir", str(setup["out"]), "--image_size",
            str(SIZE), "--device", "cpu", *extra]


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def protocol_scores(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Image scores evaluation.evaluate_category computes for the category (what test_draem.py reports), by
    image path."""
    evaluators = []

    class RecordingEvaluator(DraemEvaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            evaluators.append(self)

    monkeypatch.setattr(evaluation, "DraemEvaluator", RecordingEvaluator)
    model = model_from_checkpoint(setup["checkpoints"], BASE_NAME, CATEGORY)
    evaluation.evaluate_category(DraemScorer(model), setup["data"], CATEGORY, SIZE, torch.device("cpu"),
                                 batch_size=1)
    dataset = LabelledImageDataset(setup["test"], resize_shape=(SIZE, SIZE))
    paths = [str(Path(dataset[i]["path"]).resolve()) for i in range(len(dataset))]
    (evaluator,) = evaluators
    return dict(zip(paths, evaluator.scores[: evaluator.count].tolist()))


def test_scores_equal_test_protocol_and_unreadable_file_is_a_row(setup, monkeypatch):
    expected = protocol_scores(setup, monkeypatch)
    assert len(expected) == 5 and len(set(expected.values())) == 5  # a model that tells the images apart
    (setup["test"] / "crack" / "broken.png").write_bytes(b"not an image")
    (setup["test"] / "notes.txt").write_text("not an image file, not listed")

    main(predict_args(setup, setup["test"], "--batch_size", "3"))

    rows = read_rows(setup["out"] / "scores.csv")
    assert list(rows[0]) == ["path", "image_score", "error"]  # no is_anomalous without --threshold
    found = sorted(p for p in setup["test"].rglob("*.png"))
    assert [row["path"] for row in rows] == [str(p) for p in found]
    broken = next(row for row in rows if row["path"].endswith("broken.png"))
    assert broken["image_score"] == "" and "broken.png" in broken["error"]
    scored = {str(Path(row["path"]).resolve()): float(row["image_score"]) for row in rows
              if row is not broken}
    assert all(row["error"] == "" for row in rows if row is not broken)
    assert scored.keys() == expected.keys()
    for path, score in scored.items():
        assert score == pytest.approx(expected[path], abs=1e-6), path


def test_threshold_column_and_overlays(setup):
    (setup["test"] / "good" / "broken.jpg").write_bytes(b"")
    main(predict_args(setup, setup["test"], "--workers", "1"))
    scores = [float(row["image_score"]) for row in read_rows(setup["out"] / "scores.csv")
              if row["image_score"]]
    threshold = float(np.median(scores))

    main(predict_args(setup, setup["test"], "--threshold", str(threshold), "--save_images", "--batch_size",
                      "2"))

    rows = read_rows(setup["out"] / "scores.csv")
    assert list(rows[0]) == ["path", "image_score", "is_anomalous", "error"]
    flags = [row["is_anomalous"] for row in rows if row["image_score"]]
    assert flags == [str(int(float(row["image_score"]) >= threshold)) for row in rows if row["image_score"]]
    assert "0" in flags and "1" in flags
    assert next(row for row in rows if row["path"].endswith("broken.jpg"))["is_anomalous"] == ""

    overlays = sorted(p.relative_to(setup["out"] / "overlays").as_posix()
                      for p in (setup["out"] / "overlays").rglob("*"))
    expected = [f"{Path(row['path']).relative_to(setup['test']).as_posix()}.png" for row in rows
                if row["image_score"]]
    assert [p for p in overlays if p.endswith(".png")] == sorted(expected)
    overlay = cv2.imread(str(setup["out"] / "overlays" / "crack" / "000.png.png"))
    assert overlay.shape == (SIZE, 2 * SIZE + GAP, 3)  # image | heat map: no ground truth in the wild


def test_threshold_file_gives_is_anomalous_and_defect_masks_and_threshold_overrides_it(setup, capsys):
    paths = sorted(setup["test"].rglob("*.png"))
    model = model_from_checkpoint(setup["checkpoints"], BASE_NAME, CATEGORY).eval()
    with torch.no_grad():  # the maps and scores of the test protocol, computed here directly
        maps = anomaly_map(model(torch.from_numpy(np.stack([to_chw(read_image(p, (SIZE, SIZE)))
                                                            for p in paths])))[1])
    scores = image_scores(maps).tolist()
    # Thresholds equal to a score and to a map value (the median of 5, the middle pixel): ">=" versus ">"
    # matters.
    image_threshold, pixel_threshold = (float(np.median(scores)),
                                        float(np.sort(maps.numpy().ravel())[maps.numel() // 2]))
    write_thresholds(setup["checkpoints"], BASE_NAME, CATEGORY,
                     {"image_threshold": image_threshold, "pixel_threshold": pixel_threshold,
                      "image_size": SIZE})

    main(predict_args(setup, setup["test"], "--save_images"))

    rows = read_rows(setup["out"] / "scores.csv")
    assert [row["path"] for row in rows] == [str(p) for p in paths]
    assert [row["is_anomalous"] for row in rows] == [str(int(s >= image_threshold)) for s in scores]
    assert {row["is_anomalous"] for row in rows} == {"0", "1"}
    assert str(threshold_path(setup["checkpoints"], BASE_NAME, CATEGORY)) in capsys.readouterr().out
    for path, amap in zip(paths, maps[:, 0].numpy()):
        mask = cv2.imread(str(setup["out"] / "masks" / f"{path.relative_to(setup['test']).as_posix()}.png"),
                          cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
        # predict.py scores these 5 images in one batch, as here: the same arithmetic, so the masks agree
        # exactly.
        np.testing.assert_array_equal(mask, np.where(amap >= pixel_threshold, 255, 0))
        assert (mask == 255).any() and (mask == 0).any()

    main(predict_args(setup, setup["test"], "--threshold", str(max(scores) + 1)))

    assert [row["is_anomalous"] for row in read_rows(setup["out"] / "scores.csv")] == ["0"] * len(paths)
    assert "(--threshold)" in capsys.readouterr().out


def test_the_csv_holds_every_digit_of_the_float32_score():
    scores = [float(np.float32(0.123456789)), float(np.float32(1e-9)), None]
    paths = [Path("a.png"), Path("b.png"), Path("c.png")]
    text = scores_csv(paths, scores, ["", "", "unreadable"], 0.1234567)
    rows = list(csv.DictReader(text.splitlines()))
    assert [float(row["image_score"]) for row in rows[:2]] == scores[:2]  # read back exactly, not rounded
    assert [row["is_anomalous"] for row in rows] == ["1", "0", ""] and rows[2]["image_score"] == ""


def test_defect_mask_is_255_at_or_above_the_pixel_threshold_compared_exactly():
    # float32 0.7 is 0.69999999, below the threshold 0.7; 0.75 and 0.8 are at or above 0.75.
    amap = torch.tensor([[[0.7, 0.75], [0.8, 0.1]]], dtype=torch.float32)
    np.testing.assert_array_equal(defect_mask(amap, 0.7), [[0, 255], [255, 0]])
    np.testing.assert_array_equal(defect_mask(amap, 0.75), [[0, 255], [255, 0]])
    assert defect_mask(amap, 0.7).dtype == np.uint8


def test_single_image_input_scores_like_the_folder_run(setup):
    main(predict_args(setup, setup["test"]))
    from_folder = {row["path"]: row["image_score"] for row in read_rows(setup["out"] / "scores.csv")}
    image = setup["test"] / "crack" / "001.png"

    main(predict_args(setup, image, "--batch_size", "1"))

    (row,) = read_rows(setup["out"] / "scores.csv")
    assert row["path"] == str(image) and row["error"] == ""
    assert float(row["image_score"]) == pytest.approx(float(from_folder[str(image)]), abs=1e-6)


def test_output_folder_inside_the_input_folder_is_not_scored(setup):
    args = predict_args({**setup, "out": setup["test"] / "predictions"}, setup["test"], "--save_images")
    main(args)
    first = read_rows(setup["test"] / "predictions" / "scores.csv")
    assert list((setup["test"] / "predictions" / "overlays").rglob("*.png"))

    main(args)

    assert read_rows(setup["test"] / "predictions" / "scores.csv") == first
    assert len(first) == 5


@pytest.mark.parametrize("case", ["no_images", "missing_checkpoint", "bad_image_size", "not_an_image_file",
                                  "threshold_size"])
def test_bad_input_is_one_line_and_exit_1(setup, capsys, case):
    empty = setup["test"].parent / "empty"
    empty.mkdir()
    write_thresholds(setup["checkpoints"], BASE_NAME, CATEGORY,
                     {"image_threshold": 0.5, "pixel_threshold": 0.5,
                                                                 "image_size": 2 * SIZE
                      if case == "threshold_size" else SIZE})
    args = {
        "no_images": predict_args(setup, empty),
        "missing_checkpoint": predict_args({**setup, "checkpoints": empty}, setup["test"]),
        "bad_image_size": predict_args(setup, setup["test"]) + ["--image_size", "48"],
        "not_an_image_file": predict_args(setup, setup["checkpoints"] / f"{BASE_NAME}_{CATEGORY}_.pckl"),
        "threshold_size": predict_args(setup, setup["test"]),  # a threshold file calibrated at another size
    }[case]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (setup["out"] / "scores.csv").exists()


def test_missing_input_exits_1_with_one_stderr_line(setup):
    result = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), *predict_args(setup, setup["test"] / "nowhere")],
        check=False, capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "--input" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
