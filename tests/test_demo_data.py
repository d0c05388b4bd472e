import cv2
import numpy as np
import pytest
import skimage.data

from data_loader import LabelledImageDataset, TrainDataset
from tools.make_demo_data import main
from util.demo_data import (
    CATEGORY_STYLES,
    DEFECT_TYPES,
    DEMO_CATEGORIES,
    draw_defect,
    make_demo_dataset,
    texture_image,
    write_sources,
)
from util.errors import DraemInputError
from util.layouts import find_anomaly_sources, resolve_categories


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_demo_dataset_is_readable_by_the_datasets(tmp_path):
    demo = make_demo_dataset(tmp_path)  # untimed: speed belongs in benchmarks, a busy machine would fail a
                                        # wall-clock bound
    assert (demo.categories == DEMO_CATEGORIES
            and resolve_categories(-1, DEMO_CATEGORIES) == list(DEMO_CATEGORIES))
    assert len(find_anomaly_sources(demo.texture_root)) == 24
    assert not (tmp_path / ".demo-building").exists()
    for category in DEMO_CATEGORIES:
        train = TrainDataset(demo.mvtec_root / category / "train" / "good", demo.texture_root, (64, 64))
        assert len(train) == 40 and train.images.shape == (40, 64, 64, 3)
        test = LabelledImageDataset(demo.mvtec_root / category / "test", (64, 64))
        labels = [test[i]["has_anomaly"][0] for i in range(len(test))]
        assert labels.count(0) == 10 and labels.count(1) == 10
        defects = {p.parent.name for p in test.image_paths} - {"good"}
        assert defects == set(CATEGORY_STYLES[category][2])


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    small = {"image_size": 48, "n_train": 3, "n_test_good": 1, "n_test_per_defect": 1, "n_sources": 3}
    first = all_files(make_demo_dataset(tmp_path / "a", seed=5, **small).mvtec_root.parent)
    again = all_files(make_demo_dataset(tmp_path / "b", seed=5, **small).mvtec_root.parent)
    other = all_files(make_demo_dataset(tmp_path / "c", seed=6, **small).mvtec_root.parent)
    assert first == again
    assert first.keys() == other.keys() and first != other


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_defects_change_exactly_the_masked_pixels(kind):
    rng = np.random.default_rng(0)
    texture_name, tint, _ = CATEGORY_STYLES["brick"]
    texture = getattr(skimage.data, texture_name)()
    for _ in range(5):
        clean = texture_image(texture, tint, 128, rng)
        defective, mask = draw_defect(clean, kind, rng)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        inside = mask > 0
        np.testing.assert_array_equal(defective[~inside], clean[~inside])
        changed = np.abs(defective.astype(int) - clean.astype(int)).max(axis=-1) > 20
        assert changed[inside].mean() > 0.8  # a visible defect, not a faint one
        assert 0.0005 < inside.mean() < 0.2


def test_existing_dataset_needs_overwrite(tmp_path):
    small = {"image_size": 32, "n_train": 2, "n_test_good": 1, "n_test_per_defect": 1, "n_sources": 2}
    make_demo_dataset(tmp_path, **small)
    with pytest.raises(DraemInputError, match="overwrite"):
        make_demo_dataset(tmp_path, **small)
    demo = make_demo_dataset(tmp_path, overwrite=True, **{**small, "n_train": 3})
    assert len(list((demo.mvtec_root / "brick" / "train" / "good").iterdir())) == 3
    (demo.mvtec_root / "bottle").mkdir()  # e.g. --out pointed at a folder holding the real MVTec AD
    with pytest.raises(DraemInputError, match="not a demo dataset"):
        make_demo_dataset(tmp_path, overwrite=True, **small)
    assert (demo.mvtec_root / "bottle").is_dir() and (demo.mvtec_root / "brick").is_dir()


def test_command_line_writes_the_dataset_and_rejects_bad_input(tmp_path, capsys):
    demo = main(["--out", str(tmp_path), "--image_size", "32", "--n_train", "2", "--n_test_good", "3",
                 "--n_test_per_defect", "1", "--n_sources", "4", "--categories", "gravel"])
    assert demo.categories == ("gravel",) and (demo.mvtec_root / "gravel" / "test" / "cut").is_dir()
    # Every count flag where it belongs (distinct values, so two flags swapped would show).
    counts = {folder: len(list((demo.mvtec_root / "gravel" / folder).glob("*.png")))
              for folder in ("train/good", "test/good", "test/cut", "test/spot", "ground_truth/cut")}
    assert counts == {"train/good": 2, "test/good": 3, "test/cut": 1, "test/spot": 1, "ground_truth/cut": 1}
    assert len(find_anomaly_sources(demo.texture_root)) == 4
    assert cv2.imread(str(demo.mvtec_root / "gravel" / "train" / "good" / "000.png")).shape == (32, 32, 3)
    assert not (demo.mvtec_root / "brick").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "other"), "--categories", "marble"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown demo categories ['marble']: choose from brick, gravel"]


