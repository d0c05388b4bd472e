"""Dataset layouts: mvtec through the factories, the generic folder layout and VisA's 1cls.csv, on tiny
fixtures."""
import math
import shutil
import types
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_predict import calibrated_model

import test_draem
import train_draem
from data_loader import LabelledImageDataset, TrainDataset, make_test_dataset
from engine.validation import SampleSet
from model_unet import model_from_checkpoint
from util.checkpoints import save_checkpoint
from util.errors import DraemInputError
from util.images import read_image, read_mask, read_nonzero_mask
from util.layouts import (
    CATEGORIES,
    LAYOUTS,
    VISA_CATEGORIES,
    categories_for,
    evaluation_records,
    train_image_paths,
    validation_image_paths,
)
from util.metrics import DraemEvaluator

SHAPE = (32, 32)


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))
    return path


def write_mask(path: Path, value: int, size: tuple[int, int] = (40, 48)) -> Path:
    """A rectangle of `value` on 0: 255 as in MVTec AD, 1 as in VisA."""
    mask = np.zeros(size, dtype=np.uint8)
    mask[8:24, 10:30] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask)
    return path


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DraemInputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# --- folder ------------------------------------------------------------------------------------

@pytest.fixture
def folder_root(tmp_path) -> Path:
    """widget: 3 training images (png, jpg, BMP) and a note; test: 2 good, 2 crack with masks (0/255 png, 0/1
    BMP), 1 dent without a mask. gadget has only a test folder, so it is no training category."""
    root = tmp_path / "own"
    widget = root / "widget"
    for i, name in enumerate(["b.jpg", "a.png", "c.BMP"]):
        write_image(widget / "train" / "good" / name, i)
    (widget / "train" / "good" / "notes.txt").write_text("not an image")
    write_image(widget / "test" / "good" / "g1.png", 10)
    write_image(widget / "test" / "good" / "g2.tif", 11)
    write_image(widget / "test" / "crack" / "c1.png", 12)
    write_image(widget / "test" / "crack" / "c2.jpg", 13)
    write_image(widget / "test" / "dent" / "d1.png", 14)
    write_mask(widget / "ground_truth" / "crack" / "c1_mask.png", 255)
    write_mask(widget / "ground_truth" / "crack" / "c2_mask.BMP", 1)
    write_image(root / "gadget" / "test" / "good" / "x.png", 15)
    return root


def test_folder_training_images_are_every_image_of_train_good_sorted(folder_root):
    good = folder_root / "widget" / "train" / "good"
    assert (train_image_paths("folder", folder_root, "widget")
            == [good / "a.png", good / "b.jpg", good / "c.BMP"])
    dataset = TrainDataset(image_paths=train_image_paths("folder", folder_root, "widget"), resize_shape=SHAPE)
    assert len(dataset) == 3 and dataset.images.shape == (3, *SHAPE, 3)
    np.testing.assert_array_equal(dataset.images[0], cv2.resize(cv2.imread(str(good / "a.png")), SHAPE[::-1]))


def test_folder_test_records_label_defects_and_find_their_masks(folder_root):
    widget = folder_root / "widget"
    with pytest.warns(RuntimeWarning, match="1 of 3 defect images .* no ground-truth mask"):
        got = evaluation_records("folder", folder_root, "widget")
    assert got == [
        (widget / "test/crack/c1.png", widget / "ground_truth/crack/c1_mask.png", 1),
        (widget / "test/crack/c2.jpg", widget / "ground_truth/crack/c2_mask.BMP", 1),
        (widget / "test/dent/d1.png", None, 1),
        (widget / "test/good/g1.png", None, 0),
        (widget / "test/good/g2.tif", None, 0),
    ]


def test_folder_test_samples_have_labels_and_masks_whatever_their_value_convention(folder_root):
    with pytest.warns(RuntimeWarning):
        dataset = make_test_dataset("folder", folder_root, "widget", SHAPE)
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s["has_anomaly"][0] for s in samples] == [1, 1, 1, 0, 0]
    reference = read_mask(folder_root / "widget" / "ground_truth" / "crack" / "c1_mask.png", SHAPE)[..., 0]
    assert reference.max() == 1.0
    np.testing.assert_array_equal(samples[0]["mask"][0], reference)
    np.testing.assert_array_equal(samples[1]["mask"][0], reference)  # the 0/1 mask reads as the 0/255 one
    for s in samples[2:]:  # the defect without a mask, and the good images
        assert s["mask"].shape == (1, *SHAPE) and not s["mask"].any()
    np.testing.assert_array_equal(samples[4]["image"],
                                  read_image(folder_root / "widget/test/good/g2.tif",
                                             SHAPE).transpose(2, 0, 1))


