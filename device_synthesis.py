"""Training-sample synthesis (METHOD.md §2) batched on the training device: the `--synthesis gpu` path.

The DataLoader only hands over decoded uint8 training images and anomaly sources (`TrainImageDataset`);
`synthesize_batch` then does on the device, for the whole batch at once and with per-sample random
parameters from one seedable `torch.Generator`: the 30 % image rotation, the 3 distinct source
augmentations in drawn order, the Perlin masks, the beta blend and the 50 % normal split. Its output
is the batch the CPU path (`data_loader.TrainDataset`) would have collated, from the same
distributions.

Sync-free by design: every augmentation runs on the whole batch and each sample keeps the result of
the one it drew (`torch.where`/gather, never boolean indexing), so the host never waits for the
device and shapes never depend on data. Ten times the work of a per-sample dispatch, but the
operations are elementwise passes over a few MB, small next to one training step.

Each operation mirrors its `augment.py` counterpart on uint8 values (BGR arrays treated as RGB, the
released quirk, kept) and gives the same bytes, with these exceptions. Two differ by at most one level
on rare pixels: rotations (source rotation, the 30 % image rotation) interpolate in float32 with
`grid_sample` where `cv2.warpAffine` uses fixed-point weights, and the hue/saturation round trip's
float32 HSV -> RGB step may round differently from OpenCV's vectorised code. Brightness in its Lab and
Luv colour spaces is a float equivalent of OpenCV's table-based code (measured next to `brightness`).
The training image and anomaly source of each item are drawn uniformly at random by the loader, as on
the CPU path (the dataset index is ignored).
"""
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from augment import AUGMENTATIONS_PER_SOURCE, RANGES, rotate_maps
from data_loader import (
    ANOMALY_PROBABILITY,
    IMAGE_ROTATION_DEGREES,
    MAX_BETA,
    ROTATE_IMAGE_PROBABILITY,
    blend_anomaly,
)
from perlin import perlin_mask_batch
from util.images import to_float as cpu_to_float
from util.runtime import device_constant

YCRCB_SHIFT = 14  # OpenCV's fixed-point RGB <-> YCrCb for uint8: coefficients scaled by 2**14
HSV_SHIFT = 12  # OpenCV's fixed-point RGB -> HSV for uint8


def _uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """float32 uniform in [low, high) from `generator` (which must live on `device`)."""
    return torch.empty(shape, device=device).uniform_(low, high, generator=generator)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """(N,) or (N, C) parameters shaped to broadcast against an N×C×H×W batch."""
    return values.reshape(values.shape[0], -1, 1, 1)


def _descale(x: torch.Tensor, shift: int) -> torch.Tensor:
    """OpenCV's CV_DESCALE: fixed-point value rounded half up and shifted back (arithmetic shift for
    negatives)."""
    return (x + (1 << (shift - 1))) >> shift