# --- variety: what the seeded draws of the demo data span ----------------------------------------

def test_training_images_vary_in_crop_flip_and_lighting():
    """texture_image on ramps, so each draw can be read back: a 3/4 crop (150 of 200 rows) at a random offset
    0..50, a horizontal flip half the time, lighting x U[0.9, 1.1]. On a vertical ramp (value = row),
    INTER_AREA to 32 rows makes the top row the mean of rows y0 .. y0 + 4.7, the bottom one of y0 + 145.3 ..
    y0 + 150: the lighting is (bottom - top) / 145.3, the offset top / lighting - 2.3. Sensor noise (sd 2)
    moves a row mean of 32 pixels by about 0.35: the estimates are within 0.01 and 1 row."""
    rng = np.random.default_rng(0)
    ramp = np.repeat(np.arange(200, dtype=np.uint8)[:, None], 200, axis=1)
    lighting, offsets = [], []
    for _ in range(300):
        gray = texture_image(ramp, (1.0, 1.0, 1.0), 32, rng)[..., 0].astype(np.float64)
        lighting.append((gray[-1].mean() - gray[0].mean()) / 145.3)
        offsets.append(gray[0].mean() / lighting[-1] - 2.3)
    lighting, offsets = np.array(lighting), np.array(offsets)
    # 300 uniform draws: P(none within 0.015 of an end of [0.9, 1.1]) = 0.925**300 = 7e-11; likewise 5 rows of
    # 0..50.
    assert 0.88 < lighting.min() < 0.925 and 1.075 < lighting.max() < 1.12
    assert -2 < offsets.min() < 5 and 45 < offsets.max() < 52
    flipped = [texture_image(ramp.T.copy(), (1.0, 1.0, 1.0), 32, rng)[..., 0].astype(int) for _ in range(300)]
    decreasing = np.mean([image[:, 0].mean() > image[:, -1].mean() for image in flipped])
    assert abs(decreasing - 0.5) < 5 * np.sqrt(0.25 / 300)  # binomial standard error 0.029


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_defects_land_in_different_places_with_different_sizes(kind):
    """30 defects on a flat 64 px image: centres spread over the middle 60 % (uniform there: sd 0.6 * 64 /
    sqrt(12) = 11 px per axis, before the shape's own extent), areas that differ, and spots of one to three
    stains."""
    rng = np.random.default_rng(1)
    flat = np.full((64, 64, 3), 120, dtype=np.uint8)
    centres, areas, stains = [], [], set()
    for _ in range(30):
        _, mask = draw_defect(flat, kind, rng)
        ys, xs = np.nonzero(mask)
        centres.append((ys.mean(), xs.mean()))
        areas.append(len(ys))
        stains.add(cv2.connectedComponents(mask)[0] - 1)
    assert (np.std(centres, axis=0) > 5).all(), np.std(centres, axis=0)
    assert np.std(areas) / np.mean(areas) > 0.1 and len(set(areas)) > 20
    assert stains == ({1, 2, 3} if kind == "spot" else {1})


def test_anomaly_sources_come_from_every_photograph_at_varied_sizes(tmp_path):
    write_sources(tmp_path, seed=0, count=20)
    files = sorted(tmp_path.rglob("*.jpg"))
    # all 14 photographs, then again from the first
    assert len(files) == 20 and len({f.parent.name for f in files}) == 14
    sides = [cv2.imread(str(f)).shape[:2] for f in files]
    assert all(h == w and 200 <= h <= 400 for h, w in sides) and len({h for h, _ in sides}) > 10
    # Two crops of one photograph (sources 0 and 14) are different pictures, not one file twice.
    first, again = (cv2.imread(str(f)) for f in sorted(files, key=lambda f: f.name)[:15:14])
    assert first.shape != again.shape or np.abs(first.astype(int) - again.astype(int)).mean() > 10