def test_folder_mask_suffix_is_configurable(folder_root):
    crack = folder_root / "widget" / "ground_truth" / "crack"
    for mask in list(crack.iterdir()):
        mask.rename(crack / mask.name.replace("_mask", "_gt"))
    with pytest.warns(RuntimeWarning, match="3 of 3"):
        assert ([mask for _, mask, _ in evaluation_records("folder", folder_root, "widget")][:2]
                == [None, None])
    with pytest.warns(RuntimeWarning, match="1 of 3"):
        found = evaluation_records("folder", folder_root, "widget", mask_suffix="_gt")
    assert [mask.name for _, mask, _ in found[:2]] == ["c1_gt.png", "c2_gt.BMP"]


def test_folder_without_any_mask_gives_nan_pixel_metrics_and_valid_image_metrics(folder_root):
    for mask in (folder_root / "widget" / "ground_truth" / "crack").iterdir():
        mask.unlink()
    with pytest.warns(RuntimeWarning, match="3 of 3"):
        dataset = make_test_dataset("folder", folder_root, "widget", SHAPE)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    maps = batch["has_anomaly"].view(-1, 1, 1, 1) * 0.5 + torch.rand(len(dataset), 1, *SHAPE) * 0.1
    evaluator = DraemEvaluator(len(dataset), *SHAPE)
    evaluator.update(maps, batch["mask"], batch["has_anomaly"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluator.compute()
    assert result["image_auroc"] == 1.0
    assert math.isnan(result["pixel_auroc"]) and math.isnan(result["pixel_ap"])
    assert any("pixel masks" in str(w.message) for w in caught)


def test_folder_refuses_jpeg_masks_and_reports_missing_folders(folder_root):
    write_mask(folder_root / "widget" / "ground_truth" / "dent" / "d1_mask.jpg", 255)
    assert "d1_mask.jpg is a JPEG" in one_line_error(evaluation_records, "folder", folder_root, "widget")
    assert "<data_path>/<category>/train/good" in one_line_error(train_image_paths, "folder", folder_root,
                                                                 "gadget")
    assert "<data_path>/<category>/test" in one_line_error(evaluation_records, "folder", folder_root,
                                                           "nothing")


# --- VisA --------------------------------------------------------------------------------------

VISA_HEADER = "object,split,label,image,mask"


@pytest.fixture
def visa_root(tmp_path) -> Path:
    """candle: 3 train normals, 2 test normals, 2 test anomalies with 0/1 masks; pcb1 rows that candle must
    not see.
    Rows are not sorted, as in the published file."""
    root = tmp_path / "VisA"
    rows = [VISA_HEADER]
    for i, (split, name) in enumerate([("train", "0836"), ("test", "0790"), ("train", "0451"),
                                       ("train", "0001"), ("test", "0107")]):
        write_image(root / "candle/Data/Images/Normal" / f"{name}.JPG", i)
        rows.append(f"candle,{split},normal,candle/Data/Images/Normal/{name}.JPG,")
    for i, name in enumerate(["000", "001"]):
        write_image(root / "candle/Data/Images/Anomaly" / f"{name}.JPG", 20 + i)
        write_mask(root / "candle/Data/Masks/Anomaly" / f"{name}.png", 1)
        rows.append(f"candle,test,anomaly,candle/Data/Images/Anomaly/{name}.JPG,candle/Data/Masks/Anomaly/{name}.png")
    write_image(root / "pcb1/Data/Images/Normal/0000.JPG", 30)
    rows += ["pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
             "pcb1,test,normal,pcb1/Data/Images/Normal/0000.JPG,"]
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_training_images_are_the_train_rows_of_the_object_in_file_order(visa_root):
    normal = visa_root / "candle/Data/Images/Normal"
    assert (train_image_paths("visa", visa_root, "candle")
            == [normal / "0836.JPG", normal / "0451.JPG", normal / "0001.JPG"])
    assert train_image_paths("visa", visa_root, "pcb1") == [visa_root / "pcb1/Data/Images/Normal/0000.JPG"]
    assert (len(TrainDataset(image_paths=train_image_paths("visa", visa_root, "candle"), resize_shape=SHAPE))
            == 3)


def test_visa_test_records_and_samples(visa_root):
    candle = visa_root / "candle/Data"
    assert evaluation_records("visa", visa_root, "candle") == [
        (candle / "Images/Normal/0790.JPG", None, 0),
        (candle / "Images/Normal/0107.JPG", None, 0),
        (candle / "Images/Anomaly/000.JPG", candle / "Masks/Anomaly/000.png", 1),
        (candle / "Images/Anomaly/001.JPG", candle / "Masks/Anomaly/001.png", 1),
    ]
    dataset = make_test_dataset("visa", visa_root, "candle", SHAPE)
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s["has_anomaly"][0] for s in samples] == [0, 0, 1, 1]
    assert ([s["path"] for s in samples]
            == [str(image) for image, _, _ in evaluation_records("visa", visa_root, "candle")])
    assert not samples[0]["mask"].any() and not samples[1]["mask"].any()
    # The 0/1 VisA mask reads exactly as its 0/255 conversion (VisA's prepare_data.py) reads with read_mask.
    converted = write_mask(visa_root / "converted.png", 255)
    np.testing.assert_array_equal(samples[2]["mask"][0], read_mask(converted, SHAPE)[..., 0])
    assert samples[2]["mask"].max() == 1.0


def _mask_file(path: Path, convention: str) -> Path:
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[8:24, 10:30] = 1
    if convention == "palette":
        image = pytest.importorskip("PIL.Image").fromarray(mask, mode="L").convert("P")
        image.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # index 1 is dark red: cv2 grayscale would give 38
        image.save(path)
        return path
    values = {"0/1": mask, "0/255": mask * 255, "16-bit 0/1": mask.astype(np.uint16),
              "colour": np.dstack([mask * 200] * 3)}
    assert cv2.imwrite(str(path), values[convention])
    return path


@pytest.mark.parametrize("convention", ["0/1", "0/255", "16-bit 0/1", "colour", "palette"])
def test_nonzero_masks_read_as_their_0_255_version(tmp_path, convention):
    reference = read_mask(write_mask(tmp_path / "reference.png", 255), SHAPE)
    got = read_nonzero_mask(_mask_file(tmp_path / "mask.png", convention), SHAPE)
    assert got.shape == (*SHAPE, 1) and got.dtype == np.float32
    np.testing.assert_array_equal(got, reference)


def test_visa_errors_are_one_line(visa_root, tmp_path):
    message = one_line_error(train_image_paths, "visa", tmp_path / "elsewhere", "candle")
    assert str(tmp_path / "elsewhere" / "split_csv" / "1cls.csv") in message and "VisA's layout" in message
    # a folder without the split file
    assert "1cls.csv" in one_line_error(categories_for, "visa", "-1", tmp_path)
    assert "candle, pcb1" in one_line_error(evaluation_records, "visa", visa_root, "cashew")
    assert ("VisA's 1cls.csv names its "
            "masks" in one_line_error(evaluation_records, "visa", visa_root, "candle", mask_suffix="_gt"))
    (visa_root / "candle/Data/Images/Normal/0107.JPG").unlink()
    assert "0107.JPG does not exist" in one_line_error(make_test_dataset, "visa", visa_root, "candle", SHAPE)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda text: text.replace(VISA_HEADER, "object,split,label,image"), "no column mask"),
        (lambda text: text + "candle,test,normal\n", "line 11: no image path"),
        (lambda text: text.replace("candle,test,normal", "candle,test,ok", 1), "line 3: label 'ok'"),
        (lambda text: text.replace("candle,test,normal", "candle,val,normal", 1), "line 3: split 'val'"),
        (lambda text: text.replace(",candle/Data/Masks/Anomaly/000.png", ","), "Anomaly/000.JPG has no mask"),
        (lambda text: text.replace("candle,train,normal", "candle,train,anomaly", 1),
         "line 2: an anomalous training image"),
    ],
)
def test_a_broken_visa_split_file_is_a_one_line_error_naming_the_line(visa_root, edit, expected):
    split_file = visa_root / "split_csv" / "1cls.csv"
    split_file.write_text(edit(split_file.read_text()))
    for call in (evaluation_records, train_image_paths):
        with pytest.raises(DraemInputError, match=expected):
            call("visa", visa_root, "candle")


