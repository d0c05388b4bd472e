import cv2
import numpy as np
import pytest
from imgaug_reference import IMGAUG_BRIGHTNESS_SPACES, imgaug_brightness

import augment
from augment import (
    AUGMENTATIONS,
    augment_source,
    autocontrast,
    brightness,
    draw_augmentations,
    equalize,
    gamma_contrast,
    hue_saturation,
    invert,
    posterize,
    rotate,
    sharpness,
    solarize,
)


@pytest.fixture
def image() -> np.ndarray:
    """A textured colour image with odd sides (so it has a centre pixel)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:33, 0:47]
    base = np.stack([x * 5, y * 7, (x + y) * 3], axis=-1) + rng.integers(0, 40, size=(33, 47, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def total_variation(img: np.ndarray) -> float:
    img = img.astype(np.float64)
    return np.abs(np.diff(img, axis=0)).sum() + np.abs(np.diff(img, axis=1)).sum()


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_operation_returns_uint8_of_the_same_shape_and_keeps_its_input(name, image):
    original = image.copy()
    for seed in range(5):
        result = AUGMENTATIONS[name](image, np.random.default_rng(seed))
        assert result.dtype == np.uint8 and result.shape == image.shape
    np.testing.assert_array_equal(image, original)


def test_invert_twice_is_the_identity(image):
    assert (invert(image) != image).any()
    np.testing.assert_array_equal(invert(invert(image)), image)


def test_equalize_flattens_the_histogram():
    rng = np.random.default_rng(1)
    narrow = rng.normal(120, 6, size=(64, 64, 3)).clip(0, 255).astype(np.uint8)

    def distance_to_uniform(img):
        cdf = np.cumsum(np.bincount(img.ravel(), minlength=256)) / img.size
        return np.abs(cdf - np.arange(1, 257) / 256).max()

    result = equalize(narrow)
    assert distance_to_uniform(narrow) > 0.4
    assert distance_to_uniform(result) < 0.1
    assert result.min() < 20 and result.max() > 235


@pytest.mark.parametrize("bits", range(1, 9))
def test_posterize_leaves_at_most_2_to_the_bits_levels(bits):
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (4, 1, 3))
    result = posterize(ramp, bits)
    assert len(np.unique(result)) == 2**bits
    assert (result & ((1 << (8 - bits)) - 1) == 0).all()  # PIL-style: the low bits are cleared


def test_solarize_inverts_only_values_at_or_above_the_threshold(image):
    for threshold in (32.0, 100.5, 128.0):
        expected = np.where(image >= threshold, 255 - image, image)
        np.testing.assert_array_equal(solarize(image, threshold), expected)


def test_rotate_keeps_the_centre_pixel(image):
    centre = image[16, 23]
    for degrees in (-45.0, -13.7, 30.0, 90.0):
        rotated = rotate(image, degrees)
        np.testing.assert_array_equal(rotated[16, 23], centre)
        assert (rotated != image).any()
    np.testing.assert_array_equal(rotate(image, 0.0), image)


def test_gamma_contrast_uses_its_own_gamma_per_channel(image):
    result = gamma_contrast(image, (2.0, 1.0, 0.5)).astype(int)
    assert (result[..., 0] <= image[..., 0]).all() and (result[..., 0] < image[..., 0]).any()
    assert np.abs(result[..., 1] - image[..., 1]).max() <= 1
    assert (result[..., 2] >= image[..., 2]).all() and (result[..., 2] > image[..., 2]).any()


@pytest.mark.parametrize("space", list(IMGAUG_BRIGHTNESS_SPACES))
def test_brightness_in_each_colour_space_is_imgaugs_multiply_and_add_on_its_channel(space):
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, (16, 64, 3), dtype=np.uint8)
    # 12.5 and -29.5 are ties (rounded to 12 and -30); 1.17 and 0.81 give fractional products (truncated).
    for multiply, add in ((1.17, 12.5), (0.81, -29.5), (1.2, 30.0)):
        for add_first in (False, True):
            expected = imgaug_brightness(noise, multiply, add, space, add_first)
            np.testing.assert_array_equal(brightness(noise, multiply, add, space, add_first), expected)
    # The order matters (so the test above tells the two apart) and the image does change.
    assert (brightness(noise, 1.17, 12.5, space, True) != brightness(noise, 1.17, 12.5, space, False)).any()
    assert (brightness(noise, 1.17, 12.5, space, False) != noise).any()


def test_brightness_scales_and_shifts_the_luma_of_a_gray_image():
    # A grey pixel has luma = its value in every space but Lab/Luv (L = 116·Y^(1/3) - 16): 100 -> 125, 120,
    # 50.
    gray = np.full((8, 8, 3), 100, dtype=np.uint8)
    for space in ("YCrCb", "HSV", "HLS", "YUV"):
        np.testing.assert_array_equal(brightness(gray, 1.0, 25.0, space, False), 125)
        np.testing.assert_array_equal(brightness(gray, 1.2, 0.0, space, True), 120)
        np.testing.assert_array_equal(brightness(gray, 0.8, -30.0, space, False), 50)


def test_brightness_draws_each_colour_space_uniformly_and_either_order_half_the_time(monkeypatch):
    draws = []
    monkeypatch.setattr(augment, "brightness",
                        lambda img, m, a, space, add_first: draws.append((m, a, space, add_first)) or img)
    rng = np.random.default_rng(6)
    pixel = np.zeros((1, 1, 3), dtype=np.uint8)
    n = 6000
    for _ in range(n):
        AUGMENTATIONS["brightness"](pixel, rng)
    multiply, add, spaces, add_first = zip(*draws)
    # imgaug's list
    assert augment.RANGES["brightness_colorspaces"] == ("YCrCb", "HSV", "HLS", "Lab", "Luv", "YUV")
    # 6000 draws: a space's count has sd sqrt(6000·1/6·5/6) = 29, the add-first count sqrt(6000/4) = 39; 5 sd
    # each.
    counts = {space: spaces.count(space) for space in IMGAUG_BRIGHTNESS_SPACES}
    assert all(abs(c - n / 6) < 5 * 29 for c in counts.values()), counts
    assert abs(sum(add_first) - n / 2) < 5 * 39
    assert 0.8 <= min(multiply) < 0.801 and 1.199 < max(multiply) < 1.2
    assert -30 <= min(add) < -29.9 and 29.9 < max(add) < 30


def test_sharpness_factor_orders_the_local_contrast(image):
    np.testing.assert_array_equal(sharpness(image, 1.0), image)
    assert (total_variation(sharpness(image, 0.0)) < total_variation(image)
            < total_variation(sharpness(image, 2.0)))


def test_hue_saturation_moves_hue_and_saturation_by_the_shifts():
    rng = np.random.default_rng(2)
    hsv = np.stack([rng.integers(0, 256, (16, 16)), rng.integers(120, 200, (16, 16)),
                    rng.integers(150, 250, (16, 16))], -1)
    colourful = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)
    before = cv2.cvtColor(colourful, cv2.COLOR_RGB2HSV_FULL).astype(int)
    after = cv2.cvtColor(hue_saturation(colourful, 40, -30), cv2.COLOR_RGB2HSV_FULL).astype(int)
    hue_change = (after[..., 0] - before[..., 0]) % 256
    assert np.median(hue_change) == pytest.approx(40, abs=2)
    assert np.median(after[..., 1] - before[..., 1]) == pytest.approx(-30, abs=3)


def test_hue_wraps_around_the_full_circle():
    """Hue is a circle of 256 steps: a red just below 360 degrees shifted +10 becomes an orange red (R
    largest, then G), one just above 0 shifted -10 a magenta red (R largest, then B). Channel 0 is read as R
    (the released quirk).
    A hue that wrapped at 180 steps would land at about 114 or 245 degrees: green or blue."""
    # hue 354 and 6 degrees: full-range 251 and 4
    reds = np.array([[[255, 0, 24], [255, 24, 0]]], dtype=np.uint8)
    for shifted in (hue_saturation(reds[:, :1], 10, 0), hue_saturation(reds[:, 1:], -10, 0)):
        assert shifted[0, 0].argmax() == 0, shifted
    assert hue_saturation(reds[:, :1], 10, 0)[0, 0, 1] > hue_saturation(reds[:, :1], 10, 0)[0, 0, 2]
    assert hue_saturation(reds[:, 1:], -10, 0)[0, 0, 2] > hue_saturation(reds[:, 1:], -10, 0)[0, 0, 1]


def test_autocontrast_stretches_each_channel_with_its_cutoff():
    rng = np.random.default_rng(3)
    low, high = np.array([50, 0, 80]), np.array([150, 100, 200])
    img = rng.integers(low, high + 1, size=(40, 40, 3)).astype(np.uint8)
    full = autocontrast(img, 0)
    np.testing.assert_array_equal(full.reshape(-1, 3).min(axis=0), [0, 0, 0])
    # PIL truncates x * scale + offset, so the top can land on 254 (255 / 100 * 100 < 255 in floating point).
    assert (full.reshape(-1, 3).max(axis=0) >= 254).all()
    clipped = autocontrast(img, 10)
    for c in range(3):
        assert (clipped[..., c] == 0).mean() >= 0.09 and (clipped[..., c] == 255).mean() >= 0.09


def test_sampler_draws_three_distinct_operations_uniformly_in_random_order():
    rng = np.random.default_rng(4)
    names = list(AUGMENTATIONS)
    draws = [draw_augmentations(rng) for _ in range(3000)]
    assert all(len(set(d)) == 3 for d in draws)
    frequency = {name: sum(name in d for d in draws) / len(draws) for name in names}
    assert all(abs(f - 0.3) < 0.04 for f in frequency.values())
    assert {d[0] for d in draws} == set(names)
    in_table_order = np.mean([[names.index(n) for n in d] == sorted(names.index(n) for n in d)
                              for d in draws])
    assert abs(in_table_order - 1 / 6) < 0.04  # the drawn order is kept, not the table's


def test_augment_source_applies_the_drawn_operations_in_the_drawn_order(image, monkeypatch):
    applied = []
    for name, operation in list(AUGMENTATIONS.items()):
        monkeypatch.setitem(augment.AUGMENTATIONS, name,
                            lambda img, rng, n=name, op=operation: applied.append(n) or op(img, rng))
    for seed in range(10):
        applied.clear()
        augment_source(image, np.random.default_rng(seed))
        assert applied == draw_augmentations(np.random.default_rng(seed))
