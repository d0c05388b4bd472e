import math

import numpy as np
import pytest
import torch
from released_reference import released_perlin

from augment import rotate, rotate_maps
from perlin import (
    MAX_PERLIN_CELLS,
    fade,
    gradients_from_angles,
    perlin_mask,
    perlin_mask_batch,
    perlin_noise,
    perlin_noise_batch,
)

# Every scale pair the sampler can draw: 2**a x 2**b cells, a, b in [0, 6).
RESOLUTIONS = [(2**a, 2**b) for a in range(6) for b in range(6)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_gradients(rng: np.random.Generator, res: tuple[int, int], dtype=np.float32) -> np.ndarray:
    return gradients_from_angles(rng.uniform(0, 2 * math.pi, size=(res[0] + 1, res[1] + 1)).astype(dtype))


def reference_fade(t: float) -> float:
    """Perlin's quintic fade, written out: 6t^5 - 15t^4 + 10t^3."""
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def reference_noise(shape, res, gradients):
    """Perlin noise written pixel by pixel from its definition, as the released program computes it (nothing
    from perlin.py)."""
    height, width = shape
    out = np.zeros(shape)
    for y in range(height):
        for x in range(width):
            ty, tx = y * res[0] / height, x * res[1] / width
            i, j = int(ty), int(tx)
            u, v = ty - i, tx - j
            n = {(dy, dx): gradients[i + dy, j + dx] @ np.array([u - dy, v - dx]) for dy in (0, 1)
                 for dx in (0, 1)}
            top = (n[1, 0] - n[0, 0]) * reference_fade(u) + n[0, 0]
            bottom = (n[1, 1] - n[0, 1]) * reference_fade(u) + n[0, 1]
            out[y, x] = math.sqrt(2) * ((bottom - top) * reference_fade(v) + top)
    return out


def test_fade_is_the_quintic_with_flat_ends():
    # 6t^5 - 15t^4 + 10t^3 by hand: t = 1/4: 6/1024 - 15/256 + 10/64 = 106/1024; t = 3/4: 1458/1024 - 1215/256
    # + 270/64 = 918/1024 (the fade is symmetric: 1 - 106/1024); t = 1/2: 1/2. All exact in binary.
    t = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(fade(t), [0.0, 106 / 1024, 0.5, 918 / 1024, 1.0])
    eps = 1e-4  # zero slope at both ends: the quintic's first derivative 30t^2 (t - 1)^2 vanishes there
    assert abs(fade(eps) - fade(0.0)) / eps < 1e-6 and abs(fade(1.0) - fade(1 - eps)) / eps < 1e-6


@pytest.mark.parametrize("res", [(1, 1), (2, 4), (8, 2), (3, 5)])
def test_vectorised_noise_matches_the_per_pixel_definition(res):
    gradients = random_gradients(np.random.default_rng(0), res, dtype=np.float64)
    np.testing.assert_allclose(perlin_noise((24, 40), res, gradients),
                               reference_noise((24, 40), res, gradients), atol=1e-12)


def test_every_scale_pair_at_256_works_and_the_batch_equals_single_maps():
    rng = np.random.default_rng(1)
    padded = np.zeros((len(RESOLUTIONS), MAX_PERLIN_CELLS + 1, MAX_PERLIN_CELLS + 1, 2), dtype=np.float32)
    singles = []
    for b, res in enumerate(RESOLUTIONS):
        gradients = random_gradients(rng, res)
        padded[b, : res[0] + 1, : res[1] + 1] = gradients
        singles.append(perlin_noise((256, 256), res, gradients))
    batch = perlin_noise_batch((256, 256), RESOLUTIONS, padded)
    assert batch.shape == (len(RESOLUTIONS), 256, 256) and batch.dtype == np.float32
    assert np.isfinite(batch).all() and np.abs(batch).max() <= 1.5
    for b, single in enumerate(singles):
        assert single.shape == (256, 256)
        np.testing.assert_allclose(batch[b], single, atol=1e-6)
        assert single.std() > 0.05  # a real noise map, not a constant


def test_noise_is_bit_identical_to_the_released_float64_computation():
    for res in RESOLUTIONS:
        expected = released_perlin((256, 256), res, np.random.default_rng(7))
        angles = 2 * math.pi * np.random.default_rng(7).random((res[0] + 1, res[1] + 1))
        np.testing.assert_array_equal(perlin_noise((256, 256), res, gradients_from_angles(angles)), expected)


def test_noise_vanishes_on_the_lattice():
    res = (4, 8)
    noise = perlin_noise((64, 64), res, random_gradients(np.random.default_rng(2), res))
    np.testing.assert_allclose(noise[::16, ::8], 0.0, atol=1e-6)
    assert np.abs(noise[8::16, 4::8]).max() > 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_torch_path_matches_numpy_on_its_device(device):
    rng = np.random.default_rng(3)
    res = [(2, 8), (32, 1)]
    padded = np.zeros((2, 33, 33, 2), dtype=np.float32)
    for b, r in enumerate(res):
        padded[b, : r[0] + 1, : r[1] + 1] = random_gradients(rng, r)
    expected = perlin_noise_batch((64, 96), res, padded)
    result = perlin_noise_batch((64, 96), torch.tensor(res, device=device),
                                torch.from_numpy(padded).to(device))
    assert isinstance(result, torch.Tensor) and result.device.type == device and result.dtype == torch.float32
    np.testing.assert_allclose(result.cpu().numpy(), expected, atol=1e-5)


def test_perlin_mask_is_binary_reproducible_and_varied():
    masks = [perlin_mask((64, 64), np.random.default_rng(seed)) for seed in range(40)]
    for mask in masks:
        assert mask.shape == (64, 64, 1) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(masks[0], perlin_mask((64, 64), np.random.default_rng(0)))
    coverage = np.array([m.mean() for m in masks])
    assert len(np.unique(coverage)) > 20
    assert 0.01 < coverage.mean() < 0.2  # thresholding sqrt(2)-scaled noise at 0.5 keeps a few percent


def test_rotate_maps_follows_the_opencv_rotation():
    y, x = np.mgrid[0:64, 0:96].astype(np.float32)
    smooth = np.sin(x / 9) + np.cos(y / 7) + x / 50
    for degrees in (-75.0, 30.0):
        expected = rotate(smooth, degrees)
        result = rotate_maps(torch.from_numpy(smooth)[None], torch.tensor([degrees]))[0].numpy()
        np.testing.assert_allclose(result[8:-8, 8:-8], expected[8:-8, 8:-8], atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_perlin_mask_batch_is_binary_varied_and_seeded(device):
    masks = perlin_mask_batch((64, 64), 8, torch.Generator(device).manual_seed(0), device)
    again = perlin_mask_batch((64, 64), 8, torch.Generator(device).manual_seed(0), device)
    assert masks.shape == (8, 1, 64, 64) and masks.dtype == torch.float32 and masks.device.type == device
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks, again)
    assert len(set(masks.mean(dim=(1, 2, 3)).tolist())) > 4
