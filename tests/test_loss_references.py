"""The parts of the training loss (DraemLoss: l2, ssim, focal) against references written here from the released method."""
import numpy as np
import pytest
import torch
from test_synthesis_gpu import one_thread  # noqa: F401  (an autouse fixture: these tests run on one thread too)

from loss import DraemLoss

# Images small enough that the zero-padded border (5 px each side) is 70 % of the pixels.
HEIGHT, WIDTH = 20, 24
# The focal hand case, a 2x2 pattern tiled over the image: per pixel (row-major), logits (class 0, class 1), mask.
# softmax(0, 0) = (0.5, 0.5); softmax(0, ln 3) = (0.25, 0.75); softmax(ln 9, 0) = (0.9, 0.1);
# softmax(ln 9999, 0) = (0.9999, 0.0001): a confidently wrong pixel, where the clamp's smoothing matters.
HAND_PIXELS = [((0.0, 0.0), 0.0), ((0.0, np.log(3.0)), 1.0), ((np.log(9.0), 0.0), 0.0), ((np.log(9999.0), 0.0), 1.0)]
# The released focal loss (gamma 2, smooth 1e-5): one-hot clamped to [1e-5, 1 - 1e-5], pt = sum(one_hot * p) + 1e-5
# = q + 2e-5 (1 - q) for target-class probability q, loss = mean(-(1 - pt)^2 ln pt). By hand (float64):
#   mask 0, q = 0.5:    pt = 0.50001,     0.49999^2   * 0.693127181 = 0.173274864
#   mask 1, q = 0.75:   pt = 0.750005,    0.249995^2  * 0.287675406 = 0.017978994
#   mask 0, q = 0.9:    pt = 0.900002,    0.099998^2  * 0.105358293 = 0.001053541
#   mask 1, q = 0.0001: pt = 0.000119998, 0.999880^2  * 9.028035482 = 9.025868920
#   mean = 2.304544080 (the tiling keeps the mean)
FOCAL = 2.304544080
# Float32 softmax / log: ~1e-7 relative per value; every breakage tried moves the focal part by >= 0.9 %.
FOCAL_RTOL = 1e-5
# float32 SSIM (E[x^2] - mu^2 cancels) vs this float64 reference: <= 7e-7 measured on these cases (14x margin); the
# breakages tried (no padding, sigma 1.0, C2 = 0.02^2) move the loss by >= 4e-4.
SSIM_ATOL = 1e-5


def reference_ssim_loss(img1: np.ndarray, img2: np.ndarray) -> float:
    """1 - mean SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), zero padding of 5 px
    like F.conv2d(padding=5), C1 = 0.01^2 and C2 = 0.03^2 (data range 1), in float64; inputs C x H x W.

    Means, variances and the covariance are weighted sums over each pixel's 11x11 neighbourhood of the
    zero-padded images, the variances written as sum w (x - mu)^2 rather than as E[x^2] - mu^2.
    """
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(g, g) / g.sum() ** 2
    height, width = img1.shape[1:]
    pad1, pad2 = (np.pad(np.asarray(x, np.float64), ((0, 0), (5, 5), (5, 5))) for x in (img1, img2))
    # (weight, x, y) per window offset: x[:, i, j] is the neighbour (i + dy - 5, j + dx - 5) of pixel (i, j), 0 outside.
    shifts = [
        (window[dy, dx], pad1[:, dy : dy + height, dx : dx + width], pad2[:, dy : dy + height, dx : dx + width])
        for dy in range(11)
        for dx in range(11)
    ]
    mu1 = sum(w * x for w, x, _ in shifts)
    mu2 = sum(w * y for w, _, y in shifts)
    var1 = sum(w * (x - mu1) ** 2 for w, x, _ in shifts)
    var2 = sum(w * (y - mu2) ** 2 for w, _, y in shifts)
    cov = sum(w * (x - mu1) * (y - mu2) for w, x, y in shifts)
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu1 * mu2 + c1) * (2 * cov + c2)) / ((mu1**2 + mu2**2 + c1) * (var1 + var2 + c2))
    return 1.0 - ssim.mean()


def hand_focal_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits 1x2xHxW and mask 1x1xHxW: the 2x2 hand pattern tiled over the image."""
    logits = torch.tensor([pixel for pixel, _ in HAND_PIXELS], dtype=torch.float32).T.reshape(1, 2, 2, 2)
    mask = torch.tensor([label for _, label in HAND_PIXELS]).reshape(1, 1, 2, 2)
    return logits.repeat(1, 1, HEIGHT // 2, WIDTH // 2), mask.repeat(1, 1, HEIGHT // 2, WIDTH // 2)


def image_pair(case: str) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, target), 3xHxW float32 in [0, 1], seeded."""
    rng = np.random.default_rng(0)
    if case == "noisy copy":
        target = rng.random((3, HEIGHT, WIDTH))
        noise = 0.2
    else:  # "low contrast": small variances, where C2 and the float32 cancellation weigh most
        target = 0.4 + 0.2 * rng.random((3, HEIGHT, WIDTH))
        noise = 0.05
    reconstruction = np.clip(target + noise * rng.standard_normal(target.shape), 0, 1)
    return reconstruction.astype(np.float32), target.astype(np.float32)


def draem_loss(reconstruction: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DraemLoss on one image pair (batch of 1) with the focal hand case."""
    return DraemLoss()(torch.from_numpy(reconstruction)[None], torch.from_numpy(target)[None], *hand_focal_inputs())


@pytest.mark.parametrize("case", ["noisy copy", "low contrast"])
def test_ssim_part_is_one_minus_mean_ssim_with_a_zero_padded_gaussian_window(case):
    """The ssim part equals 1 - mean SSIM over every pixel, the zero-padded border included."""
    reconstruction, target = image_pair(case)
    _, parts = draem_loss(reconstruction, target)
    assert parts["ssim"].item() == pytest.approx(reference_ssim_loss(reconstruction, target), abs=SSIM_ATOL)


def test_focal_part_is_the_released_focal_loss_with_gamma_2():
    """The focal part applies softmax to the logits, then the released focal loss (gamma 2, clamped one-hot)."""
    reconstruction, target = image_pair("noisy copy")
    _, parts = draem_loss(reconstruction, target)
    assert parts["focal"].item() == pytest.approx(FOCAL, rel=FOCAL_RTOL)


def test_l2_part_is_the_mean_squared_error_and_the_total_is_the_sum_of_the_three_parts():
    """With the reconstruction 0.1 above the target everywhere, l2 = 0.01; total = l2 + ssim + focal, unweighted."""
    target = (0.9 * np.random.default_rng(0).random((3, HEIGHT, WIDTH))).astype(np.float32)
    reconstruction = target + np.float32(0.1)
    total, parts = draem_loss(reconstruction, target)
    # Float32 rounding of x + 0.1 - x is ~1e-8 per pixel.
    assert parts["l2"].item() == pytest.approx(0.01, rel=1e-5)
    expected = 0.01 + reference_ssim_loss(reconstruction, target) + FOCAL
    assert total.item() == pytest.approx(expected, abs=SSIM_ATOL + FOCAL_RTOL * FOCAL)
