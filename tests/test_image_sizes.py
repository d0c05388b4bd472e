"""Images as they come: a height and a width through the flag, Perlin masks, both syntheses and threshold
files."""
import numpy as np
import pytest
import torch

from data_loader import make_training_sample
from device_synthesis import synthesize_batch
from model_unet import check_image_size
from perlin import noise_canvas, perlin_mask, perlin_mask_batch, scaled_cells
from util.cli import ArgumentParser, add_image_size_flag
from util.errors import DraemInputError
from util.images import image_shape, shape_record
from util.thresholds import usable_thresholds, write_thresholds

pytestmark = pytest.mark.usefixtures("one_thread")


def parse(*argv: str) -> tuple[int, int]:
    parser = ArgumentParser(prog="x")
    add_image_size_flag(parser)
    return parser.parse_args(list(argv)).image_size


def test_image_size_is_one_side_or_height_and_width():
    assert parse() == (256, 256) and parse("--image_size", "256") == (256, 256)
    assert parse("--image_size", "256", "384") == (256, 384)
    assert image_shape(64) == (64, 64) and image_shape((32, 96)) == (32, 96)
    assert shape_record((64, 64)) == 64 and shape_record((32, 96)) == [32, 96]
    check_image_size((32, 96))
    with pytest.raises(DraemInputError, match="multiple of 32 per side .* got 32x100"):
        check_image_size((32, 100))


def test_a_non_square_mask_is_cut_from_a_square_canvas_with_cells_of_one_size():
    assert noise_canvas((64, 64)) == (64, 1.0) and noise_canvas((64, 192)) == (192, 3.0)
    # 1..32 cells drawn for the 64-pixel side are 3..96 on the 192-pixel canvas: cells of 64/2**a pixels
    # either way.
    np.testing.assert_array_equal(scaled_cells(np.array([1, 32]), 3.0), [3, 96])
    np.testing.assert_array_equal(scaled_cells(torch.tensor([1, 2]), 1.5), [2, 3])  # 1.5 rounds half to even
    masks = np.stack([perlin_mask((32, 96), np.random.default_rng(seed))[..., 0] for seed in range(100)])
    assert masks.shape == (100, 32, 96) and set(np.unique(masks)) <= {0.0, 1.0}
    # Rotating the canvas, not the 32×96 map, leaves no empty ends: the ends of the long side are covered
    # about as often as its centre (measured over these 100 seeds: 0.91 and 1.00; rotating the map itself:
    # about 0.2).
    centre = masks[:, :, 40:56].mean()
    assert masks[:, :, :16].mean() > 0.6 * centre and masks[:, :, -16:].mean() > 0.6 * centre
    batch = perlin_mask_batch((32, 96), 16, torch.Generator().manual_seed(0))
    assert batch.shape == (16, 1, 32, 96) and 0 < batch.mean() < 1


def test_both_syntheses_make_samples_of_height_and_width():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)

    def noise(r: np.random.Generator) -> np.ndarray:
        return r.integers(0, 256, (32, 64, 3), dtype=np.uint8)

    samples = [make_training_sample(np.random.default_rng(s), 1, lambda i: image, noise) for s in range(8)]
    assert {s["augmented_image"].shape for s in samples} == {(3, 32, 64)}
    assert {s["anomaly_mask"].shape for s in samples} == {(1, 32, 64)}
    assert any(s["has_anomaly"][0] == 1 for s in samples)
    batch = synthesize_batch(torch.from_numpy(image).permute(2, 0, 1)[None].repeat(4, 1, 1, 1),
                             generator=torch.Generator().manual_seed(0))
    assert batch["augmented_image"].shape == (4, 3, 32, 64) and batch["anomaly_mask"].shape == (4, 1, 32, 64)


def test_a_threshold_file_keeps_its_height_and_width_and_refuses_another(tmp_path):
    thresholds = {"image_threshold": 0.5, "pixel_threshold": 0.5}
    write_thresholds(tmp_path, "base", "can", {**thresholds, "image_size": [32, 64]})
    assert usable_thresholds(tmp_path, "base", "can", (32, 64))["image_size"] == [32, 64]
    with pytest.raises(DraemInputError, match="calibrated at image size 32x64, not 64x32"):
        usable_thresholds(tmp_path, "base", "can", (64, 32))
    write_thresholds(tmp_path, "base", "rice", {**thresholds, "image_size": 64})  # square as before: one side
    assert usable_thresholds(tmp_path, "base", "rice", (64, 64)) is not None
