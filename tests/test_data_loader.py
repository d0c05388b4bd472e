import random
import shutil

import cv2
import numpy as np
import pytest
import torch
from released_reference import released_style_sample
from torch.utils.data import DataLoader

import data_loader
from data_loader import (
    LabelledImageDataset,
    TrainDataset,
    blend_anomaly,
    make_training_sample,
    seed_everything,
    worker_init_fn,
)
from util.errors import DraemInputError
from util.images import read_image, read_image_uint8, read_mask
from util.layouts import (
    CATEGORIES,
    OBJECT_CATEGORIES,
    TEXTURE_CATEGORIES,
    find_anomaly_sources,
    resolve_categories,
)


def train_dir(demo, category="brick"):
    return demo.mvtec_root / category / "train" / "good"


def test_category_ids_follow_the_released_order():
    assert len(CATEGORIES) == 15 and len(set(CATEGORIES)) == 15
    assert (CATEGORIES[0], CATEGORIES[1], CATEGORIES[10], CATEGORIES[13], CATEGORIES[14]) == (
        "capsule", "bottle", "metal_nut", "grid", "wood")
    assert set(TEXTURE_CATEGORIES) == {"carpet", "grid", "leather", "tile", "wood"}
    assert (set(OBJECT_CATEGORIES) == set(CATEGORIES) - set(TEXTURE_CATEGORIES)
            and len(OBJECT_CATEGORIES) == 10)


def test_resolve_categories_accepts_a_category_folder_of_ones_own(tmp_path):
    (tmp_path / "gear").mkdir()
    assert resolve_categories("gear", data_root=tmp_path) == ["gear"]
    assert resolve_categories("-1", data_root=tmp_path) == list(CATEGORIES)
    with pytest.raises(DraemInputError, match="unknown category 'gearx'"):
        resolve_categories("gearx", data_root=tmp_path)


def test_resolve_categories_accepts_names_ids_and_minus_one():
    assert resolve_categories("hazelnut") == ["hazelnut"]
    assert resolve_categories(2) == ["carpet"] and resolve_categories("14") == ["wood"]
    # The first released id.
    assert resolve_categories(0) == ["capsule"] and resolve_categories("0") == ["capsule"]
    assert resolve_categories(-1) == list(CATEGORIES) and resolve_categories("-1") == list(CATEGORIES)
    assert resolve_categories(1, known=("a", "b")) == ["b"]


@pytest.mark.parametrize("bad", ["hazelnuts", 15, "-2", ""])
def test_resolve_categories_rejects_unknown_values_listing_the_valid_ones(bad):
    with pytest.raises(DraemInputError, match="capsule, bottle.*0..14.*-1"):
        resolve_categories(bad)


