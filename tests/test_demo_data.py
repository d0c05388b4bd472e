import numpy as np
import pytest
import skimage.data

from data_loader import LabelledImageDataset, TrainDataset
from tools.make_demo_data import main
from util.demo_data import CATEGORY_STYLES, DEFECT_TYPES, DEMO_CATEGORIES, draw_defect, make_demo_dataset, texture_image
from util.errors import DraemInputError
from util.layouts import find_anomaly_sources, resolve_categories


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_demo_dataset_is_readable_by_the_datasets(tmp_path):
    demo = make_demo_dataset(tmp_path)  # untimed: speed belongs in benchmarks, a busy machine would fail a wall-clock bound
    assert demo.categories == DEMO_CATEGORIES and resolve_categories(-1, DEMO_CATEGORIES) == list(DEMO_CATEGORIES)
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
    demo = main(["--out", str(tmp_path), "--image_size", "32", "--n_train", "2", "--n_test_good", "1",
                 "--n_test_per_defect", "1", "--n_sources", "2", "--categories", "gravel"])
    assert demo.categories == ("gravel",) and (demo.mvtec_root / "gravel" / "test" / "cut").is_dir()
    assert not (demo.mvtec_root / "brick").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "other"), "--categories", "marble"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown demo categories ['marble']: choose from brick, gravel"]
