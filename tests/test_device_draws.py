"""The device synthesis path's own random draws (`--synthesis gpu`), observed on the CPU from seeded batches.

Each operation of device_synthesis is replaced by a recorder that keeps the parameters it was called with, so
what is checked is what the device path draws, not what the operations do with it (that is compared with
the CPU path in test_device_synthesis.py). Expected values are the method's (METHOD.md §2, the released
program's imgaug ranges), written here as literals:

  gamma U[0.5, 2.0) per sample AND channel; sharpness U[0, 2); hue and saturation shifts integers -50..50,
  drawn separately; solarize threshold U[32, 128); posterize bits 1..8; autocontrast cutoff 0..20 percent;
  source rotation U[-45, 45); every other parameter one per sample, as the CPU path draws one per image.
  Training image: rotated with probability 0.3 by U[-90, 90]. Perlin: 2**a x 2**b cells, a, b independent
  integers 0..5, gradient directions U[0, 2pi), noise rotated by U[-90, 90], mask = noise > 0.5.
  Anomalous with probability 0.5.

N draws per check. A uniform's mean has standard error (high - low) / sqrt(12 N); a proportion p has
sqrt(p (1 - p) / N); every tolerance below is 5 of those (named where used). The end-point checks ask for a
draw within 0.5 % of the range of each end: with N = 4000 draws, P(none there) = 0.995**4000 = 2e-9.
"""
import math

import pytest
import torch

import device_synthesis
import perlin
from device_synthesis import DEVICE_AUGMENTATIONS, rotate_some_images, synthesize_batch
from perlin import perlin_mask_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread

N = 4000


def assert_uniform(values: torch.Tensor, low: float, high: float, what: str) -> None:
    """Float draws in [low, high), reaching both ends, with the uniform's mean (5 standard errors)."""
    values = values.double().flatten()
    assert values.dtype.is_floating_point
    assert values.min() >= low and values.max() < high, f"{what}: outside [{low}, {high})"
    edge = 0.005 * (high - low)
    assert values.min() < low + edge and values.max() > high - edge, (
        f"{what}: does not reach the ends of [{low}, {high})")
    standard_error = (high - low) / math.sqrt(12 * values.numel())
    assert abs(values.mean().item() - (low + high) / 2) < 5 * standard_error, (
        f"{what}: mean {values.mean().item()}")


def assert_integers(values: torch.Tensor, low: int, high: int, what: str) -> None:
    """Integer draws: exactly the values low..high, each about equally often (5 standard errors)."""
    assert not values.dtype.is_floating_point, f"{what}: {values.dtype}, not integers"
    counts = torch.bincount(values.flatten() - low, minlength=high - low + 1)
    assert values.min() == low and values.max() == high and (counts > 0).all(), (
        f"{what}: {values.unique().tolist()}")
    p = 1 / (high - low + 1)
    assert ((counts / values.numel() - p).abs() < 5 * math.sqrt(p * (1 - p) / values.numel())).all(), (
        f"{what}: {counts}")


def recorded_draws(monkeypatch, operation: str, replaced: str, seed: int = 0) -> tuple:
    """Run DEVICE_AUGMENTATIONS[operation] on N tiny images with device_synthesis.<replaced> recording its
    arguments (and returning the images unchanged); return the parameters it was given (everything after the
    images)."""
    calls = []

    def recorder(images, *parameters):
        calls.append(parameters)
        return images

    monkeypatch.setattr(device_synthesis, replaced, recorder)
    DEVICE_AUGMENTATIONS[operation](torch.zeros(N, 3, 2, 2, dtype=torch.uint8),
                                    torch.Generator().manual_seed(seed))
    (parameters,) = calls
    return parameters