# --- mvtec, layouts, categories ------------------------------------------------------------------

def test_mvtec_through_the_factories_is_exactly_the_mvtec_classes(tiny_mvtec):
    root, category = tiny_mvtec.mvtec_root, "brick"
    test_dir = root / category / "test"
    expected = [
        (p,
         None if p.parent.name == "good" else root / category / "ground_truth" / p.parent.name
         / f"{p.stem}_mask.png", int(p.parent.name != "good"))
        for p in sorted(test_dir.glob("*/*.png"), key=str)
    ]
    assert evaluation_records("mvtec", root, category) == expected
    ours, classic = make_test_dataset("mvtec", root, category, SHAPE), LabelledImageDataset(test_dir, SHAPE)
    assert len(ours) == len(classic) == len(expected)
    for i in range(len(ours)):
        a, b = ours[i], classic[i]
        assert a.keys() == b.keys() and a["path"] == b["path"] and a["idx"] == b["idx"]
        for key in ("image", "mask", "has_anomaly"):
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])

    train_dir = root / category / "train" / "good"
    assert train_image_paths("mvtec", root, category) == sorted(train_dir.glob("*.png"), key=str)
    ours = TrainDataset(anomaly_source_path=tiny_mvtec.texture_root, resize_shape=SHAPE,
                                  image_paths=train_image_paths("mvtec", root, category))
    classic = TrainDataset(train_dir, tiny_mvtec.texture_root, SHAPE)
    assert ours.image_paths == classic.image_paths and ours.source_paths == classic.source_paths
    for seed in range(12):
        torch.manual_seed(seed)
        a = ours[0]
        torch.manual_seed(seed)
        b = classic[0]
        assert a["idx"] == b["idx"]
        for key in ("image", "augmented_image", "anomaly_mask", "has_anomaly"):
            np.testing.assert_array_equal(a[key], b[key])


