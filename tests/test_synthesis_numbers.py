"""The numbers of DRAEM's anomaly synthesis on the CPU path, measured from many seeded training samples.

Every expected value is the method's (Zavrtanik et al., ICCV 2021, and the released training program):
an anomaly is pasted with probability 0.5 (and is no anomaly when its Perlin mask is empty); the
opacity beta is uniform in [0, 0.8); training images are rotated with probability 0.3 by an angle
uniform in [-90, 90] degrees; the source gets 3 distinct of 10 augmentations, one of them a rotation
uniform in [-45, 45] degrees; the Perlin noise has 2**a x 2**b cells with a, b independently uniform
in {0, ..., 5}, is rotated by an angle uniform in [-90, 90] degrees and thresholded at 0.5.
Each statistical check states its sample size and a tolerance of at least 5 standard errors.
"""
import numpy as np
import pytest
import torch

import augment
import data_loader as cpu_synthesis
import perlin
from data_loader import make_training_sample
from perlin import perlin_mask

SHAPE = (64, 64)
N_SAMPLES = 5000  # training samples, seeds 0 .. N_SAMPLES - 1
N_BETA_PAIRS = 1000  # the first seeds again with a black training image: beta read off the pixels
N_MASKS = 3000  # Perlin masks drawn alone, for the share of empty ones
AUGMENTATION_NAMES = {"gamma_contrast", "brightness", "sharpness", "hue_saturation", "solarize", "posterize",
                      "invert", "autocontrast", "equalize", "rotate"}


def observe_synthesis(monkeypatch, noise_value=None) -> dict[str, list]:
    """Record the synthesis' draws as it runs: the angles of the three rotations (training image, source,
    Perlin noise), each applied source augmentation's name, each Perlin resolution (cells along y, x).

    With `noise_value`, every Perlin noise map is that constant instead (to see the threshold).
    """
    log = {"image_angles": [], "source_angles": [], "noise_angles": [], "augmentations": [], "perlin_res": []}

    def recording_rotate(key, rotate):
        def wrapper(image, degrees):
            log[key].append(float(degrees))
            return rotate(image, degrees)
        return wrapper

    def recording_augmentation(name, operation):
        def wrapper(image, rng):
            log["augmentations"].append(name)
            return operation(image, rng)
        return wrapper

    noise = perlin.perlin_noise

    def recording_noise(shape, res, gradients):
        log["perlin_res"].append(tuple(int(r) for r in res))
        return noise(shape, res, gradients) if noise_value is None else np.full(shape, noise_value)

    # Three distinct call sites: data_loader.py rotates the training image, the source's "rotate" augmentation
    # calls augment.rotate, perlin rotates the noise map.
    monkeypatch.setattr(cpu_synthesis, "rotate", recording_rotate("image_angles", cpu_synthesis.rotate))
    monkeypatch.setattr(augment, "rotate", recording_rotate("source_angles", augment.rotate))
    monkeypatch.setattr(perlin, "rotate", recording_rotate("noise_angles", perlin.rotate))
    for name, operation in list(augment.AUGMENTATIONS.items()):
        monkeypatch.setitem(augment.AUGMENTATIONS, name, recording_augmentation(name, operation))
    monkeypatch.setattr(perlin, "perlin_noise", recording_noise)
    return log


def one_sample(seed: int, image: np.ndarray, source: np.ndarray) -> dict:
    return make_training_sample(np.random.default_rng(int(seed)), 1, lambda index: image, lambda rng: source)


def recovered_beta(bright: dict, dark: dict) -> tuple[float, float] | None:
    """Beta of one anomalous draw and its spread over the pixels, from the same draw on a white and a black
    image.

    Inside the mask augmented = (1 - beta) * source + beta * image, so the difference of the two
    augmented images divided by that of the two images (white minus black) is beta at every pixel.
    """
    # not in the black corners of a rotated image
    usable = (bright["anomaly_mask"][0] > 0) & (bright["image"][0] > 0.5)
    if not usable.any():
        return None
    ratio = (bright["augmented_image"] - dark["augmented_image"])[:, usable] / bright["image"][:, usable]
    return float(np.median(ratio)), float(ratio.max() - ratio.min())


