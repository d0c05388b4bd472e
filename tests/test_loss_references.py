"""The parts of the training loss (DraemLoss: l2, ssim, focal) against references written here from the
released method."""
import numpy as np
import pytest
import torch

from loss import DraemLoss

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


# Images small enough that the zero-padded border (5 px each side) is 70 % of the pixels.
HEIGHT, WIDTH = 20, 24
# The focal hand case, a 2x2 pattern tiled over the image: per pixel (row-major), logits (class 0, class 1),
# mask. softmax(0, 0) = (0.5, 0.5); softmax(0, ln 3) = (0.25, 0.75); softmax(ln 9, 0) = (0.9, 0.1);
# softmax(ln 9999, 0) = (0.9999, 0.0001): a confidently wrong pixel, where the clamp's smoothing matters.
HAND_PIXELS = [((0.0, 0.0), 0.0), ((0.0, np.log(3.0)), 1.0), ((np.log(9.0), 0.0), 0.0),
               ((np.log(9999.0), 0.0), 1.0)]
# The released focal loss (gamma 2, smooth 1e-5): one-hot clamped to [1e-5, 1 - 1e-5], pt = sum(one_hot * p) +
# 1e-5 = q + 2e-5 (1 - q) for target-class probability q, loss = mean(-(1 - pt)^2 ln pt). By hand (float64):
#   mask 0, q = 0.5:    pt = 0.50001,     0.49999^2   * 0.693127181 = 0.173274864
#   mask 1, q = 0.75:   pt = 0.750005,    0.249995^2  * 0.287675406 = 0.017978994
#   mask 0, q = 0.9:    pt = 0.900002,    0.099998^2  * 0.105358293 = 0.001053541
#   mask 1, q = 0.0001: pt = 0.000119998, 0.999880^2  * 9.028035482 = 9.025868920
#   mean = 2.304544080 (the tiling keeps the mean)
FOCAL = 2.304544080
# Float32 softmax / log: ~1e-7 relative per value; every breakage tried moves the focal part by >= 0.9 %.
FOCAL_RTOL = 1e-5
# float32 SSIM (E[x^2] - mu^2 cancels) vs this float64 reference: <= 7e-7 measured on these cases (14x
# margin), also on the 0-255 scale ones; the breakages tried (no padding, sigma 1.0, C2 = 0.02^2) move the
# loss by >= 4e-4, and a wrong data range by >= 2e-4 (255 vs 256 on the low-contrast 0-255 scale cases; 1 vs
# 2: >= 2.0e-3).
SSIM_ATOL = 1e-5


def reference_ssim_loss(img1: np.ndarray, img2: np.ndarray, data_range: float) -> float:
    """1 - mean SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), zero padding of 5 px
    like F.conv2d(padding=5), C1 = (0.01 L)^2 and C2 = (0.03 L)^2 for the data range L, in float64; inputs C x
    H x W.

    Means, variances and the covariance are weighted sums over each pixel's 11x11 neighbourhood of the
    zero-padded images, the variances written as sum w (x - mu)^2 rather than as E[x^2] - mu^2.
    """
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(g, g) / g.sum() ** 2
    height, width = img1.shape[1:]
    pad1, pad2 = (np.pad(np.asarray(x, np.float64), ((0, 0), (5, 5), (5, 5))) for x in (img1, img2))
    # (weight, x, y) per window offset: x[:, i, j] is the neighbour (i + dy - 5, j + dx - 5) of pixel (i, j),
    # 0 outside.
    shifts = [
        (window[dy, dx], pad1[:, dy : dy + height, dx : dx + width],
         pad2[:, dy : dy + height, dx : dx + width])
        for dy in range(11)
        for dx in range(11)
    ]
    mu1 = sum(w * x for w, x, _ in shifts)
    mu2 = sum(w * y for w, _, y in shifts)
    var1 = sum(w * (x - mu1) ** 2 for w, x, _ in shifts)
    var2 = sum(w * (y - mu2) ** 2 for w, _, y in shifts)
    cov = sum(w * (x - mu1) * (y - mu2) for w, x, y in shifts)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mu1 * mu2 + c1) * (2 * cov + c2)) / ((mu1**2 + mu2**2 + c1) * (var1 + var2 + c2))
    return 1.0 - ssim.mean()


def hand_focal_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits 1x2xHxW and mask 1x1xHxW: the 2x2 hand pattern tiled over the image."""
    logits = torch.tensor([pixel for pixel, _ in HAND_PIXELS], dtype=torch.float32).T.reshape(1, 2, 2, 2)
    mask = torch.tensor([label for _, label in HAND_PIXELS]).reshape(1, 1, 2, 2)
    return logits.repeat(1, 1, HEIGHT // 2, WIDTH // 2), mask.repeat(1, 1, HEIGHT // 2, WIDTH // 2)


def image_pair(case: str) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, target), 3xHxW float32, seeded. The target is in [0, 1] or, for the 0-255 cases, in
    [120, 136]."""
    rng = np.random.default_rng(0)
    if case in ("noisy copy", "on the rule's bounds"):
        target = rng.random((3, HEIGHT, WIDTH))
        reconstruction = np.clip(target + 0.2 * rng.standard_normal(target.shape), 0, 1)
        if case == "on the rule's bounds":  # the rule's comparisons are strict: -0.5 and 128 still give L = 1
            reconstruction[0, :4, :4], reconstruction[1, -4:, -4:] = -0.5, 128.0
    elif case == "low contrast":  # small variances, where C2 and the float32 cancellation weigh most
        target = 0.4 + 0.2 * rng.random((3, HEIGHT, WIDTH))
        reconstruction = np.clip(target + 0.05 * rng.standard_normal(target.shape), 0, 1)
    elif case == "early training":
        # unclipped overshoot both ways: min -0.61, between the threshold -0.5 and -1
        target = rng.random((3, HEIGHT, WIDTH))
        reconstruction = target + 0.25 * rng.standard_normal(target.shape)
    else:  # "0-255 scale" (max 145, min 110) and "0-255 scale with a dip" (a 4x4 patch at -0.75 in channel 0)
        # Low contrast (std 4.6 and 4 grey levels) against C2 = 58.5, so that L = 255 and L = 256 differ by
        # 2e-4.
        target = 120 + 16 * rng.random((3, HEIGHT, WIDTH))
        reconstruction = target + 4 * rng.standard_normal(target.shape)
        if case == "0-255 scale with a dip":
            reconstruction[0, :4, :4] = -0.75
    return reconstruction.astype(np.float32), target.astype(np.float32)