def gamma_contrast(images: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """255 * (x / 255) ** gamma with gammas (N, 3), one per sample and channel, converted like torchvision."""
    scaled = TF.to_dtype(images, torch.float32, scale=True).pow_(_per_sample(gammas))
    return TF.to_dtype(scaled, torch.uint8, scale=True)


# OpenCV's integer RGB <-> luma-chroma conversions (YCrCb and YUV differ only in their coefficients): Y from
# fixed weights, each chroma a scaled difference (colour - Y) + 128; back, each colour is Y plus weighted
# chromas.
LUMA_WEIGHTS = (4899, 9617, 1868)  # R, G, B, scaled by 2**YCRCB_SHIFT
YCRCB = {"chroma": ((0, 11682), (2, 9241)),
         "inverse": (((0, 22987),), ((0, -11698), (1, -5636)), ((1, 29049),))}
YUV = {"chroma": ((2, 8061), (0, 14369)), "inverse": (((1, 18678),), ((0, -6472), (1, -9519)), ((0, 33292),))}


def _rgb_to_luma_chroma(images: torch.Tensor, table: dict) -> torch.Tensor:
    """OpenCV's integer RGB -> Y + two chromas on uint8, bit exact; int32 N×3×H×W. `table`: YCRCB or YUV."""
    rgb = images.int().unbind(1)
    y = _descale(sum(c * w for c, w in zip(rgb, LUMA_WEIGHTS)), YCRCB_SHIFT)
    chromas = [_descale((rgb[c] - y) * k + (128 << YCRCB_SHIFT), YCRCB_SHIFT).clamp(0, 255)
               for c, k in table["chroma"]]
    return torch.stack((y, *chromas), dim=1)


def _luma_chroma_to_rgb(values: torch.Tensor, table: dict) -> torch.Tensor:
    """OpenCV's integer Y + two chromas -> RGB on uint8 values (int32 in, uint8 out), bit exact."""
    y, *chromas = values.unbind(1)
    chromas = [c - 128 for c in chromas]
    rgb = [y + _descale(sum(chromas[i] * k for i, k in terms), YCRCB_SHIFT) for terms in table["inverse"]]
    return torch.stack(rgb, dim=1).clamp(0, 255).to(torch.uint8)


def rgb_to_ycrcb(images: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2YCrCb on uint8, bit exact (its integer coefficients); int32 N×3×H×W."""
    return _rgb_to_luma_chroma(images, YCRCB)


def ycrcb_to_rgb(ycrcb: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_YCrCb2RGB on uint8 values (int32 in, uint8 out), bit exact."""
    return _luma_chroma_to_rgb(ycrcb, YCRCB)


def sharpness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """PIL-style sharpness with one factor per sample (N,), computed as torchvision's adjust_sharpness.

    The smoothed image, torchvision's float convolution with weights 1/13 (centre 5/13) rounded, is
    round(n / 13) for the integer n = 3×3 sum + 4 × centre. n / 13 is never a tie (n + 6.5 is no multiple
    of 13), and the float sum is off by less than 1e-3, so computing it as (n + 6) // 13 in integers gives
    the same bytes on every device, where a convolution would depend on the backend (TF32 on GPUs).
    """
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    height, width = images.shape[-2:]
    values = images.int()
    centre = values[..., 1:-1, 1:-1]
    total = 4 * centre
    for dy in range(3):
        for dx in range(3):
            total = total + values[..., dy : dy + height - 2, dx : dx + width - 2]
    degenerate = ((total + 6) // 13).float()
    output = images.float()
    inner = output[..., 1:-1, 1:-1]
    # Border pixels keep their value, as in PIL and torchvision.
    inner.add_((1.0 - _per_sample(factors)) * (degenerate - inner))
    return output.clamp_(0, 255).to(torch.uint8)


def rgb_to_hsv(images: torch.Tensor, hue_range: int = 180) -> torch.Tensor:
    """OpenCV's COLOR_RGB2HSV on uint8 (hue 0..179; hue_range 256: COLOR_RGB2HSV_FULL), bit exact; int32
    N×3×H×W."""
    r, g, b = images.int().unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    diff = value - torch.minimum(torch.minimum(r, g), b)
    index = torch.arange(256, device=images.device, dtype=torch.float64).clamp(min=1)
    # OpenCV's division tables, rounded as saturate_cast does; entry 0 is 0. (A true division: torch's
    # `number / tensor` multiplies by the reciprocal, which is not always the correctly rounded quotient.)
    sat_table = torch.full_like(index, 255 << HSV_SHIFT).div(index).round().int()
    hue_table = torch.full_like(index, hue_range << HSV_SHIFT).div(6 * index).round().int()
    sat_table[0] = hue_table[0] = 0
    saturation = _descale(diff * sat_table[value], HSV_SHIFT)
    hue = torch.where(value == r, g - b, torch.where(value == g, b - r + 2 * diff, r - g + 4 * diff))
    hue = _descale(hue * hue_table[diff], HSV_SHIFT)
    hue = torch.where(hue < 0, hue + hue_range, hue)
    return torch.stack((hue, saturation, value), dim=1)


def rgb_to_hsv_full(images: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2HSV_FULL on uint8 (hue 0..255 for the full circle), bit exact; int32 N×3×H×W."""
    return rgb_to_hsv(images, 256)


def hsv_full_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_HSV2RGB_FULL on uint8 values (int32 in, uint8 out), computed in float32 like OpenCV.

    OpenCV's inverse takes the 8-bit full hue circle as 255 steps (the forward one as 256): kept, so
    a round trip moves hues exactly as on the CPU path.
    """
    hue = hsv[:, 0].float() * (torch.tensor(6.0) / 255.0).item()
    saturation, value = hsv[:, 1].float() * (1.0 / 255.0), hsv[:, 2].float() * (1.0 / 255.0)
    sector = hue.floor()
    frac = hue - sector
    tab = torch.stack((value, value * (1 - saturation), value * (1 - saturation * frac),
                       value * (1 - saturation * (1 - frac))))
    rgb = _pick_by_sector(tab, sector)
    rgb = torch.where((saturation == 0)[:, None], value[:, None].expand_as(rgb), rgb)
    return (rgb * 255).round().clamp(0, 255).to(torch.uint8)


def hue_saturation(images: torch.Tensor, hue_shifts: torch.Tensor,
                   saturation_shifts: torch.Tensor) -> torch.Tensor:
    """Add an integer hue shift (0..255 full circle, wrapping) and saturation shift (clipped) per sample
    (N,)."""
    hue, saturation, value = rgb_to_hsv_full(images).unbind(1)
    hue = (hue + hue_shifts.view(-1, 1, 1)) % 256
    saturation = (saturation + saturation_shifts.view(-1, 1, 1)).clamp(0, 255)
    return hsv_full_to_rgb(torch.stack((hue, saturation, value), dim=1))


def solarize(images: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Invert every value >= the sample's threshold (N,), keep the others."""
    return torch.where(images >= _per_sample(thresholds), images.bitwise_not(), images)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the `bits` (N,) most significant bits of every value, PIL-style."""
    keep = (256 - 2 ** (8 - bits)).to(torch.uint8)
    return images & _per_sample(keep)


def invert(images: torch.Tensor) -> torch.Tensor:
    """255 - x."""
    return images.bitwise_not()


def channel_histograms(images: torch.Tensor) -> torch.Tensor:
    """Histogram of every sample's every channel: int64 (N, C, 256)."""
    flat = images.flatten(2).long()
    histograms = torch.zeros(*flat.shape[:2], 256, dtype=torch.int64, device=images.device)
    return histograms.scatter_add_(2, flat, torch.ones_like(flat))


def autocontrast(images: torch.Tensor, cutoff_percents: torch.Tensor) -> torch.Tensor:
    """PIL-style autocontrast per channel with a cutoff (N,) in percent, as `augment.autocontrast`."""
    histograms = channel_histograms(images)
    cut = (histograms.sum(2, keepdim=True) * cutoff_percents.view(-1, 1, 1)) // 100
    # argmax returns the first maximal index: the first bin where the cumulative count passes the cut.
    low = (histograms.cumsum(2) > cut).int().argmax(2, keepdim=True)
    high = 255 - (histograms.flip(2).cumsum(2) > cut).int().argmax(2, keepdim=True)
    # float64 like the NumPy reference, so the truncated look-up table matches it exactly.
    span = (high - low).clamp(min=1).double()
    scale = torch.full_like(span, 255.0) / span  # a true division, as NumPy's (see rgb_to_hsv_full)
    values = torch.arange(256, device=images.device, dtype=torch.float64)
    lut = (values * scale - low * scale).trunc().clamp(0, 255).to(torch.uint8)
    lut = torch.where(high > low, lut, values.to(torch.uint8))
    return lut.gather(2, images.flatten(2).long()).view_as(images)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL-style histogram equalisation per channel (torchvision's kernel is already batched)."""
    return TF.equalize(images)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each uint8 image about its centre by its angle (N,), counter-clockwise on screen, bilinear, zero
    fill."""
    n, c, h, w = images.shape
    rotated = rotate_maps(images.reshape(n * c, h, w).float(), degrees.repeat_interleave(c))
    return rotated.round_().clamp_(0, 255).to(torch.uint8).view(n, c, h, w)


# Brightness: imgaug's MultiplyAndAddToBrightness (METHOD.md §2) in its six colour spaces, on OpenCV's 8-bit
# conversions. YCrCb, YUV and the forward HSV step use OpenCV's integer code. The inverse HSV step and
# both HLS steps use its float32 SIMD code, where the x86 build fuses some multiply-adds. All of these
# were checked against OpenCV 5.0 on all 2**24 uint8 triples, with no byte different. OpenCV sends the
# last partial SIMD block of a row through scalar code that rounds differently; 256-pixel rows have no
# such block. OpenCV's Lab and Luv are built from fixed-point tables, which are impractical to port here,
# so they use the float formulas of OpenCV's documentation instead. Measured against OpenCV 5.0, over
# all 2**24 triples, a conversion alone: Lab differs by at most 3 levels (9.5 % of the values), Luv by at
# most 1 (18 %). The whole brightness operation, on uniform random uint8 images with parameters drawn
# from RANGES (256 images, 64×64):
#   Lab: max 30 levels, mean 0.31; 21 % of the values differ, 5.7 % by more than 1.
#   Luv: max 255 levels, mean 0.83; 43 % of the values differ, 12 % by more than 1, 0.4 % by more than 10.
#   OpenCV's integer Luv -> RGB wraps far out-of-gamut colours (e.g. to magenta); the float inverse clips.
#   At the darkening end of the ranges (×0.8, -30), Luv's mean on noise reaches 2 to 3 levels.
# On smooth images (blurred noise), Lab is max 16, mean 0.25, and Luv max 26, mean 0.57.
_INV_255 = (torch.tensor(1.0) / 255).item()  # float32 1/255, as OpenCV's 1.f/255
_HUE_SCALE_180 = (torch.tensor(6.0) / 180).item()  # float32 6/180: hue 0..179 to sectors 0..6
# sRGB primaries with a D65 white, from OpenCV's colour-conversion documentation (rows X, Y, Z and R, G, B).
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_XYZ_TO_RGB = ((3.240479, -1.53715, -0.498535), (-0.969256, 1.875991, 0.041556),
               (0.055648, -0.204043, 1.057311))
_D65_WHITE = (0.950456, 1.0, 1.088754)
_LUV_WHITE_U, _LUV_WHITE_V = 0.19793943, 0.46831096  # u', v' of the D65 white


def _fused_multiply_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """float32 a * b + c with one rounding, like an FMA instruction. float64 holds a float32 product exactly,
    and the rounding twice that follows is exhaustively checked on the inputs below."""
    return (a.double() * b.double() + c).float()


def _sector_rgb(device: torch.device) -> torch.Tensor:
    """OpenCV's hue-sector table: per sector 0..5, the candidate each of R, G, B takes (it stores b, g, r).
    Used through device_constant: made once per device, out of the per-batch path."""
    return torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=device)


def _pick_by_sector(tabs: torch.Tensor, sector: torch.Tensor) -> torch.Tensor:
    """R, G, B (N×3×H×W) from OpenCV's 4 hue-sector candidates `tabs` (4×N×H×W), by the whole part of
    hue·6/range (N×H×W), taken modulo 6 as OpenCV does (a hue of 180 rounded up from 179.5 is sector 0
    again)."""
    picks = device_constant(_sector_rgb, tabs.device)[sector.long() % 6].permute(3, 0, 1, 2)
    return tabs.gather(0, picks).permute(1, 0, 2, 3)


def _matrix_times(matrix: tuple[tuple[float, ...], ...], channels: torch.Tensor) -> torch.Tensor:
    """A 3×3 matrix of Python numbers applied to the channels of N×3×H×W (no constant tensor to copy to the
    device)."""
    c0, c1, c2 = channels.unbind(1)
    return torch.stack([m0 * c0 + m1 * c1 + m2 * c2 for m0, m1, m2 in matrix], dim=1)


def rgb_to_yuv(images: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2YUV on uint8, bit exact (its integer coefficients); int32 N×3×H×W."""
    return _rgb_to_luma_chroma(images, YUV)


def yuv_to_rgb(yuv: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_YUV2RGB on uint8 values (int32 in, uint8 out), bit exact."""
    return _luma_chroma_to_rgb(yuv, YUV)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_HSV2RGB (hue 0..179) on uint8 values (int32 in, uint8 out), as its SIMD code: float32,
    1 - s·h fused, the result truncated (not rounded) to uint8."""
    hue = hsv[:, 0].float() * _HUE_SCALE_180
    saturation, value = hsv[:, 1].float() * _INV_255, hsv[:, 2].float() * _INV_255
    sector = hue.floor()
    frac = hue - sector
    tabs = torch.stack((
        value,
        value * (1 - saturation),
        value * _fused_multiply_add(-saturation, frac, 1.0),
        value * _fused_multiply_add(-saturation, 1 - frac, 1.0),
    ))
    return (_pick_by_sector(tabs, sector) * 255).trunc().clamp(0, 255).to(torch.uint8)


def rgb_to_hls(images: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2HLS (hue 0..179) on uint8, as its float32 SIMD code (hue's multiply-add fused);
    int32 N×3×H×W."""
    r, g, b = (images.float() * _INV_255).unbind(1)
    high, low = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    diff, total = high - low, high + low
    lightness = total * 0.5
    saturation = diff / torch.where(lightness < 0.5, total, 2 - total)
    hue = torch.where(high == r, g - b, torch.where(high == g, b - r, r - g))
    offset = torch.where(high == r, (g < b) * 360.0, torch.where(high == g, 120.0, 240.0))
    hue = _fused_multiply_add(hue, torch.full_like(diff, 60.0) / diff, offset) * 0.5  # degrees to 0..179
    chromatic = diff > torch.finfo(torch.float32).eps  # grey pixels get hue and saturation 0
    hue, saturation = torch.where(chromatic, hue, 0.0), torch.where(chromatic, saturation, 0.0)
    return torch.stack((hue, lightness * 255, saturation * 255), dim=1).round().int()


def hls_to_rgb(hls: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_HLS2RGB (hue 0..179) on uint8 values (int32 in, uint8 out), as its float32 SIMD code."""
    hue = hls[:, 0].float() * _HUE_SCALE_180
    lightness, saturation = hls[:, 1].float() * _INV_255, hls[:, 2].float() * _INV_255
    product = lightness * saturation
    half_chroma = torch.where(lightness <= 0.5, product, saturation - product)
    sector = hue.floor()
    twice_frac = (hue - sector) * 2
    tabs = torch.stack((
        lightness + half_chroma,
        lightness - half_chroma,
        (lightness + half_chroma) - half_chroma * twice_frac,
        (lightness - half_chroma) + half_chroma * twice_frac,
    ))
    return (_pick_by_sector(tabs, sector) * 255).round().clamp(0, 255).to(torch.uint8)


def _rgb_to_xyz(images: torch.Tensor) -> torch.Tensor:
    """Linear-light CIE XYZ (float32 N×3×H×W) of uint8 sRGB values."""
    x = images.float() / 255
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    return _matrix_times(_RGB_TO_XYZ, linear)


def _xyz_to_rgb(xyz: torch.Tensor) -> torch.Tensor:
    """uint8 sRGB of CIE XYZ (float32 N×3×H×W); out-of-gamut colours are clipped in linear light, as in
    OpenCV."""
    linear = _matrix_times(_XYZ_TO_RGB, xyz).clamp(0, 1)
    srgb = torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return (srgb * 255).round().clamp(0, 255).to(torch.uint8)


def _lightness(y: torch.Tensor) -> torch.Tensor:
    """CIE L* (0..100) of the relative luminance Y."""
    return torch.where(y > 0.008856, 116 * y.clamp(min=0) ** (1 / 3) - 16, 903.3 * y)


def _luminance(lightness: torch.Tensor) -> torch.Tensor:
    """Relative luminance Y of CIE L* (0..100), the inverse of `_lightness`."""
    return torch.where(lightness > 8, ((lightness + 16) / 116) ** 3, lightness / 903.3)


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2Lab on uint8 (L·255/100, a + 128, b + 128), from the float formulas; int32
    N×3×H×W."""
    x, y, z = _rgb_to_xyz(images).unbind(1)
    xyz = torch.stack((x / _D65_WHITE[0], y, z / _D65_WHITE[2]), 1)  # relative to the white
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    lab = torch.stack((_lightness(xyz[:, 1]) * (255 / 100), 500 * (f[:, 0] - f[:, 1]) + 128,
                       200 * (f[:, 1] - f[:, 2]) + 128), 1)
    return lab.round().clamp(0, 255).int()


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_Lab2RGB on uint8 values (int32 in, uint8 out), from the float formulas."""
    lightness = lab[:, 0].float() * (100 / 255)
    y = _luminance(lightness)
    fy = torch.where(lightness > 8, (lightness + 16) / 116, 7.787 * y + 16 / 116)
    f = torch.stack((fy + (lab[:, 1] - 128) / 500, fy - (lab[:, 2] - 128) / 200))
    x, z = torch.where(f > 6 / 29, f**3, (f - 16 / 116) / 7.787)
    return _xyz_to_rgb(torch.stack((x * _D65_WHITE[0], y, z * _D65_WHITE[2]), 1))


def rgb_to_luv(images: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2Luv on uint8 (L·255/100, (u + 134)·255/354, (v + 140)·255/262), from the float
    formulas; int32 N×3×H×W."""
    x, y, z = _rgb_to_xyz(images).unbind(1)
    lightness = _lightness(y)
    denominator = (x + 15 * y + 3 * z).clamp(min=torch.finfo(torch.float32).eps)  # black: u = v = 0
    u = 13 * lightness * (4 * x / denominator - _LUV_WHITE_U)
    v = 13 * lightness * (9 * y / denominator - _LUV_WHITE_V)
    return torch.stack((lightness * (255 / 100), (u + 134) * (255 / 354), (v + 140) * (255 / 262)),
                       1).round().clamp(0, 255).int()


def luv_to_rgb(luv: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_Luv2RGB on uint8 values (int32 in, uint8 out), from its float formulas (1 / v' clamped
    as there)."""
    lightness = luv[:, 0].float() * (100 / 255)
    u = luv[:, 1] * (354 / 255) - 134
    v = luv[:, 2] * (262 / 255) - 140
    y = _luminance(lightness)
    # OpenCV's form of X = 9/4·Y·u'/v', Z = Y·(12 - 3u' - 20v')/(4v'), with 1/(52·L·v') clamped to ±1/4.
    up = 3 * (u + 13 * _LUV_WHITE_U * lightness)
    vp = (0.25 / (v + 13 * _LUV_WHITE_V * lightness)).clamp(-0.25, 0.25)
    return _xyz_to_rgb(torch.stack((3 * y * up * vp, y, y * ((156 * lightness - up) * vp - 5)), 1))


# Name -> (to the space, back to uint8 RGB, brightness channel), as augment.BRIGHTNESS_CONVERSIONS.
BRIGHTNESS_CONVERSIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor],
                                        Callable[[torch.Tensor], torch.Tensor], int]] = {
    "YCrCb": (rgb_to_ycrcb, ycrcb_to_rgb, 0),
    "HSV": (rgb_to_hsv, hsv_to_rgb, 2),
    "HLS": (rgb_to_hls, hls_to_rgb, 1),
    "Lab": (rgb_to_lab, lab_to_rgb, 0),
    "Luv": (rgb_to_luv, luv_to_rgb, 0),
    "YUV": (rgb_to_yuv, yuv_to_rgb, 0),
}


def multiply_and_add(levels: torch.Tensor, multiply: torch.Tensor, add: torch.Tensor,
                     add_first: torch.Tensor) -> torch.Tensor:
    """imgaug's uint8 Multiply and Add on int levels (N×H×W), per sample (N,), in either order (add_first,
    bool).

    The float32 product is clipped and truncated; the added value is rounded (half to even) first.
    """
    multiply, add, add_first = (multiply.float().view(-1, 1, 1), add.round().int().view(-1, 1, 1),
                                add_first.view(-1, 1, 1))

    def times(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * multiply).clamp(0, 255).int()

    def plus(x: torch.Tensor) -> torch.Tensor:
        return (x + add).clamp(0, 255)

    return torch.where(add_first, times(plus(levels)), plus(times(levels)))


def brightness(
    images: torch.Tensor, multiply: torch.Tensor, add: torch.Tensor, colorspaces: torch.Tensor,
    add_first: torch.Tensor
) -> torch.Tensor:
    """imgaug's MultiplyAndAddToBrightness per sample: in the colour space `colorspaces` (N,) indexes in
    RANGES["brightness_colorspaces"], the brightness channel times `multiply` and plus `add` (N,), in the
    order `add_first` (N,) says. All six are computed for the whole batch, and each sample keeps its own."""
    candidates = []
    for name in RANGES["brightness_colorspaces"]:
        to_space, to_rgb, channel = BRIGHTNESS_CONVERSIONS[name]
        converted = to_space(images)
        converted[:, channel] = multiply_and_add(converted[:, channel], multiply, add, add_first)
        candidates.append(to_rgb(converted))
    return torch.stack(candidates)[colorspaces, torch.arange(images.shape[0], device=images.device)]


def _brightness_drawn(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Brightness with a colour space (uniform over the six), an order (add first with probability 0.5),
    a multiplier and an addend drawn per sample, as augment.AUGMENTATIONS["brightness"]."""
    n, device = images.shape[0], images.device
    colorspaces = _integers(0, len(RANGES["brightness_colorspaces"]), n, generator, device)
    add_first = _uniform(0.0, 1.0, (n,), generator, device) < RANGES["brightness_add_first_probability"]
    multiply, add = (_draw("brightness_multiply", images, generator),
                     _draw("brightness_add", images, generator))
    return brightness(images, multiply, add, colorspaces, add_first)


def _solarize_half(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Solarize with probability 0.5 per sample (a skipped coin flip still counts as one of the three)."""
    n, device = images.shape[0], images.device
    applied = _per_sample(_uniform(0.0, 1.0, (n,), generator, device) < RANGES["solarize_probability"])
    return torch.where(applied, solarize(images, _draw("solarize_threshold", images, generator)), images)


def _integers(low: int, high: int, n: int, generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
    """int64 uniform in [low, high), one per sample."""
    return torch.randint(low, high, (n,), generator=generator, device=device)


def _draw(name: str, x: torch.Tensor, g: torch.Generator | None, *shape: int) -> torch.Tensor:
    """One parameter per sample (and per entry of `shape`) from the shared range `augment.RANGES[name]`."""
    low, high = RANGES[name]
    if isinstance(low, int):
        return _integers(low, high, x.shape[0], g, x.device)
    return _uniform(low, high, (x.shape[0], *shape), g, x.device)


# Same names, order and parameter ranges (augment.RANGES) as augment.AUGMENTATIONS; each entry draws one
# parameter set per sample from the generator, then applies the operation to the whole batch.
DEVICE_AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "gamma_contrast": lambda x, g: gamma_contrast(x, _draw("gamma", x, g, 3)),
    "brightness": _brightness_drawn,
    "sharpness": lambda x, g: sharpness(x, _draw("sharpness", x, g)),
    "hue_saturation": lambda x, g: hue_saturation(x, _draw("hue_shift", x, g),
                                                  _draw("saturation_shift", x, g)),
    "solarize": _solarize_half,
    "posterize": lambda x, g: posterize(x, _draw("posterize_bits", x, g)),
    "invert": lambda x, g: invert(x),
    "autocontrast": lambda x, g: autocontrast(x, _draw("autocontrast_cutoff", x, g)),
    "equalize": lambda x, g: equalize(x),
    "rotate": lambda x, g: rotate(x, _draw("rotate_degrees", x, g)),
}


def draw_augmentation_indices(n: int, generator: torch.Generator | None,
                              device: torch.device) -> torch.Tensor:
    """(n, 3) indices into DEVICE_AUGMENTATIONS: per sample 3 distinct, uniformly without replacement, in
    drawn order.

    The first 3 entries of a uniformly random permutation (argsort of i.i.d. uniforms).
    """
    keys = torch.rand(n, len(DEVICE_AUGMENTATIONS), generator=generator, device=device)
    return keys.argsort(dim=1)[:, :AUGMENTATIONS_PER_SOURCE]


def augment_sources(sources: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply to each uint8 source (N×3×H×W) its own 3 distinct random operations, in drawn order."""
    chosen = draw_augmentation_indices(sources.shape[0], generator, sources.device)
    samples = torch.arange(sources.shape[0], device=sources.device)
    for step in range(AUGMENTATIONS_PER_SOURCE):
        candidates = torch.stack([op(sources, generator) for op in DEVICE_AUGMENTATIONS.values()])
        sources = candidates[chosen[:, step], samples]
    return sources


def rotate_some_images(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """With probability 0.3 per sample, rotate the training image by an angle uniform in [-90, 90] degrees."""
    n, device = images.shape[0], images.device
    degrees = _uniform(-IMAGE_ROTATION_DEGREES, IMAGE_ROTATION_DEGREES, (n,), generator, device)
    rotated = _per_sample(_uniform(0.0, 1.0, (n,), generator, device) < ROTATE_IMAGE_PROBABILITY)
    return torch.where(rotated, rotate(images, degrees), images)


def _float_levels(device: torch.device) -> torch.Tensor:
    """The 256 float32 values of the uint8 levels, computed by the CPU path's own conversion (used through
    device_constant: once per device)."""
    return torch.from_numpy(cpu_to_float(np.arange(256, dtype=np.uint8))).to(device)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 to float32 0..1 with exactly the values of the CPU path (util.images.to_float, a true
    division by 255), looked up on the device. `images / 255` would not do: CUDA divides by a number as a
    multiplication by its reciprocal, which rounds 126 of the 256 levels to the neighbouring float."""
    return device_constant(_float_levels, images.device)[images.int()]


def synthesize_batch(
    images: torch.Tensor, sources: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A batch of training samples (METHOD.md §2) from uint8 training images N×3×H×W and uint8 sources (or
    None).

    Returns what the CPU dataset's collated batch holds: image and augmented_image (float32 N×3×H×W
    in [0, 1]), anomaly_mask (float32 N×1×H×W, binary) and has_anomaly (float32 N×1), on the
    images' device. No sources ⇒ uniform-noise sources, as on the CPU path. `generator` (on the
    images' device) makes the batch reproducible.
    """
    n, _, height, width = images.shape
    device = images.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the synthesis generator lives on {generator.device}, the images on {device}: "
                         f"make it with device_generator(images.device, seed)")
    if sources is None:
        sources = torch.randint(0, 256, images.shape, generator=generator, device=device, dtype=torch.uint8)
    image = to_float(rotate_some_images(images, generator))
    source = to_float(augment_sources(sources.to(device), generator))
    anomalous = _per_sample(_uniform(0.0, 1.0, (n,), generator, device) < ANOMALY_PROBABILITY)
    mask = perlin_mask_batch((height, width), n, generator, device) * anomalous
    beta = _per_sample(_uniform(0.0, MAX_BETA, (n,), generator, device))
    return {
        "image": image,
        "augmented_image": blend_anomaly(image, source, mask, beta),
        "anomaly_mask": mask,
        # An anomalous draw whose mask came out empty is a normal sample, as on the CPU path.
        "has_anomaly": mask.flatten(1).amax(1, keepdim=True),
    }


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator living on `device`, for `synthesize_batch`; save its get_state() to resume."""
    return torch.Generator(device=device).manual_seed(seed)