@pytest.fixture(scope="module")
def synthesis() -> dict:
    """N_SAMPLES seeded samples of a white 64x64 image with a fixed noise source, what they drew, and beta."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny images on a shared machine: one thread is fastest
    white, black = np.full((*SHAPE, 3), 255, np.uint8), np.zeros((*SHAPE, 3), np.uint8)
    source = np.random.default_rng(12345).integers(0, 256, (*SHAPE, 3), dtype=np.uint8)
    has_anomaly, augmentations = [], []
    with pytest.MonkeyPatch.context() as monkeypatch:
        log = observe_synthesis(monkeypatch)
        for seed in range(N_SAMPLES):
            start = len(log["augmentations"])
            has_anomaly.append(float(one_sample(seed, white, source)["has_anomaly"][0]))
            augmentations.append(log["augmentations"][start:])
    # Unobserved from here on; the black twin of a seed draws exactly what the white sample draws.
    betas, same_masks = [], True
    for seed in np.flatnonzero(has_anomaly[:N_BETA_PAIRS]):
        bright, dark = one_sample(seed, white, source), one_sample(seed, black, source)
        same_masks &= np.array_equal(bright["anomaly_mask"], dark["anomaly_mask"])
        betas.append(recovered_beta(bright, dark))
    empty_masks = [not perlin_mask(SHAPE, np.random.default_rng(10**6 + i)).any() for i in range(N_MASKS)]
    torch.set_num_threads(threads)
    return {**log, "has_anomaly": np.array(has_anomaly), "augmentations_per_sample": augmentations,
            "betas": [b for b in betas if b is not None], "same_masks": same_masks,
            "empty_mask_share": np.mean(empty_masks)}


def test_half_of_the_draws_are_anomalies_unless_their_perlin_mask_is_empty(synthesis):
    """P(has_anomaly) = 0.5 x P(Perlin mask not empty), about 0.48 at 64 px."""
    empty, anomalous = synthesis["empty_mask_share"], synthesis["has_anomaly"].mean()
    # Standard error of the difference: sqrt(0.48 * 0.52 / 5000 + 0.25 * 0.05 * 0.95 / 3000) = 0.0073;
    # 0.04 is 5.5 of them. (An anomaly probability of 0.6 would give 0.57, 13 of them away.)
    assert 0.0 < empty < 0.2
    assert abs(anomalous - 0.5 * (1 - empty)) < 0.04


def test_beta_is_uniform_in_0_to_0_8_and_weights_the_image(synthesis):
    """Inside the mask augmented = (1 - beta) * source + beta * image, one beta per sample, uniform in [0,
    0.8)."""
    assert synthesis["same_masks"]  # the black twin drew exactly what the white sample drew
    betas = np.array([beta for beta, _ in synthesis["betas"]])
    spreads = np.array([spread for _, spread in synthesis["betas"]])
    assert len(betas) > 390  # about 0.476 x 1000 anomalous pairs, binomial standard deviation 16
    # float32 rounding of the blend (~1e-7): a single beta at every pixel of a sample
    assert spreads.max() < 1e-5
    assert betas.min() >= 0 and betas.max() < 0.8
    # About 475 betas: P(max < 0.78) = (1 - 0.02 / 0.8) ** 475 = 6e-6, likewise for min > 0.02.
    assert betas.max() > 0.78 and betas.min() < 0.02
    # Standard error of the mean: 0.8 / sqrt(12) / sqrt(475) = 0.0106; 0.055 is 5.2 of them.
    assert abs(betas.mean() - 0.4) < 0.055


def test_three_in_ten_training_images_are_rotated_by_up_to_90_degrees(synthesis):
    """The training image is rotated with probability 0.3, by an angle uniform in [-90, 90] degrees."""
    angles = np.array(synthesis["image_angles"])
    # Standard error: sqrt(0.3 * 0.7 / 5000) = 0.0065; 0.035 is 5.4 of them.
    assert abs(len(angles) / N_SAMPLES - 0.3) < 0.035
    assert angles.min() >= -90 and angles.max() <= 90
    # About 1500 angles: P(none beyond 88 on one side) = (178 / 180) ** 1500 = 5e-8.
    assert angles.min() < -88 and angles.max() > 88
    # E|angle| = 45; standard error 90 / sqrt(12) / sqrt(1500) = 0.67, 3.5 is 5.2 of them.
    assert abs(np.abs(angles).mean() - 45) < 3.5


def test_each_anomaly_source_gets_three_distinct_of_the_ten_augmentations(synthesis):
    """Exactly 3 distinct operations per source, each of the 10 in 3/10 of the sources."""
    drawn = [names for names in synthesis["augmentations_per_sample"] if names]
    assert sum(synthesis["has_anomaly"]) <= len(drawn)  # every anomaly's source was augmented
    assert all(len(names) == len(set(names)) == 3 for names in drawn)
    counts = {name: sum(name in names for names in drawn) for name in AUGMENTATION_NAMES}
    assert set().union(*drawn) == AUGMENTATION_NAMES
    # About 2500 sources: standard error sqrt(0.3 * 0.7 / 2500) = 0.0092; 0.05 is 5.4 of them.
    for name, count in counts.items():
        assert abs(count / len(drawn) - 0.3) < 0.05, name


def test_the_source_rotation_is_uniform_within_45_degrees(synthesis):
    """The "rotate" augmentation turns the source by an angle uniform in [-45, 45] degrees."""
    angles = np.array(synthesis["source_angles"])
    assert len(angles) == sum("rotate" in names for names in synthesis["augmentations_per_sample"])
    assert angles.min() >= -45 and angles.max() <= 45
    # About 750 angles: P(none beyond 43 on one side) = (88 / 90) ** 750 = 5e-8.
    assert angles.min() < -43 and angles.max() > 43
    # E|angle| = 22.5; standard error 45 / sqrt(12) / sqrt(750) = 0.47, 2.5 is 5.3 of them.
    assert abs(np.abs(angles).mean() - 22.5) < 2.5


def test_perlin_cells_are_independent_powers_of_two_from_1_to_32_per_axis(synthesis):
    """2**a cells along y and 2**b along x, a and b independently uniform in {0, ..., 5}."""
    res = np.array(synthesis["perlin_res"])
    assert len(res) > 2300  # one noise map per anomalous draw: about 2500, binomial standard deviation 35
    for axis in (0, 1):
        values, counts = np.unique(res[:, axis], return_counts=True)
        assert values.tolist() == [1, 2, 4, 8, 16, 32]
        # Standard error sqrt(1/6 * 5/6 / 2500) = 0.0075; 0.04 is 5.4 of them.
        assert np.abs(counts / len(res) - 1 / 6).max() < 0.04
    assert len({tuple(r) for r in res}) == 36  # every pair occurs: P(a given one is missing) = (35/36) **
                                               # 2500 = 4e-31
    # Independent axes: the two are equal in 1/6 of the maps (1 if one draw served both), same error as above.
    assert abs(np.mean(res[:, 0] == res[:, 1]) - 1 / 6) < 0.04


def test_perlin_noise_is_rotated_uniformly_within_90_degrees(synthesis):
    """As released (imgaug Affine(rotate=(-90, 90)) on the noise), each noise map is rotated before
    thresholding."""
    angles = np.array(synthesis["noise_angles"])
    assert len(angles) == len(synthesis["perlin_res"])
    assert angles.min() >= -90 and angles.max() <= 90
    # About 2500 angles: P(none beyond 88 on one side) = (178 / 180) ** 2500 = 8e-13.
    assert angles.min() < -88 and angles.max() > 88
    # E|angle| = 45; standard error 90 / sqrt(12) / sqrt(2500) = 0.52, 2.6 is 5 of them.
    assert abs(np.abs(angles).mean() - 45) < 2.6


# A constant map keeps its value inside the rotated image square: at least 2 (sqrt(2) - 1) = 83 % of the
# image (at 45 degrees), less a one-pixel bilinear edge; outside it the zero fill is below any threshold.
@pytest.mark.parametrize(("noise_value", "coverage"), [(0.499, (0.0, 0.0)), (0.501, (0.75, 1.0))])
def test_the_mask_keeps_the_noise_above_0_5(monkeypatch, noise_value, coverage):
    """Noise just below 0.5 gives an empty mask, just above it a mask of everything the rotation keeps."""
    observe_synthesis(monkeypatch, noise_value)
    for seed in range(20):
        assert coverage[0] <= perlin_mask(SHAPE, np.random.default_rng(seed)).mean() <= coverage[1]