def test_gamma_is_drawn_per_sample_and_per_channel_in_0_5_to_2(monkeypatch):
    (gammas,) = recorded_draws(monkeypatch, "gamma_contrast", "gamma_contrast")
    # the method: one gamma per channel (imgaug per_channel=True), not one per image
    assert gammas.shape == (N, 3)
    assert_uniform(gammas, 0.5, 2.0, "gamma")
    # Independent channels: two uniforms' sample correlation has standard error 1/sqrt(N) = 0.016; 5 of them.
    correlation = torch.corrcoef(gammas.T.double())
    assert (correlation - torch.eye(3, dtype=torch.float64)).abs().max() < 5 / math.sqrt(N)


def test_sharpness_factor_is_one_per_sample_in_0_to_2(monkeypatch):
    (factors,) = recorded_draws(monkeypatch, "sharpness", "sharpness")
    assert factors.shape == (N,)
    assert_uniform(factors, 0.0, 2.0, "sharpness")


def test_hue_and_saturation_shifts_are_separate_integers_from_minus_50_to_50(monkeypatch):
    hue, saturation = recorded_draws(monkeypatch, "hue_saturation", "hue_saturation")
    assert hue.shape == saturation.shape == (N,)
    assert_integers(hue, -50, 50, "hue shift")
    assert_integers(saturation, -50, 50, "saturation shift")
    # Separate draws agree in 1 of 101 samples: 40 expected, standard deviation 6.3; one draw for both: all
    # 4000.
    assert (hue == saturation).sum() < 40 + 5 * 6.3


def test_solarize_threshold_is_one_per_sample_in_32_to_128(monkeypatch):
    (thresholds,) = recorded_draws(monkeypatch, "solarize", "solarize")
    assert thresholds.shape == (N,)
    assert_uniform(thresholds, 32.0, 128.0, "solarize threshold")


def test_posterize_keeps_1_to_8_bits_per_sample(monkeypatch):
    (bits,) = recorded_draws(monkeypatch, "posterize", "posterize")
    assert bits.shape == (N,)
    assert_integers(bits, 1, 8, "posterize bits")


def test_autocontrast_cutoff_is_0_to_20_percent_per_sample(monkeypatch):
    (cutoffs,) = recorded_draws(monkeypatch, "autocontrast", "autocontrast")
    assert cutoffs.shape == (N,)
    assert_integers(cutoffs, 0, 20, "autocontrast cutoff")


def test_source_rotation_is_one_angle_per_sample_within_45_degrees(monkeypatch):
    (degrees,) = recorded_draws(monkeypatch, "rotate", "rotate")
    assert degrees.shape == (N,)
    assert_uniform(degrees, -45.0, 45.0, "source rotation")


def test_brightness_parameters_are_one_per_sample(monkeypatch):
    multiply, add, spaces, add_first = recorded_draws(monkeypatch, "brightness", "brightness")
    assert multiply.shape == add.shape == spaces.shape == add_first.shape == (N,)
    assert_uniform(multiply, 0.8, 1.2, "brightness multiply")
    assert_uniform(add, -30.0, 30.0, "brightness add")


def test_operations_without_parameters_draw_nothing(monkeypatch):
    """invert and equalize take no random parameter: the generator is where it was."""
    for name in ("invert", "equalize"):
        generator = torch.Generator().manual_seed(0)
        DEVICE_AUGMENTATIONS[name](torch.zeros(4, 3, 2, 2, dtype=torch.uint8), generator)
        assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state()), name


def test_three_in_ten_training_images_are_rotated_within_90_degrees(monkeypatch):
    angles = []

    def marking_rotate(images, degrees):  # every rotated image comes back all ones, so the kept ones show
        angles.append(degrees)
        return torch.ones_like(images)

    monkeypatch.setattr(device_synthesis, "rotate", marking_rotate)
    result = rotate_some_images(torch.zeros(N, 3, 2, 2, dtype=torch.uint8), torch.Generator().manual_seed(1))
    (degrees,) = angles
    assert degrees.shape == (N,)
    assert_uniform(degrees, -90.0, 90.0, "image rotation")
    rotated = result.flatten(1).amax(1) == 1
    assert torch.equal(rotated, result.flatten(1).amin(1) == 1)  # a sample is rotated whole or not at all
    # Standard error sqrt(0.3 * 0.7 / 4000) = 0.0072; 0.036 is 5 of them (0.25 or 0.35 would be 7 away).
    assert abs(rotated.double().mean().item() - 0.3) < 0.036