def test_read_image_is_opencv_bgr_resized_and_scaled(tmp_path):
    bgr = np.zeros((20, 30, 3), dtype=np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 200, 100, 50
    bgr[5:9, 7:19] = (10, 250, 90)
    cv2.imwrite(str(tmp_path / "a.png"), bgr)
    image = read_image(tmp_path / "a.png", (16, 24))
    assert image.shape == (16, 24, 3) and image.dtype == np.float32
    expected = cv2.resize(cv2.imread(str(tmp_path / "a.png")), (24, 16)).astype(np.float32) / 255.0
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_allclose(image[0, 0], [200 / 255, 100 / 255, 50 / 255])


def test_read_mask_is_grayscale_h_w_1_in_unit_range(tmp_path):
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    result = read_mask(tmp_path / "m.png", (16, 16))
    assert result.shape == (16, 16, 1) and result.dtype == np.float32
    np.testing.assert_array_equal(result[..., 0], mask / 255.0)
    resized = read_mask(tmp_path / "m.png", (11, 11))
    assert ((resized > 0) & (resized < 1)).any()  # bilinear edges stay fractional here


def test_unreadable_or_missing_images_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("broken.png", "empty.png", "missing.png"):
        with pytest.raises(DraemInputError, match=name):
            read_image(tmp_path / name, (8, 8))


def test_anomaly_sources_are_found_recursively_and_sorted(tmp_path):
    pixel = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    for name in ("images/b/2.jpg", "images/a/1.JPEG", "images/a/0.png", "top.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(pixel)
    (tmp_path / "images" / "a" / "notes.txt").write_text("not an image")
    found = find_anomaly_sources(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "images/a/0.png", "images/a/1.JPEG", "images/b/2.jpg", "top.jpg"
    ]
    assert len(find_anomaly_sources(tmp_path / "images")) == 3
    (tmp_path / "void").mkdir()
    for folder in (tmp_path / "void", tmp_path / "absent"):
        with pytest.raises(DraemInputError, match=folder.name):
            find_anomaly_sources(folder)


def test_train_dataset_rejects_missing_or_empty_folders(tmp_path):
    with pytest.raises(DraemInputError, match="does not exist"):
        TrainDataset(tmp_path / "nowhere")
    with pytest.raises(DraemInputError, match="no .png"):
        TrainDataset(tmp_path)


def test_blend_is_exactly_the_formula_inside_the_mask_and_the_image_outside():
    rng = np.random.default_rng(0)
    image, source = rng.random((8, 8, 3), dtype=np.float32), rng.random((8, 8, 3), dtype=np.float32)
    mask = np.zeros((8, 8, 1), dtype=np.float32)
    mask[2:6, 3:7] = 1
    beta = 0.3
    result = blend_anomaly(image, source, mask, beta)
    inside = mask[..., 0] > 0
    np.testing.assert_array_equal(result[inside], ((1 - beta) * source + beta * image)[inside])
    np.testing.assert_array_equal(result[~inside], image[~inside])
    tensors = blend_anomaly(torch.from_numpy(image), torch.from_numpy(source), torch.from_numpy(mask), beta)
    np.testing.assert_array_equal(tensors.numpy(), result)


def test_training_samples_follow_the_synthesis_rules(tiny_mvtec, monkeypatch):
    betas = []

    def recording_blend(image, source, mask, beta):
        betas.append(beta)
        return blend_anomaly(image, source, mask, beta)

    monkeypatch.setattr(data_loader, "blend_anomaly", recording_blend)
    torch.manual_seed(0)
    dataset = TrainDataset(train_dir(tiny_mvtec), tiny_mvtec.texture_root, resize_shape=(64, 64))
    assert len(dataset) == 6
    samples = [dataset[0] for _ in range(400)]
    for s in samples:
        assert (s["image"].shape == s["augmented_image"].shape == (3, 64, 64)
                and s["anomaly_mask"].shape == (1, 64, 64))
        assert (s["image"].dtype == s["augmented_image"].dtype == s["anomaly_mask"].dtype
                == s["has_anomaly"].dtype == np.float32)
        assert s["has_anomaly"].shape == (1,) and 0 <= s["idx"] < 6
        assert s["augmented_image"].min() >= 0 and s["augmented_image"].max() <= 1
        mask = s["anomaly_mask"]
        assert set(np.unique(mask)) <= {0.0, 1.0}
        outside = np.broadcast_to(mask == 0, s["image"].shape)
        np.testing.assert_array_equal(s["augmented_image"][outside], s["image"][outside])
        assert s["has_anomaly"][0] == float(mask.any())
        if s["has_anomaly"][0] == 0:
            assert not mask.any()
            np.testing.assert_array_equal(s["augmented_image"], s["image"])
        else:
            assert (s["augmented_image"] != s["image"]).any()
    assert 0.4 <= np.mean([s["has_anomaly"][0] for s in samples]) <= 0.6
    assert len(betas) > 150 and all(0 <= b < 0.8 for b in betas) and min(betas) < 0.1 and max(betas) > 0.7
    assert len({s["idx"] for s in samples}) == 6  # the training image is drawn at random, not from the index


def test_caching_changes_no_sample(tiny_mvtec):
    """The cached path (images decoded once, bounded source cache) equals reading every file per sample."""
    shape = (48, 48)
    dataset = TrainDataset(train_dir(tiny_mvtec), tiny_mvtec.texture_root, shape, source_cache_size=2)
    paths, sources = dataset.image_paths, dataset.source_paths

    def read_source(rng):
        return read_image_uint8(sources[int(rng.integers(len(sources)))], shape)

    for seed in range(60):
        cached = make_training_sample(np.random.default_rng(seed), len(dataset), dataset.images.__getitem__,
                                      dataset.draw_source)
        uncached = make_training_sample(np.random.default_rng(seed), len(paths),
                                        lambda i: read_image_uint8(paths[i], shape), read_source)
        for key in ("image", "augmented_image", "anomaly_mask", "has_anomaly"):
            np.testing.assert_array_equal(cached[key], uncached[key])
        assert cached["idx"] == uncached["idx"]
    assert len(dataset._source_cache) <= 2


def stand_in_augmentation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One stand-in for the ten augmentations on both paths: inverted and shifted by a drawn amount."""
    return np.roll(255 - image, int(rng.integers(1, 8)), axis=1)


def test_fast_path_gives_the_released_style_samples(tiny_mvtec, monkeypatch):
    """Same seed, same sample as a released-style reference written in the tests (decode per sample, the
    released float64 Perlin, the method's numbers and blend): masks bit for bit, images to float32
    rounding."""
    monkeypatch.setattr(data_loader, "augment_source", stand_in_augmentation)
    dataset = TrainDataset(train_dir(tiny_mvtec), tiny_mvtec.texture_root, resize_shape=(64, 64))
    anomalous = 0
    for seed in range(40):
        torch.manual_seed(seed)
        ours = dataset[0]
        # the dataset seeds each sample's generator from torch's stream (METHOD.md §2)
        torch.manual_seed(seed)
        rng = np.random.default_rng(int(torch.randint(2**62, ()).item()))
        reference = released_style_sample(rng, dataset.image_paths, dataset.source_paths, (64, 64),
                                          stand_in_augmentation)
        assert ours["idx"] == reference["idx"] and ours["has_anomaly"][0] == reference["has_anomaly"]
        np.testing.assert_array_equal(ours["anomaly_mask"], reference["anomaly_mask"])
        np.testing.assert_array_equal(ours["image"], reference["image"])
        # float32 blend in another operation order: a few 1e-8.
        np.testing.assert_allclose(ours["augmented_image"], reference["augmented_image"], rtol=0, atol=1e-6)
        anomalous += int(reference["has_anomaly"])
    assert 10 < anomalous < 30  # both kinds of sample compared


def test_without_a_source_folder_the_sources_are_noise(tiny_mvtec):
    dataset = TrainDataset(train_dir(tiny_mvtec), None, resize_shape=(32, 32))
    noise = dataset.draw_source(np.random.default_rng(0))
    assert noise.shape == (32, 32, 3) and noise.dtype == np.uint8 and noise.std() > 60
    # Uniform over all 256 levels (anomalib's fallback): 12288 draws miss a level with probability 256 e^-48.
    wide = TrainDataset(train_dir(tiny_mvtec), None,
                        resize_shape=(64, 64)).draw_source(np.random.default_rng(1))
    assert (np.array_equal(np.unique(wide), np.arange(256))
            and abs(wide.mean() - 127.5) < 5 * 73.9 / np.sqrt(wide.size))
    torch.manual_seed(1)
    assert any(dataset[0]["has_anomaly"][0] == 1 for _ in range(40))


def two_worker_batches(dataset, seed):
    """One epoch in batches of 2 from 2 workers: batch 0 comes from worker 0, batch 1 from worker 1."""
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2, worker_init_fn=worker_init_fn,
                        generator=torch.Generator().manual_seed(seed))
    return list(loader)


def test_seeded_loader_with_two_workers_is_reproducible_and_workers_differ(tiny_mvtec):
    dataset = TrainDataset(train_dir(tiny_mvtec), tiny_mvtec.texture_root, resize_shape=(32, 32))
    run_a, run_b, other_seed = (two_worker_batches(dataset, 7), two_worker_batches(dataset, 7),
                                two_worker_batches(dataset, 8))
    for key in ("image", "augmented_image", "anomaly_mask", "has_anomaly"):
        assert torch.equal(run_a[0][key], run_b[0][key])
        assert torch.equal(run_a[1][key], run_b[1][key])
    assert not torch.equal(run_a[0]["augmented_image"], run_a[1]["augmented_image"])  # worker 0 vs worker 1
    assert not torch.equal(run_a[0]["augmented_image"], other_seed[0]["augmented_image"])


class GlobalRandomDataset(torch.utils.data.Dataset):
    """Draws from NumPy's and Python's global generators, which every worker must seed for itself."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return np.array([np.random.random(), random.random()])


def test_seeded_loader_with_worker_init_fn_gives_each_worker_its_own_reproducible_global_streams():
    """torch >= 1.9 seeds each worker's NumPy/Python generators itself; worker_init_fn must keep them per
    worker (seeding from anything but the worker's torch seed, e.g. a constant, would make the workers repeat
    each other)."""
    def draws(seed):
        return torch.cat(two_worker_batches(GlobalRandomDataset(), seed))

    first, again, other = draws(3), draws(3), draws(4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set(first.flatten().tolist())) == 8  # the two workers do not repeat each other's draws


def test_worker_init_fn_makes_the_global_streams_depend_on_the_torch_seed_alone():
    """Whatever NumPy/Python state a worker inherited (a fork under torch < 1.9 keeps the parent's), after
    worker_init_fn their draws are fixed by the worker's torch seed. Run here, outside a DataLoader, so
    that torch's own worker seeding cannot stand in for it."""
    def draws_after_worker_init(torch_seed, inherited_seed):
        torch.manual_seed(torch_seed)
        np.random.seed(inherited_seed)
        random.seed(inherited_seed)
        worker_init_fn(0)
        return np.random.random(), random.random()

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        first = draws_after_worker_init(5, inherited_seed=1)
        assert draws_after_worker_init(5, inherited_seed=2) == first
        other = draws_after_worker_init(6, inherited_seed=1)
        assert other[0] != first[0] and other[1] != first[1]
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def test_seed_everything_seeds_torch_numpy_and_python():
    def draws():
        return torch.rand(1).item(), np.random.random(), random.random()

    seed_everything(11)
    first = draws()
    seed_everything(11)
    assert draws() == first


def test_test_dataset_reads_labels_masks_and_paths(tiny_mvtec):
    dataset = LabelledImageDataset(tiny_mvtec.mvtec_root / "brick" / "test", resize_shape=(48, 48))
    assert len(dataset) == 3 + 2 + 2
    paths = [dataset[i]["path"] for i in range(len(dataset))]
    assert paths == sorted(paths)
    for i in range(len(dataset)):
        s = dataset[i]
        defect = s["path"].split("/")[-2]
        assert s["idx"] == i and s["image"].shape == (3, 48, 48) and s["image"].dtype == np.float32
        assert (s["mask"].shape == (1, 48, 48) and s["mask"].dtype == np.float32
                and s["has_anomaly"].shape == (1,))
        if defect == "good":
            assert s["has_anomaly"][0] == 0 and not s["mask"].any()
        else:
            assert s["has_anomaly"][0] == 1 and s["mask"].max() > 0.5
            stem = s["path"].split("/")[-1][:-4]
            expected = read_mask(tiny_mvtec.mvtec_root / "brick" / "ground_truth" / defect
                                 / f"{stem}_mask.png", (48, 48))
            np.testing.assert_array_equal(s["mask"][0], expected[..., 0])
    masks = np.stack([dataset[i]["mask"] for i in range(len(dataset))])
    assert ((masks > 0) & (masks < 1)).any()  # resized masks are kept as floats, not cast


def test_test_dataset_errors_name_the_missing_mask_or_unreadable_image(tiny_mvtec, tmp_path):
    category = tmp_path / "brick"
    shutil.copytree(tiny_mvtec.mvtec_root / "brick", category)
    (category / "test" / "good" / "000.png").write_bytes(b"broken")
    # found when the set is made, before scoring
    with pytest.raises(DraemInputError, match="good/000.png is not a PNG"):
        LabelledImageDataset(category / "test", resize_shape=(32, 32))
    # looks like a PNG, is not one
    (category / "test" / "good" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    dataset = LabelledImageDataset(category / "test", resize_shape=(32, 32))
    broken = next(i for i, p in enumerate(dataset.image_paths)
                  if p.parent.name == "good" and p.name == "000.png")
    with pytest.raises(DraemInputError, match="good/000.png"):
        dataset[broken]
    mask = next((category / "ground_truth").glob("*/001_mask.png"))
    mask.unlink()
    with pytest.raises(DraemInputError, match=f"{mask.parent.name}/001_mask.png"):
        LabelledImageDataset(category / "test")
    with pytest.raises(DraemInputError, match="does not exist"):
        LabelledImageDataset(tmp_path / "nothing" / "test")