def draem_loss(reconstruction: np.ndarray,
               target: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DraemLoss on one image pair (batch of 1) with the focal hand case."""
    return DraemLoss()(torch.from_numpy(reconstruction)[None], torch.from_numpy(target)[None],
                       *hand_focal_inputs())


# The released data range, read from the reconstruction's values (METHOD.md §4): top 255 if any > 128 else 1,
# bottom -1 if any < -0.5 else 0. The L of each case, worked out by hand from its extremes (image_pair).
DATA_RANGE_CASES = [
    ("noisy copy", 1.0),  # in [0, 1]
    ("low contrast", 1.0),  # in [0.28, 0.71]
    ("on the rule's bounds", 1.0),  # exactly -0.5 and 128
    ("early training", 2.0),  # down to -0.61
    ("0-255 scale", 255.0),  # 110 to 145
    ("0-255 scale with a dip", 256.0),  # -0.75 to 145
]


@pytest.mark.parametrize("case, data_range", DATA_RANGE_CASES)
def test_ssim_part_is_one_minus_mean_ssim_with_the_released_data_range(case, data_range):
    """The ssim part equals 1 - mean SSIM over every pixel, the zero-padded border included, with C1 and C2
    scaled by the data range the released rule reads from the reconstruction."""
    reconstruction, target = image_pair(case)
    _, parts = draem_loss(reconstruction, target)
    assert (parts["ssim"].item()
            == pytest.approx(reference_ssim_loss(reconstruction, target, data_range), abs=SSIM_ATOL))


def test_data_range_is_read_from_the_reconstruction_not_the_target():
    """Swapped, the early-training pair has the overshoot in the target: L stays 1. (Unswapped, L = 2,
    above.)"""
    overshooting, clean = image_pair("early training")
    _, parts = draem_loss(clean, overshooting)
    assert parts["ssim"].item() == pytest.approx(reference_ssim_loss(clean, overshooting, 1.0), abs=SSIM_ATOL)


def test_data_range_is_decided_anew_on_every_call_over_the_whole_batch():
    """One DraemLoss follows each call's reconstruction (nothing kept from an earlier call), and one
    overshooting image sets L = 2 for the whole batch, as the released max / min over the batch does."""
    criterion = DraemLoss()
    for case, data_range in [("early training", 2.0), ("noisy copy", 1.0), ("0-255 scale", 255.0),
                             ("early training", 2.0)]:
        reconstruction, target = image_pair(case)
        _, parts = criterion(torch.from_numpy(reconstruction)[None], torch.from_numpy(target)[None],
                             *hand_focal_inputs())
        assert parts["ssim"].item() == pytest.approx(reference_ssim_loss(reconstruction, target, data_range),
                                                     abs=SSIM_ATOL), case

    (clean_rec, clean_target), (overshoot_rec, overshoot_target) = (image_pair("noisy copy"),
                                                                    image_pair("early training"))
    logits, mask = hand_focal_inputs()
    reconstructions = torch.from_numpy(np.stack([clean_rec, overshoot_rec]))
    targets = torch.from_numpy(np.stack([clean_target, overshoot_target]))
    _, parts = criterion(reconstructions, targets, logits.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1, 1))
    # Same-sized images: the batch mean is the mean of the two per-image losses. Per-image L (1 for the clean
    # one) would move it by 1.1e-3.
    expected = (reference_ssim_loss(clean_rec, clean_target, 2.0)
                + reference_ssim_loss(overshoot_rec, overshoot_target, 2.0)) / 2
    assert parts["ssim"].item() == pytest.approx(expected, abs=SSIM_ATOL)


def test_focal_part_is_the_released_focal_loss_with_gamma_2():
    """The focal part applies softmax to the logits, then the released focal loss (gamma 2, clamped
    one-hot)."""
    reconstruction, target = image_pair("noisy copy")
    _, parts = draem_loss(reconstruction, target)
    assert parts["focal"].item() == pytest.approx(FOCAL, rel=FOCAL_RTOL)


def test_l2_part_is_the_mean_squared_error_and_the_total_is_the_sum_of_the_three_parts():
    """With the reconstruction 0.1 above the target everywhere, l2 = 0.01; total = l2 + ssim + focal,
    unweighted."""
    target = (0.9 * np.random.default_rng(0).random((3, HEIGHT, WIDTH))).astype(np.float32)
    reconstruction = target + np.float32(0.1)
    total, parts = draem_loss(reconstruction, target)
    # Float32 rounding of x + 0.1 - x is ~1e-8 per pixel.
    assert parts["l2"].item() == pytest.approx(0.01, rel=1e-5)
    expected = 0.01 + reference_ssim_loss(reconstruction, target, 1.0) + FOCAL  # in [0, 1]: L = 1
    assert total.item() == pytest.approx(expected, abs=SSIM_ATOL + FOCAL_RTOL * FOCAL)