def test_half_of_the_device_samples_get_an_anomaly(monkeypatch):
    """With a full Perlin mask every anomalous draw shows: has_anomaly is then the 0.5 coin itself."""
    monkeypatch.setattr(device_synthesis, "augment_sources", lambda sources, generator: sources)
    monkeypatch.setattr(device_synthesis, "perlin_mask_batch",
                        lambda shape, n, generator, device: torch.ones(n, 1, *shape, device=device))
    images = torch.zeros(N, 3, 4, 4, dtype=torch.uint8)
    batch = synthesize_batch(images, torch.full_like(images, 200), torch.Generator().manual_seed(2))
    # Standard error sqrt(0.25 / 4000) = 0.0079; 0.04 is 5 of them.
    assert abs(batch["has_anomaly"].mean().item() - 0.5) < 0.04
    anomalous = batch["has_anomaly"][:, 0] == 1
    assert ((batch["augmented_image"][anomalous] > 0).all()
            and (batch["augmented_image"][~anomalous] == 0).all())


def test_device_perlin_draws_independent_cells_directions_and_a_90_degree_rotation(monkeypatch):
    seen = {}
    noise_batch, rotate_maps, gradients = (perlin.perlin_noise_batch, perlin.rotate_maps,
                                           perlin.gradients_from_angles)

    def recording_noise(shape, res, grads):
        seen["res"] = res
        return noise_batch(shape, res, grads)

    def recording_gradients(angles):
        seen["angles"] = angles
        return gradients(angles)

    def recording_rotate(maps, degrees):
        seen["degrees"] = degrees
        return rotate_maps(maps, degrees)

    monkeypatch.setattr(perlin, "perlin_noise_batch", recording_noise)
    monkeypatch.setattr(perlin, "gradients_from_angles", recording_gradients)
    monkeypatch.setattr(perlin, "rotate_maps", recording_rotate)
    masks = perlin_mask_batch((8, 8), N, torch.Generator().manual_seed(3))
    assert masks.shape == (N, 1, 8, 8)
    res = seen["res"]
    assert res.shape == (N, 2)
    exponents = torch.log2(res.double()).round().long()
    assert torch.equal(2**exponents, res)  # powers of two
    for axis in (0, 1):
        assert_integers(exponents[:, axis], 0, 5, f"Perlin exponent, axis {axis}")
    # Independent axes: equal in 1/6 of the maps; standard error sqrt(5/36 / 4000) = 0.0059, 5 of them 0.03.
    assert abs((res[:, 0] == res[:, 1]).double().mean().item() - 1 / 6) < 0.03
    angles = seen["angles"]
    # one direction per lattice corner, 32 cells + 1
    assert angles.shape[0] == N and angles.shape[1:] == (33, 33)
    assert_uniform(angles, 0.0, 2 * math.pi, "gradient direction")
    assert seen["degrees"].shape == (N,)
    assert_uniform(seen["degrees"], -90.0, 90.0, "noise rotation")


# A constant map keeps its value inside the rotated square (at least 2 (sqrt(2) - 1) = 83 % of it at 45
# degrees, less a bilinear edge); outside it the zero fill is below any threshold.
@pytest.mark.parametrize(("value", "coverage"), [(0.499, (0.0, 0.0)), (0.501, (0.75, 1.0))])
def test_device_mask_keeps_the_noise_above_0_5(monkeypatch, value, coverage):
    monkeypatch.setattr(perlin, "perlin_noise_batch",
                        lambda shape, res, grads: torch.full((len(res), *shape), value))
    masks = perlin_mask_batch((32, 32), 16, torch.Generator().manual_seed(4))
    fractions = masks.flatten(1).mean(1)
    assert (fractions >= coverage[0]).all() and (fractions <= coverage[1]).all(), fractions
