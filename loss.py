"""DRAEM's losses (METHOD.md §4): L2 + SSIM for the reconstruction, focal loss for the segmentation.

Call signatures follow the released code so users' scripts port unchanged: `SSIM()(a, b)` returns
the loss `1 − SSIM`, and `FocalLoss()(probabilities, mask)` takes the softmax output. Statistics are
computed in float32 whatever the input dtype (bf16 autocast included).
"""
import torch
import torch.nn.functional as F
from torch import nn

from util.runtime import device_constant


def gaussian_window(window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel (window_size × window_size), float32."""
    coords = torch.arange(window_size, dtype=torch.float32) - window_size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _window_on(window_size: int, sigma: float, device: torch.device) -> torch.Tensor:
    return gaussian_window(window_size, sigma).to(device)


def released_data_range(reconstruction: torch.Tensor) -> torch.Tensor:
    """The data range L of the released SSIM loss, decided from the reconstruction's values (METHOD.md §4).

    Top 255 if any value exceeds 128, else 1; bottom −1 if any value is below −0.5, else 0; L = top − bottom,
    so 1, 2, 255 or 256. Returns a 0-d float32 tensor on the reconstruction's device: `torch.where` keeps the
    decision there, where a Python `if` would need `.item()` and stall the GPU on every step. L is piecewise
    constant in the data (zero gradient), so the decision reads detached values.
    """
    low, high = torch.aminmax(reconstruction.detach())
    top = torch.where(high > 128, 255.0, 1.0)
    bottom = torch.where(low < -0.5, -1.0, 0.0)
    return top - bottom


def ssim_map(
    img1: torch.Tensor, img2: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
    data_range: float | None = None
) -> torch.Tensor:
    """Per-pixel, per-channel SSIM (N×C×H×W) with a Gaussian window and zero padding, as released.

    `data_range=None` applies the released rule on every call, to `img1` (the reconstruction) only:
    see `released_data_range`. A number fixes L instead. C1 = (0.01·L)², C2 = (0.03·L)².
    """
    img1, img2 = img1.float(), img2.float()
    channels = img1.shape[1]
    # made once per device (util.runtime.device_constant); the convolution never writes it
    window = device_constant(_window_on, window_size, sigma, img1.device).expand(channels, 1, window_size,
                                                                                window_size)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, padding=window_size // 2, groups=channels)

    mu1, mu2 = filt(img1), filt(img2)
    var1 = filt(img1 * img1) - mu1**2
    var2 = filt(img2 * img2) - mu2**2
    cov = filt(img1 * img2) - mu1 * mu2
    if data_range is None:
        data_range = released_data_range(img1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu1 * mu2 + c1) * (2 * cov + c2)) / ((mu1**2 + mu2**2 + c1) * (var1 + var2 + c2))


class SSIM(nn.Module):
    """SSIM loss: `1 − mean SSIM` over all pixels and channels (window 11, sigma 1.5), METHOD.md §4.

    The data range follows the released rule by default (`data_range=None`): L is recomputed on every call
    from the first argument, the reconstruction (1 for values in [−0.5, 128], 2 once any is below −0.5, as
    early in training, 255 or 256 once any exceeds 128). Pass a number to fix L.
    """

    def __init__(self, window_size: int = 11, sigma: float = 1.5, data_range: float | None = None):
        super().__init__()
        self.window_size, self.sigma, self.data_range = window_size, sigma, data_range

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        return 1.0 - ssim_map(img1, img2, self.window_size, self.sigma, self.data_range).mean()


class FocalLoss(nn.Module):
    """Focal loss on class probabilities with label smoothing by clamping, as released.

    `probabilities` is N×C×H×W (the softmax output), `target` N×1×H×W holding class indices (the float
    anomaly mask for DRAEM). Alpha is 1 for every class, so it is left out.
    """

    def __init__(self, gamma: float = 2.0, smooth: float = 1e-5):
        super().__init__()
        self.gamma, self.smooth = gamma, smooth

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probabilities = probabilities.float()
        num_classes = probabilities.shape[1]
        one_hot = F.one_hot(target[:, 0].long(), num_classes).permute(0, 3, 1, 2).to(probabilities.dtype)
        one_hot = one_hot.clamp(self.smooth / (num_classes - 1), 1.0 - self.smooth)
        pt = (one_hot * probabilities).sum(dim=1) + self.smooth
        return (-((1 - pt) ** self.gamma) * pt.log()).mean()


def sspcab_loss(io: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """MSE between the SSPCAB block's input and output (its self-supervised reconstruction task)."""
    block_input, block_output = io
    return F.mse_loss(block_output.float(), block_input.float())


class DraemLoss(nn.Module):
    """Total DRAEM loss `L2 + SSIM + focal` (+ `lambda · SSPCAB` when given); returns it and its parts.

    The SSIM term uses the released data-range rule, evaluated on the reconstruction at every call (see
    `SSIM`).
    """

    def __init__(self, sspcab_lambda: float = 0.1):
        super().__init__()
        self.ssim, self.focal, self.sspcab_lambda = SSIM(), FocalLoss(), sspcab_lambda

    def forward(
        self,
        reconstruction: torch.Tensor,
        target: torch.Tensor,
        logits: torch.Tensor,
        mask: torch.Tensor,
        sspcab_io: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {
            "l2": F.mse_loss(reconstruction.float(), target.float()),
            "ssim": self.ssim(reconstruction, target),
            "focal": self.focal(torch.softmax(logits.float(), dim=1), mask),
        }
        if sspcab_io is not None:
            parts["sspcab"] = self.sspcab_lambda * sspcab_loss(sspcab_io)
        total = sum(parts.values())
        # Detached parts, not floats: calling .item() here would stall the GPU every step.
        return total, {name: value.detach() for name, value in parts.items()}
