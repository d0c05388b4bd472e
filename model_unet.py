"""DRAEM's two subnetworks (METHOD.md §3), with the state-dict keys of the authors' released checkpoints.

Every layer name below is load-bearing: `ReconstructiveSubNetwork().state_dict()` and
`DiscriminativeSubNetwork().state_dict()` must equal the released `.pckl` files key for key, in order
(see tests/data/draem_state_dict_manifest.json). Max-pool layers have no parameters, so
they may be plain modules without disturbing the keys.
"""
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from util.checkpoints import load_checkpoint_pair, read_checkpoint_pair
from util.errors import DraemInputError
from util.images import image_shape, shape_text
from util.runtime import device_constant


def conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    """3×3 conv (padding 1, bias), BatchNorm, ReLU: the unit every DRAEM layer is made of."""
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


def block(in_ch: int, out_ch: int, mid_ch: int | None = None) -> nn.Sequential:
    """conv-BN-ReLU twice (Sequential indices 0..5); `mid_ch` defaults to `out_ch`."""
    mid_ch = out_ch if mid_ch is None else mid_ch
    return nn.Sequential(*conv_bn_relu(in_ch, mid_ch), *conv_bn_relu(mid_ch, out_ch))


def up(in_ch: int, out_ch: int) -> nn.Sequential:
    """Bilinear ×2 upsampling (align_corners=True) then conv-BN-ReLU (Sequential indices 0..3)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         *conv_bn_relu(in_ch, out_ch))


def interpolation_matrix(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """(size_out, size_in) float32 weights of linear interpolation with align_corners=True, as nn.Upsample
    uses: output i samples input position i·(size_in − 1)/(size_out − 1), weight 1 − t on its left neighbour
    and t on its right one. Built on `device` from arange (no host-to-device copy), in float64, rounded
    once."""
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    position = torch.arange(size_out, device=device, dtype=torch.float64) * scale
    left = position.floor().clamp(max=size_in - 1)
    right = (left + 1).clamp(max=size_in - 1)
    t = (position - left)[:, None]
    columns = torch.arange(size_in, device=device, dtype=torch.float64)
    return ((1 - t) * (columns == left[:, None]) + t * (columns == right[:, None])).float()


class MatrixUpsample(nn.Module):
    """Bilinear upsampling with align_corners=True written as two matrix products, rows @ x @ columnsᵀ: the
    same math as nn.Upsample (equal to float rounding), but its backward is matrix products too,
    deterministic on CUDA, where nn.Upsample's backward adds into the input gradient with atomics in no fixed
    order. Computed in float32 also under autocast, as nn.Upsample computes. No parameters or buffers, so the
    state-dict keys do not change."""

    def __init__(self, scale_factor: int = 2):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # made once per size and device (util.runtime.device_constant), not in every step's forward
        rows = device_constant(interpolation_matrix, height, height * self.scale_factor, x.device)
        columns = device_constant(interpolation_matrix, width, width * self.scale_factor, x.device)
        with torch.autocast(x.device.type, enabled=False):
            return (rows @ (x.float() @ columns.T)).to(x.dtype)


def deterministic_upsampling(model: nn.Module) -> nn.Module:
    """Replace, in place, every bilinear align_corners nn.Upsample of `model` by the equivalent MatrixUpsample
    (--deterministic training); returns `model`. The module tree and the state-dict keys stay as they were."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Upsample) and child.mode == "bilinear" and child.align_corners:
                setattr(parent, name, MatrixUpsample(int(child.scale_factor)))
    return model


