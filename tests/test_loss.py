"""Losses: SSIM against scikit-image, focal loss against a hand computation."""
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from loss import SSIM, DraemLoss, FocalLoss, ssim_map
from util import runtime


def test_ssim_map_matches_skimage_on_the_interior():
    rng = np.random.default_rng(0)
    a = rng.random((3, 40, 48)).astype(np.float32)
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape).astype(np.float32), 0, 1)
    ours = ssim_map(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()
    for c in range(3):
        _, reference = structural_similarity(
            a[c], b[c], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, full=True
        )
        np.testing.assert_allclose(ours[c, 5:-5, 5:-5], reference[5:-5, 5:-5], atol=1e-5)


def test_ssim_loss_is_zero_for_identical_images_and_positive_otherwise():
    x = torch.rand(2, 3, 32, 32)
    assert SSIM()(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert SSIM()(x, torch.rand(2, 3, 32, 32)).item() > 0.5


def test_ssim_accepts_bfloat16_and_computes_in_float32():
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    value = SSIM()(x.bfloat16(), y.bfloat16())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(SSIM()(x.bfloat16().float(), y.bfloat16().float()).item(), abs=1e-6)


def test_focal_with_gamma_zero_is_smoothed_nll():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 2, 8, 8), 1)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    smooth = 1e-5
    target = mask[:, 0]
    one_hot = torch.stack([1 - target, target], 1).clamp(smooth, 1 - smooth)
    expected = -torch.log((one_hot * probs).sum(1) + smooth).mean()
    assert FocalLoss(gamma=0)(probs, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_down_weights_easy_pixels():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    confident = torch.cat([1 - mask, mask], 1).clamp(1e-6, 1 - 1e-6)
    assert FocalLoss()(confident, mask).item() < 1e-8
    uncertain = torch.full((1, 2, 4, 4), 0.5)
    assert FocalLoss()(uncertain, mask).item() == pytest.approx(0.25 * np.log(2), rel=1e-3)


def test_focal_gradients_are_finite_even_for_saturated_probabilities():
    logits = torch.tensor([[[[50.0]], [[-50.0]]]], requires_grad=True)
    loss = FocalLoss()(torch.softmax(logits, 1), torch.ones(1, 1, 1, 1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_sspcab_adds_lambda_times_the_blocks_mse_to_the_total():
    """SSPCAB block input 0 and output 0.5 everywhere: MSE 0.25, so the part is 0.25 * lambda (0.125 at 0.5,
    0.025 at the default 0.1, METHOD.md §4) and the total grows by exactly that over the same loss without
    SSPCAB."""
    torch.manual_seed(0)
    rec, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    logits, mask = torch.randn(2, 2, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    io = (torch.zeros(2, 4, 2, 2), torch.full((2, 4, 2, 2), 0.5))
    without, plain_parts = DraemLoss(sspcab_lambda=0.5)(rec, target, logits, mask)
    total, parts = DraemLoss(sspcab_lambda=0.5)(rec, target, logits, mask, io)
    assert set(plain_parts) == {"l2", "ssim", "focal"} and set(parts) == {"l2", "ssim", "focal", "sspcab"}
    assert parts["sspcab"].item() == 0.125  # 0.5 * 0.25, exact in float32
    assert (total - without).item() == pytest.approx(0.125, abs=1e-6)  # float32 sums of terms near 1: ~1e-7
    _, default_parts = DraemLoss()(rec, target, logits, mask, io)
    assert default_parts["sspcab"].item() == pytest.approx(0.025, rel=1e-6)
    for name in ("l2", "ssim", "focal"):  # SSPCAB changes no other part
        assert parts[name].item() == plain_parts[name].item(), name


def overshooting_pair() -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, target), 3x40x48: the reconstruction overshoots to -0.83 and 1.83, as early in
    training (rule: L = 2)."""
    rng = np.random.default_rng(1)
    target = rng.random((3, 40, 48)).astype(np.float32)
    return target + 0.25 * rng.standard_normal(target.shape).astype(np.float32), target


@pytest.mark.parametrize("data_range, skimage_range", [(None, 2.0), (1.0, 1.0), (2.0, 2.0), (255.0, 255.0)])
def test_ssim_map_applies_the_released_range_rule_unless_a_range_is_given(data_range, skimage_range):
    """Default (None): the released rule, L = 2 for this reconstruction; a number fixes L whatever the
    values."""
    a, b = overshooting_pair()
    ours = ssim_map(torch.from_numpy(a)[None], torch.from_numpy(b)[None], data_range=data_range)[0].numpy()
    for c in range(3):
        _, reference = structural_similarity(
            a[c], b[c], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=skimage_range, full=True
        )
        # Measured <= 3.8e-6 (float32 cancellation); the wrong range (1 vs 2) is off by 9e-3, 255 vs 256 by
        # 3.5e-5.
        np.testing.assert_allclose(ours[c, 5:-5, 5:-5], reference[5:-5, 5:-5], atol=1e-5)


def test_ssim_range_rule_stays_on_the_device_and_in_autograd():
    """The rule traces into one graph (fullgraph fails on `.item()` or a Python `if` on a tensor, i.e. a host
    sync on GPU), and the loss still back-propagates to the reconstruction."""
    a, b = (torch.from_numpy(x)[None] for x in overshooting_pair())
    compiled = torch.compile(SSIM(), fullgraph=True, backend="eager")
    assert compiled(a, b).item() == pytest.approx(SSIM()(a, b).item(), abs=1e-6)
    reconstruction = a.clone().requires_grad_()
    SSIM()(reconstruction, b).backward()
    assert torch.isfinite(reconstruction.grad).all() and reconstruction.grad.abs().sum() > 0


def test_an_ssim_loss_computed_under_inference_mode_first_still_trains_afterwards():
    """The SSIM window is made once per device and reused: when the first call comes from an evaluation
    under torch.inference_mode, the cached window must not be an inference tensor, which autograd refuses
    to save for a later training step's backward."""
    runtime._made_once.cache_clear()  # this test's call makes the CPU's window
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        SSIM()(image, image.flip(-1))
    reconstruction = image.flip(-1).clone().requires_grad_()
    SSIM()(reconstruction, image).backward()
    assert reconstruction.grad is not None and reconstruction.grad.abs().sum() > 0