def test_a_missing_mask_is_an_error_for_mvtec_and_a_warning_for_folder(tiny_mvtec, tmp_path):
    shutil.copytree(tiny_mvtec.mvtec_root / "brick", tmp_path / "brick")
    mask = next((tmp_path / "brick" / "ground_truth").glob("*/001_mask.png"))
    mask.unlink()
    assert f"{mask} is missing" in one_line_error(evaluation_records, "mvtec", tmp_path, "brick")
    with pytest.warns(RuntimeWarning, match="1 of 4 defect images"):
        got = evaluation_records("folder", tmp_path, "brick")
    assert (tmp_path / "brick" / "test" / mask.parent.name / "001.png", None, 1) in got


def test_the_datasets_take_exactly_one_source_of_images(tiny_mvtec):
    with pytest.raises(ValueError, match="either"):
        TrainDataset(tiny_mvtec.mvtec_root / "brick/train/good", image_paths=[])
    with pytest.raises(ValueError, match="either"):
        LabelledImageDataset()
    one_line_error(TrainDataset, image_paths=[])
    one_line_error(LabelledImageDataset, records=[])


def test_layouts_and_visa_categories():
    assert LAYOUTS == ("mvtec", "folder", "visa", "mvtec_ad2", "mvtec_loco")
    assert (len(VISA_CATEGORIES) == 12 and VISA_CATEGORIES[0] == "candle"
            and VISA_CATEGORIES[-1] == "pipe_fryum")


