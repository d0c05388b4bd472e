"""MVTec AD 2 on a tree the test builds: its layout, a non-square size through train, test, predict and
export, the normal-only thresholds, the leaderboard metrics at full resolution, and the submission writer
with its refusals."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from test_metrics import reference_aupro

import export_onnx
import predict
import test_draem
import train_draem
from engine.evaluation import DraemScorer
from model_unet import model_from_checkpoint
from tools import calibrate, write_ad2_submission
from util.ad2 import uses_official_counts
from util.checkpoints import checkpoint_paths, run_base_name
from util.errors import DraemInputError
from util.images import read_image, to_chw
from util.layouts import (
    ad2_private_images,
    categories_for,
    evaluation_records,
    train_image_paths,
    validation_image_paths,
)
from util.metrics import METRICS
from util.thresholds import read_thresholds, threshold_path

pytestmark = pytest.mark.usefixtures("one_thread")
ORIGINAL = (40, 72)  # height, width of the tree's images: not square, neither side a multiple of 32
SIZE = ["--image_size", "32", "64"]  # the working size: height 32, width 64
BASE = run_base_name(1e-4, 1, 4)
COUNTS = {"train/good": 4, "validation/good": 3, "test_public/good": 2, "test_public/bad": 2}
PRIVATE = 3  # images per private split
AD2 = ["can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts"]


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth random texture at the tree's image size."""
    return cv2.GaussianBlur(rng.integers(60, 200, (*ORIGINAL, 3)).astype(np.uint8), (5, 5), 0)


def ad2_tree(root: Path, objects=("can", "rice")) -> Path:
    """MVTec AD 2's layout with tiny smooth textures; defects are bright rectangles with 255 masks."""
    for k, category in enumerate(objects):
        rng = np.random.default_rng(k)
        for folder, count in COUNTS.items():
            for i in range(count):
                image = texture(rng)
                if folder == "test_public/bad":
                    mask = np.zeros(ORIGINAL, dtype=np.uint8)
                    mask[8 + 4 * i : 20 + 4 * i, 10:30] = 255
                    image[mask > 0] = 250
                    write_png(root / category / "test_public/ground_truth/bad" / f"{i:03d}_regular_mask.png",
                              mask)
                write_png(root / category / folder / f"{i:03d}_regular.png", image)
        for split, kind in (("test_private", "regular"), ("test_private_mixed", "mixed")):
            for i in range(PRIVATE):
                write_png(root / category / split / f"{i:03d}_{kind}.png", texture(rng))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """`can` trained 1 epoch at 32×64 (validating on validation/good, mean_std thresholds); `rice` a copy."""
    out = tmp_path_factory.mktemp("ad2")
    root, ckpt = ad2_tree(out / "mvtec_ad2"), out / "ckpt"
    train_draem.main(["--dataset", "mvtec_ad2", "--obj_id", "can", "--data_path", str(root), "--epochs", "1",
                      "--bs", "4", "--base_width", "4", "--seg_base_width", "4", "--workers", "0",
                      "--checkpoint_path", str(ckpt), "--log_path", str(out / "logs"), "--val_every", "1",
                      "--val_samples", "8", "--threshold_rule", "mean_std", *SIZE])
    for source, target in zip(checkpoint_paths(ckpt, BASE, "can"), checkpoint_paths(ckpt, BASE, "rice")):
        shutil.copy(source, target)
    shutil.copy(threshold_path(ckpt, BASE, "can"), threshold_path(ckpt, BASE, "rice"))
    return {"root": root, "ckpt": ckpt, "out": out}