def out_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """The final 3×3 conv, wrapped in a Sequential because the released keys are `fin_out.0.*`."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))


def check_divisible(x: torch.Tensor, factor: int) -> None:
    """The U-Nets pool `log2(factor)` times; other sizes would break the skip concatenations."""
    height, width = x.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by {factor}; resize inputs to a multiple of "
            f"{factor} (e.g. --image_size 256)"
        )


def check_image_size(image_size: int | Sequence[int]) -> None:
    """A --image_size flag (one side, or height and width): the discriminative U-Net pools five times, so each
    side a positive multiple of 32."""
    sides = image_shape(image_size)
    if any(side < 32 or side % 32 for side in sides):
        raise DraemInputError(f"--image_size must be a positive multiple of 32 per side (e.g. 256, or 256 "
                              f"384 for height and width), got {shape_text(sides)}")


class SSPCAB(nn.Module):
    """Self-supervised predictive convolutional attentive block (Ristea et al., CVPR 2022).

    A masked convolution sees only the four k×k corner patches around each pixel, `dilation` pixels
    away from it (the centre is hidden), so the block must predict the hidden centre from context; a
    squeeze-and-excite step then reweights channels. Input and output have the same shape; the
    training loss adds `lambda · MSE(input, output)`.
    """

    def __init__(self, channels: int, kernel_dim: int = 1, dilation: int = 1, reduction_ratio: int = 8):
        super().__init__()
        self.pad = kernel_dim + dilation
        # Offset between the top-left and bottom-right corner patches in the padded input.
        self.border = kernel_dim + 2 * dilation + 1
        self.corners = nn.ModuleList(nn.Conv2d(channels, channels, kernel_dim) for _ in range(4))
        hidden = max(channels // reduction_ratio, 1)
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def masked_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of four k×k convolutions over the corner patches; the centre stays unseen."""
        padded = F.pad(x, (self.pad,) * 4)
        b = self.border
        patches = (padded[..., :-b, :-b], padded[..., :-b, b:], padded[..., b:, :-b], padded[..., b:, b:])
        return F.relu(sum(conv(p) for conv, p in zip(self.corners, patches)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.masked_conv(x)
        weights = torch.sigmoid(self.excite(F.relu(self.squeeze(context.mean(dim=(2, 3))))))
        return context * weights[:, :, None, None]


class EncoderReconstructive(nn.Module):
    """Five blocks, 3→w→2w→4w→8w→8w, with a max-pool before blocks 2..5; no skip connections."""

    def __init__(self, in_channels: int, base_width: int, sspcab: bool = False):
        super().__init__()
        w = base_width
        self.block1 = block(in_channels, w)
        self.block2 = block(w, 2 * w)
        self.block3 = block(2 * w, 4 * w)
        self.block4 = block(4 * w, 8 * w)
        self.block5 = SSPCAB(8 * w) if sspcab else block(8 * w, 8 * w)
        self.pool = nn.MaxPool2d(2)
        # Input and output of block5, kept from the last forward when SSPCAB is on: its loss needs both.
        self.sspcab_io: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        x = self.block2(self.pool(x))
        x = self.block3(self.pool(x))
        x = self.block4(self.pool(x))
        x = self.pool(x)
        out = self.block5(x)
        if isinstance(self.block5, SSPCAB):
            self.sspcab_io = (x, out)
        return out


class DecoderReconstructive(nn.Module):
    """Four (up, block) stages 8w→8w→4w, 4w→4w→2w, 2w→2w→w, w→w→w, then a 3×3 conv to the output."""

    def __init__(self, base_width: int, out_channels: int):
        super().__init__()
        w = base_width
        self.up1, self.db1 = up(8 * w, 8 * w), block(8 * w, 4 * w, mid_ch=8 * w)
        self.up2, self.db2 = up(4 * w, 4 * w), block(4 * w, 2 * w, mid_ch=4 * w)
        self.up3, self.db3 = up(2 * w, 2 * w), block(2 * w, w, mid_ch=2 * w)
        self.up4, self.db4 = up(w, w), block(w, w)
        self.fin_out = out_conv(w, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up_layer, block_layer in ((self.up1, self.db1), (self.up2, self.db2), (self.up3, self.db3),
                                      (self.up4, self.db4)):
            x = block_layer(up_layer(x))
        return self.fin_out(x)


class ReconstructiveSubNetwork(nn.Module):
    """Autoencoder trained to remove simulated anomalies (69,048,579 parameters at base_width 128)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128,
                 sspcab: bool = False):
        super().__init__()
        self.encoder = EncoderReconstructive(in_channels, base_width, sspcab=sspcab)
        self.decoder = DecoderReconstructive(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x, 16)
        return self.decoder(self.encoder(x))


class EncoderDiscriminative(nn.Module):
    """Six blocks, in→w→2w→4w→8w→8w→8w, with five max-pools; returns every block's output for the skips."""

    def __init__(self, in_channels: int, base_width: int):
        super().__init__()
        w = base_width
        self.block1 = block(in_channels, w)
        self.block2 = block(w, 2 * w)
        self.block3 = block(2 * w, 4 * w)
        self.block4 = block(4 * w, 8 * w)
        self.block5 = block(8 * w, 8 * w)
        self.block6 = block(8 * w, 8 * w)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.block1(x)]
        for layer in (self.block2, self.block3, self.block4, self.block5, self.block6):
            features.append(layer(self.pool(features[-1])))
        return features


class DecoderDiscriminative(nn.Module):
    """U-Net decoder: each stage upsamples, concatenates the encoder block of that scale, and convolves."""

    def __init__(self, base_width: int, out_channels: int):
        super().__init__()
        w = base_width
        self.up_b, self.db_b = up(8 * w, 8 * w), block(16 * w, 8 * w)
        self.up1, self.db1 = up(8 * w, 4 * w), block(12 * w, 4 * w)
        self.up2, self.db2 = up(4 * w, 2 * w), block(6 * w, 2 * w)
        self.up3, self.db3 = up(2 * w, w), block(3 * w, w)
        self.up4, self.db4 = up(w, w), block(2 * w, w)
        self.fin_out = out_conv(w, out_channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        *skips, x = features
        stages = ((self.up_b, self.db_b), (self.up1, self.db1), (self.up2, self.db2), (self.up3, self.db3),
                  (self.up4, self.db4))
        for (up_layer, block_layer), skip in zip(stages, reversed(skips)):
            x = block_layer(torch.cat((up_layer(x), skip), dim=1))
        return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
    """Segmentation U-Net on cat(reconstruction, image) (28,374,146 parameters at base_width 64)."""

    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_width: int = 64):
        super().__init__()
        self.encoder_segment = EncoderDiscriminative(in_channels, base_width)
        self.decoder_segment = DecoderDiscriminative(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x, 32)
        return self.decoder_segment(self.encoder_segment(x))


def weights_init(module: nn.Module) -> None:
    """The released initialisation: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def anomaly_map(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel anomaly probability N×1×H×W: softmax channel 1 of the discriminative output."""
    return torch.softmax(logits.float(), dim=1)[:, 1:2]


class DraemModel(nn.Module):
    """Both subnetworks; attribute names match anomalib's, so its checkpoints map by a prefix strip (plus a
    channel reordering for its RGB input, see checkpoints.anomalib_to_released)."""

    def __init__(self, base_width: int = 128, seg_base_width: int = 64, sspcab: bool = False):
        super().__init__()
        self.reconstructive_subnetwork = ReconstructiveSubNetwork(3, 3, base_width=base_width, sspcab=sspcab)
        self.discriminative_subnetwork = DiscriminativeSubNetwork(6, 2, base_width=seg_base_width)
        self.apply(weights_init)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (reconstruction N×3×H×W, segmentation logits N×2×H×W)."""
        check_divisible(image, 32)
        reconstruction = self.reconstructive_subnetwork(image)
        # Order matters: the released discriminative network was trained on cat(reconstruction, image).
        logits = self.discriminative_subnetwork(torch.cat((reconstruction, image), dim=1))
        return reconstruction, logits

    @property
    def sspcab_io(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(input, output) of the SSPCAB block from the last forward, or None without SSPCAB."""
        return self.reconstructive_subnetwork.encoder.sspcab_io


def model_from_checkpoint(checkpoint_dir: str | os.PathLike, base_name: str, category: str) -> DraemModel:
    """A DraemModel with the widths and SSPCAB option read off a category's checkpoint pair, loaded from
    it."""
    pair = read_checkpoint_pair(checkpoint_dir, base_name, category)
    model = DraemModel(**pair.config)
    load_checkpoint_pair(model, pair)
    return model