def test_categories_for_each_layout(folder_root, visa_root, tiny_mvtec):
    assert categories_for("mvtec", "-1", tiny_mvtec.mvtec_root) == list(CATEGORIES)
    assert categories_for("mvtec", 2, tiny_mvtec.mvtec_root) == ["carpet"]
    assert categories_for("mvtec", "brick", tiny_mvtec.mvtec_root) == ["brick"]
    assert categories_for("visa", "-1", visa_root) == list(VISA_CATEGORIES)
    assert (categories_for("visa", "7", visa_root) == ["pcb1"]
            and categories_for("visa", "cashew", visa_root) == ["cashew"])
    write_image(folder_root / "bolt" / "train" / "good" / "a.png", 0)
    assert categories_for("folder", "-1", folder_root) == ["bolt", "widget"]  # gadget has no train/good
    assert categories_for("folder", "1", folder_root) == ["widget"]
    # a folder of its own, e.g. to test only
    assert categories_for("folder", "gadget", folder_root) == ["gadget"]
    assert "bolt, widget" in one_line_error(categories_for, "folder", "bolts", folder_root)
    assert "does not exist" in one_line_error(categories_for, "folder", "-1", folder_root / "missing")
    empty = folder_root / "empty"
    empty.mkdir()
    assert "no category folder with train/good" in one_line_error(categories_for, "folder", "-1", empty)


@pytest.mark.parametrize(
    "call",
    [
        lambda root: train_image_paths("mvtecad", root, "brick"),
        lambda root: evaluation_records("MVTec", root, "brick"),
        lambda root: make_test_dataset("", root, "brick"),
        lambda root: categories_for("voc", "-1", root),
    ],
)
def test_an_unknown_layout_is_a_one_line_error_listing_the_layouts(tiny_mvtec, call):
    assert "use one of mvtec, folder, visa" in one_line_error(call, tiny_mvtec.mvtec_root)


# --- MVTec LOCO AD -----------------------------------------------------------------------------

def loco_mask(path: Path, box: tuple[int, int, int, int], value: int) -> np.ndarray:
    """A mask with one rectangle (y0, y1, x0, x1) of `value`; returns it as the bool the merged ground truth
    sees."""
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[box[0] : box[1], box[2] : box[3]] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask)
    return mask > 0


@pytest.fixture
def loco_root(tmp_path) -> Path:
    """breakfast_box as MVTec LOCO AD lays it out: 2 train, 1 validation, 1 good, 1 logical (two masks, one of
    them with another grey value), 1 structural (one mask)."""
    box = tmp_path / "loco" / "breakfast_box"
    for i in range(2):
        write_image(box / "train" / "good" / f"{i:03d}.png", i)
    write_image(box / "validation" / "good" / "000.png", 5)
    write_image(box / "test" / "good" / "000.png", 6)
    write_image(box / "test" / "logical_anomalies" / "000.png", 7)
    write_image(box / "test" / "structural_anomalies" / "000.png", 8)
    loco_mask(box / "ground_truth" / "logical_anomalies" / "000" / "000.png", (2, 10, 4, 20), 255)
    loco_mask(box / "ground_truth" / "logical_anomalies" / "000" / "001.png", (20, 36, 30, 44), 100)
    loco_mask(box / "ground_truth" / "structural_anomalies" / "000" / "000.png", (5, 15, 5, 15), 255)
    return tmp_path / "loco"


def test_loco_reads_its_folders_and_merges_every_mask_of_an_image(loco_root):
    box = loco_root / "breakfast_box"
    assert (categories_for("mvtec_loco", "-1", loco_root)
            == ["breakfast_box", "juice_bottle", "pushpins", "screw_bag",
                                                             "splicing_connectors"])
    assert train_image_paths("mvtec_loco", loco_root, "breakfast_box") == [box / "train/good/000.png",
                                                                           box / "train/good/001.png"]
    assert (validation_image_paths("mvtec_loco", loco_root, "breakfast_box")
            == [box / "validation/good/000.png"])
    assert evaluation_records("mvtec_loco", loco_root, "breakfast_box") == [
        (box / "test/good/000.png", None, 0),
        (box / "test/logical_anomalies/000.png", box / "ground_truth/logical_anomalies/000", 1),
        (box / "test/structural_anomalies/000.png", box / "ground_truth/structural_anomalies/000", 1),
    ]
    dataset = make_test_dataset("mvtec_loco", loco_root, "breakfast_box", SHAPE)
    # Expected: the two rectangles of the logical anomaly together, written here at full size and resized as
    # masks are.
    union = np.zeros((40, 48), dtype=np.uint8)
    union[2:10, 4:20] = union[20:36, 30:44] = 255
    expected = cv2.resize(union, SHAPE[::-1]).astype(np.float32) / 255
    np.testing.assert_array_equal(dataset[1]["mask"][0], expected)
    assert dataset[0]["mask"].max() == 0 and dataset[2]["mask"].max() == 1.0