def one_line_exit(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def scored(ckpt: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Maps N×32×64 and image scores (N,) of the `can` model on `paths` read at the working size."""
    scorer = DraemScorer(model_from_checkpoint(ckpt, BASE, "can")).eval()
    images = torch.from_numpy(np.stack([to_chw(read_image(path, (32, 64))) for path in paths]))
    with torch.no_grad():
        maps, scores = scorer(images)
    return maps[:, 0].double().numpy(), scores.double().numpy()


def test_the_layout_reads_exactly_mvtec_ad2s_folders(tmp_path):
    root = ad2_tree(tmp_path / "ad2", objects=("can",))
    can = root / "can"
    assert categories_for("mvtec_ad2", "-1", root) == AD2
    assert categories_for("mvtec_ad2", "0", root) == ["can"]
    assert categories_for("mvtec_ad2", "walnuts", root) == ["walnuts"]
    assert train_image_paths("mvtec_ad2", root, "can") == [
        can / f"train/good/{i:03d}_regular.png" for i in range(4)]
    assert validation_image_paths("mvtec_ad2", root, "can") == [
        can / f"validation/good/{i:03d}_regular.png" for i in range(3)]
    truth = can / "test_public/ground_truth/bad"
    assert evaluation_records("mvtec_ad2", root, "can") == [
        (can / "test_public/good/000_regular.png", None, 0),
        (can / "test_public/good/001_regular.png", None, 0),
        (can / "test_public/bad/000_regular.png", truth / "000_regular_mask.png", 1),
        (can / "test_public/bad/001_regular.png", truth / "001_regular_mask.png", 1),
    ]
    assert ad2_private_images(root, "can", "test_private") == [
        can / f"test_private/{i:03d}_regular.png" for i in range(3)]
    assert ad2_private_images(root, "can", "test_private_mixed") == [
        can / f"test_private_mixed/{i:03d}_mixed.png" for i in range(3)]
    (truth / "001_regular_mask.png").unlink()
    with pytest.raises(DraemInputError, match="001_regular_mask.png is missing for test image"):
        evaluation_records("mvtec_ad2", root, "can")
    with pytest.raises(DraemInputError, match="has no validation/good set"):
        validation_image_paths("mvtec", root, "can")


def test_a_non_square_size_trains_tests_predicts_and_exports(trained, tmp_path, capsys):
    root, ckpt = trained["root"], trained["ckpt"]
    lines = (trained["out"] / "logs" / f"{BASE}_can_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1] and "val_pixel_ap" in json.loads(lines[0])

    # The thresholds: mean + 3·std of the scores on validation/good, recomputed with NumPy's mean and std.
    stored = read_thresholds(ckpt, BASE, "can")
    assert stored["rule"] == "mean + k·std of the scores on normal images only, never the test set"
    assert (stored["k"], stored["source"], stored["n_normal"]) == (3.0, "validation/good images", 3)
    assert stored["image_size"] == [32, 64]
    maps, scores = scored(ckpt, validation_image_paths("mvtec_ad2", root, "can"))
    # float64 statistics of float32 values; the two computations differ only in summation order (~1e-15).
    assert stored["image_threshold"] == pytest.approx(np.mean(scores) + 3 * np.std(scores), rel=1e-12)
    assert stored["pixel_threshold"] == pytest.approx(np.mean(maps) + 3 * np.std(maps), rel=1e-12)

    results = test_draem.main(["--dataset", "mvtec_ad2", "--obj_id", "can", "--data_path", str(root),
                               "--checkpoint_path", str(ckpt), "--base_model_name", BASE, *SIZE,
                               "--output_dir", str(tmp_path / "results")])
    assert all(0.0 <= results["can"][m] <= 1.0 for m in (*METRICS, "aupro_005", "seg_f1", "class_f1"))
    table = json.loads((tmp_path / "results" / f"results_{BASE}.json").read_text())["rows"]
    assert {"aupro_005", "seg_f1", "class_f1"} <= set(table[0])
    assert "AU-PRO@0.05" in (tmp_path / "results" / "report.html").read_text()

    csv_path = predict.main(["--checkpoint_path", str(ckpt), "--base_model_name", BASE, "--obj_id", "can",
                             "--input", str(root / "can" / "test_private"),
                             "--output_dir", str(tmp_path / "pred"), *SIZE])
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "path,image_score,is_anomalous,error" and len(rows) == 1 + PRIVATE

    worst = export_onnx.main(["--checkpoint_path", str(ckpt), "--base_model_name", BASE, "--obj_id", "can",
                              "--output", str(tmp_path / "can.onnx"), *SIZE])
    assert worst["anomaly_map"] <= 1e-4 and worst["defect_mask"] == 0
    assert "anomaly_map [batch,1,32,64]" in capsys.readouterr().out


def test_test_public_gets_the_leaderboard_metrics_at_each_images_own_size(trained, tmp_path):
    root, ckpt = trained["root"], tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], ckpt)
    # By hand: each 32×64 map resized (bilinear) to 40×72 and rounded to float16, against the 255 masks at
    # 40×72.
    records = evaluation_records("mvtec_ad2", root, "can")
    maps, _ = scored(ckpt, [image for image, _, _ in records])
    full = [cv2.resize(m.astype(np.float32), ORIGINAL[::-1]).astype(np.float16).astype(np.float64)
            for m in maps]
    truths = [np.zeros(ORIGINAL, bool) if mask is None else cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) == 255
              for _, mask, _ in records]
    # Thresholds set here so that both F1s have something to count: every image called, the top 10 % of
    # pixels.
    pixel_threshold = float(np.quantile(np.concatenate([m.ravel() for m in full]), 0.9))
    thresholds = {**read_thresholds(ckpt, BASE, "can"), "image_threshold": 0.0,
                  "pixel_threshold": pixel_threshold}
    threshold_path(ckpt, BASE, "can").write_text(json.dumps(thresholds))
    results = test_draem.main(["--dataset", "mvtec_ad2", "--obj_id", "can", "--data_path", str(root),
                               "--checkpoint_path", str(ckpt), "--base_model_name", BASE, *SIZE,
                               "--output_dir", str(tmp_path / "results")])["can"]
    called = [m >= pixel_threshold for m in full]
    tp = sum(int((c & t).sum()) for c, t in zip(called, truths))
    fp = sum(int((c & ~t).sum()) for c, t in zip(called, truths))
    fn = sum(int((~c & t).sum()) for c, t in zip(called, truths))
    assert tp > 0 and fp > 0  # both F1s below count real cases
    assert results["seg_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-15)
    images = [(bool(c.any()), label) for c, (_, _, label) in zip(called, records)]
    itp = sum(c and y == 1 for c, y in images)
    ifp, ifn = sum(c and y == 0 for c, y in images), sum(not c and y == 1 for c, y in images)
    assert results["class_f1"] == pytest.approx(2 * itp / (2 * itp + ifp + ifn), abs=1e-15)
    # Region weights summed in another order: equal to rounding (1e-12 of a value near 1).
    expected = reference_aupro(full, [t.astype(np.uint8) for t in truths], np.ones((3, 3)), limit=0.05)
    assert results["aupro_005"] == pytest.approx(expected, abs=1e-12)


def test_calibrate_records_the_normal_only_rule_its_k_and_its_set(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], ckpt)
    good = tmp_path / "good"
    good.mkdir()
    for i, path in enumerate(validation_image_paths("mvtec_ad2", trained["root"], "can")[:2]):
        shutil.copy(path, good / f"extra{i}.png")
    calibrate.main(["--dataset", "mvtec_ad2", "--obj_id", "can", "--data_path", str(trained["root"]),
                    "--checkpoint_path", str(ckpt), "--base_model_name", BASE, "--rule", "mean_std",
                    "--k", "2", "--good_dir", str(good), *SIZE])
    stored = read_thresholds(ckpt, BASE, "can")
    assert (stored["k"], stored["n_normal"], stored["n_anomalous"]) == (2.0, 5, 0)
    assert stored["source"] == f"validation/good images + 2 good images from {good}"
    assert stored["image_threshold"] == pytest.approx(stored["image_mean"] + 2 * stored["image_std"],
                                                      rel=1e-15)


def write_submission(trained, output: Path, *extra: str) -> list[str]:
    return ["--data_path", str(trained["root"]), "--checkpoint_path", str(trained["ckpt"]),
            "--base_model_name", BASE, "--obj_id", *extra, "--output_dir", str(output), *SIZE]


@pytest.fixture(scope="module")
def submission(trained) -> Path:
    """The submission for can, then rice added by a second run into the same folder."""
    output = trained["out"] / "submission"
    write_ad2_submission.main(write_submission(trained, output, "can"))
    write_ad2_submission.main(write_submission(trained, output, "rice"))
    return output


def test_the_writer_writes_float16_maps_and_0_255_masks_at_each_images_size_and_nothing_else(
        trained, submission):
    files = sorted(str(p.relative_to(submission)) for p in submission.rglob("*") if p.is_file())
    splits = (("test_private", "regular"), ("test_private_mixed", "mixed"))
    expected = [f"{tree}/{obj}/{split}/{i:03d}_{kind}{suffix}"
                for tree, suffix in (("anomaly_images", ".tiff"), ("anomaly_images_thresholded", ".png"))
                for obj in ("can", "rice") for split, kind in splits for i in range(PRIVATE)]
    assert files == sorted(expected)
    thresholds = read_thresholds(trained["ckpt"], BASE, "can")
    paths = ad2_private_images(trained["root"], "can", "test_private")
    _, scores = scored(trained["ckpt"], paths)
    for path, score in zip(paths, scores):
        amap = tifffile.imread(submission / "anomaly_images/can/test_private" / f"{path.stem}.tiff")
        masks = submission / "anomaly_images_thresholded/can/test_private"
        mask = cv2.imread(str(masks / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert amap.dtype == np.float16 and amap.shape == ORIGINAL and len(np.unique(amap)) > 2
        assert mask.dtype == np.uint8 and mask.shape == ORIGINAL and set(np.unique(mask)) <= {0, 255}
        # The mask is the map read back from the TIFF at the pixel threshold, emptied when the image score is
        # below the image threshold (float64 comparisons, as the writer's).
        called = score >= thresholds["image_threshold"]
        at_threshold = amap.astype(np.float64) >= thresholds["pixel_threshold"]
        np.testing.assert_array_equal(mask == 255, called & at_threshold)


def float32_map(root: Path) -> None:
    path = root / "anomaly_images/can/test_private/001_regular.tiff"
    tifffile.imwrite(path, tifffile.imread(path).astype(np.float32))


def mask_with_a_7(root: Path) -> None:
    path = root / "anomaly_images_thresholded/rice/test_private_mixed/002_mixed.png"
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    mask[0, 0] = 7
    cv2.imwrite(str(path), mask)


EXTRA = "anomaly_images_thresholded/can/test_private/notes.txt"
REFUSALS = {
    "missing file": (lambda root: (root / "anomaly_images/rice/test_private/000_regular.tiff").unlink(),
                     "anomaly_images/rice/test_private/000_regular.tiff is missing"),
    "float32 map": (float32_map, "001_regular.tiff holds float32, not float16"),
    "mask value 7": (mask_with_a_7, "002_mixed.png holds values other than 0 and 255 (7)"),
    "extra file": (lambda root: (root / EXTRA).write_text("hi"), "notes.txt is not part of a submission"),
    "extra folder": (lambda root: (root / "anomaly_images/bottle").mkdir(),
                     "anomaly_images/bottle is not part of a submission"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_the_check_refuses_a_tree_that_is_not_exactly_the_submission(
        trained, submission, tmp_path, capsys, case):
    change, phrase = REFUSALS[case]
    tampered = tmp_path / "tampered"
    shutil.copytree(submission, tampered)
    change(tampered)
    line = one_line_exit(write_ad2_submission.main, ["--data_path", str(trained["root"]), "--obj_id", "can",
                                                     "--output_dir", str(tampered), "--check_only"], capsys)
    assert "submission not valid" in line and phrase in line, line


def test_the_check_passes_the_written_tree_and_applies_the_official_counts_when_asked(
        trained, submission, capsys):
    check = ["--data_path", str(trained["root"]), "--obj_id", "can", "--output_dir", str(submission),
             "--check_only"]
    # Both objects (rice found in the folder), 2 splits, a map and a mask each.
    assert write_ad2_submission.main(check) == 2 * 2 * 2 * PRIVATE
    assert write_ad2_submission.main([*check[:2], *check[4:]]) == 2 * 2 * 2 * PRIVATE  # -1: what it holds
    line = one_line_exit(write_ad2_submission.main, [*check, "--official_counts"], capsys)
    assert "can/test_private has 3 images, the challenge's 321" in line
    assert uses_official_counts(set(AD2), False) and uses_official_counts({"can"}, True)
    assert not uses_official_counts({"can", "rice"}, False)


def test_the_writer_needs_a_threshold_file_and_a_folder_of_its_own(trained, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], ckpt)
    threshold_path(ckpt, BASE, "can").unlink()
    argv = write_submission({**trained, "ckpt": ckpt}, tmp_path / "sub", "can")
    assert "calibrate one first" in one_line_exit(write_ad2_submission.main, argv, capsys)
    assert not (tmp_path / "sub").exists()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("mine")
    argv = write_submission(trained, tmp_path / "sub", "can")
    line = one_line_exit(write_ad2_submission.main, argv, capsys)
    assert "holds notes.txt, which is not part of a submission" in line
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["notes.txt"]  # refused before writing