def test_loco_refuses_a_missing_or_empty_mask_folder_and_a_mask_suffix(loco_root):
    masks = loco_root / "breakfast_box" / "ground_truth" / "structural_anomalies" / "000"
    (masks / "000.png").unlink()  # refused when the test set is made, before any image is scored
    line = one_line_error(make_test_dataset, "mvtec_loco", loco_root, "breakfast_box", SHAPE)
    assert "holds no .png mask" in line
    masks.rmdir()
    assert ("000 (000.png, 001.png, ...) is "
            "missing" in one_line_error(evaluation_records, "mvtec_loco", loco_root,
                                                                      "breakfast_box"))
    assert ("folder of masks per "
            "image" in one_line_error(evaluation_records, "mvtec_loco", loco_root, "breakfast_box",
                                                         mask_suffix="_gt"))


# --- flags through the programs ------------------------------------------------------------------

@pytest.fixture
def renamed_masks(tiny_mvtec, tmp_path) -> Path:
    """brick as a folder-layout category whose masks are named <stem>_gt.png, and a tiny checkpoint pair for
    it."""
    shutil.copytree(tiny_mvtec.mvtec_root / "brick", tmp_path / "data" / "brick")
    for mask in (tmp_path / "data" / "brick" / "ground_truth").glob("*/*_mask.png"):
        mask.rename(mask.with_name(mask.name.replace("_mask", "_gt")))
    save_checkpoint(calibrated_model(4, seed=0), tmp_path / "ckpt", "tiny", "brick")
    return tmp_path


@pytest.mark.usefixtures("one_thread")
def test_test_draem_reads_folder_masks_by_the_mask_suffix_flag(renamed_masks):
    args = ["--dataset", "folder", "--obj_id", "brick", "--data_path", str(renamed_masks / "data"),
            "--checkpoint_path", str(renamed_masks / "ckpt"), "--base_model_name", "tiny", "--image_size",
            "64", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a mask not found would warn
        found = test_draem.main([*args, "--mask_suffix", "_gt", "--output_dir",
                                 str(renamed_masks / "gt")])["brick"]
    assert 0 <= found["pixel_auroc"] <= 1 and 0 < found["pixel_ap"] <= 1
    with pytest.warns(RuntimeWarning) as caught:  # masks not found, then pixel metrics undefined
        default = test_draem.main([*args, "--output_dir", str(renamed_masks / "default")])["brick"]
    assert any("4 of 4 defect images" in str(w.message) for w in caught)
    assert math.isnan(default["pixel_auroc"]) and default["image_auroc"] == found["image_auroc"]


@pytest.mark.usefixtures("one_thread")
def test_training_validation_on_the_test_set_reads_folder_masks_by_the_mask_suffix_flag(renamed_masks):
    args = train_draem.parse_args(["--dataset", "folder", "--mask_suffix", "_gt", "--obj_id", "brick",
                                   "--data_path", str(renamed_masks / "data"), "--image_size", "64",
                                   "--val_every", "1", "--val_test"])
    val_set = SampleSet(torch.zeros(2, 3, 64, 64), torch.zeros(2, 1, 64, 64), torch.tensor([0.0, 1.0]))
    model = model_from_checkpoint(renamed_masks / "ckpt", "tiny", "brick")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # validation on one normal and one empty-mask sample
                                                        # warns, so:
        warnings.filterwarnings("ignore", "pixel masks", RuntimeWarning)
        warnings.filterwarnings("ignore", "only class", RuntimeWarning)
        run = types.SimpleNamespace(args=args, model=model, val_set=val_set, category="brick",
                                    device=torch.device("cpu"), best=None, base_name="tiny")
        record = {"epoch": 1}
        train_draem.validate(run, record)
    assert 0 <= record["test_pixel_auroc"] <= 1 and 0 < record["test_pixel_ap"] <= 1
