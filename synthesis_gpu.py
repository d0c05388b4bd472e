"""Training-sample synthesis (METHOD.md §2) batched on the training device: the `--synthesis gpu` path.

The DataLoader only hands over decoded uint8 training images and anomaly sources (`RawTrainDataset`);
`synthesize_batch` then does on the device, for the whole batch at once and with per-sample random
parameters from one seedable `torch.Generator`: the 30 % image rotation, the 3 distinct source
augmentations in drawn order, the Perlin masks, the beta blend and the 50 % normal split. Its output
is the batch the CPU path (`data_loader.MVTecDRAEMTrainDataset`) would have collated, from the same
distributions.

Sync-free by design: every augmentation runs on the whole batch and each sample keeps the result of
the one it drew (`torch.where`/gather, never boolean indexing), so the host never waits for the
device and shapes never depend on data. Ten times the work of a per-sample dispatch, but the
operations are elementwise passes over a few MB, small next to one training step.

Each operation mirrors its `augment.py` counterpart on uint8 values (BGR arrays treated as RGB, the
released quirk, kept) and gives the same bytes, with two exceptions of at most one level on rare
pixels: rotations (source rotation, the 30 % image rotation) interpolate in float32 with
`grid_sample` where `cv2.warpAffine` uses fixed-point weights, and the hue/saturation round trip's
float32 HSV -> RGB step may round differently from OpenCV's vectorised code.
The training image and anomaly source of each item are drawn uniformly at random by the loader, as on
the CPU path (the dataset index is ignored).
"""
from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF

from augment import AUGMENTATIONS_PER_SOURCE, RANGES, rotate_maps
from perlin import perlin_mask_batch
from synthesis import ANOMALY_PROBABILITY, IMAGE_ROTATION_DEGREES, MAX_BETA, ROTATE_IMAGE_PROBABILITY, blend_anomaly

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
    """OpenCV's CV_DESCALE: fixed-point value rounded half up and shifted back (arithmetic shift for negatives)."""
    return (x + (1 << (shift - 1))) >> shift


def gamma_contrast(images: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """255 * (x / 255) ** gamma with gammas (N, 3), one per sample and channel, converted like torchvision."""
    scaled = TF.to_dtype(images, torch.float32, scale=True).pow_(_per_sample(gammas))
    return TF.to_dtype(scaled, torch.uint8, scale=True)


def rgb_to_ycrcb(images: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2YCrCb on uint8, bit exact (its integer coefficients); int32 N×3×H×W."""
    r, g, b = images.int().unbind(1)
    y = _descale(r * 4899 + g * 9617 + b * 1868, YCRCB_SHIFT)
    cr = _descale((r - y) * 11682 + (128 << YCRCB_SHIFT), YCRCB_SHIFT).clamp(0, 255)
    cb = _descale((b - y) * 9241 + (128 << YCRCB_SHIFT), YCRCB_SHIFT).clamp(0, 255)
    return torch.stack((y, cr, cb), dim=1)


def ycrcb_to_rgb(ycrcb: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_YCrCb2RGB on uint8 values (int32 in, uint8 out), bit exact."""
    y, cr, cb = ycrcb.unbind(1)
    cr, cb = cr - 128, cb - 128
    r = y + _descale(cr * 22987, YCRCB_SHIFT)
    g = y + _descale(cr * -11698 + cb * -5636, YCRCB_SHIFT)
    b = y + _descale(cb * 29049, YCRCB_SHIFT)
    return torch.stack((r, g, b), dim=1).clamp(0, 255).to(torch.uint8)


def brightness(images: torch.Tensor, multiply: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """Luma (Y of YCrCb) times `multiply` plus `add`, per sample (N,); chroma kept."""
    ycrcb = rgb_to_ycrcb(images)
    luma = ycrcb[:, :1].float() * _per_sample(multiply) + _per_sample(add)
    return ycrcb_to_rgb(torch.cat((luma.round().clamp(0, 255).int(), ycrcb[:, 1:]), dim=1))


def sharpness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """PIL-style sharpness with one factor per sample (N,), computed as torchvision's adjust_sharpness."""
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    kernel = torch.ones(3, 3, device=images.device) / 13.0
    kernel[1, 1] = 5.0 / 13.0
    output = images.float()
    degenerate = torch.nn.functional.conv2d(output, kernel.expand(3, 1, 3, 3), groups=3).round_()
    inner = output[..., 1:-1, 1:-1]
    # Border pixels keep their value, as in PIL and torchvision.
    inner.add_((1.0 - _per_sample(factors)) * (degenerate - inner))
    return output.clamp_(0, 255).to(torch.uint8)


def rgb_to_hsv_full(images: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2HSV_FULL on uint8 (hue 0..255 for the full circle), bit exact; int32 N×3×H×W."""
    r, g, b = images.int().unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    diff = value - torch.minimum(torch.minimum(r, g), b)
    index = torch.arange(256, device=images.device, dtype=torch.float64).clamp(min=1)
    # OpenCV's division tables, rounded as saturate_cast does; entry 0 is 0. (A true division: torch's
    # `number / tensor` multiplies by the reciprocal, which is not always the correctly rounded quotient.)
    sat_table = torch.full_like(index, 255 << HSV_SHIFT).div(index).round().int()
    hue_table = torch.full_like(index, 256 << HSV_SHIFT).div(6 * index).round().int()
    sat_table[0] = hue_table[0] = 0
    saturation = _descale(diff * sat_table[value], HSV_SHIFT)
    hue = torch.where(value == r, g - b, torch.where(value == g, b - r + 2 * diff, r - g + 4 * diff))
    hue = _descale(hue * hue_table[diff], HSV_SHIFT)
    hue = torch.where(hue < 0, hue + 256, hue)
    return torch.stack((hue, saturation, value), dim=1)


def hsv_full_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_HSV2RGB_FULL on uint8 values (int32 in, uint8 out), computed in float32 like OpenCV.

    OpenCV's inverse takes the 8-bit full hue circle as 255 steps (the forward one as 256): kept, so
    a round trip moves hues exactly as on the CPU path.
    """
    hue = hsv[:, 0].float() * (torch.tensor(6.0) / 255.0).item()
    saturation, value = hsv[:, 1].float() * (1.0 / 255.0), hsv[:, 2].float() * (1.0 / 255.0)
    sector = hue.floor()
    frac = hue - sector
    sector = sector.long() % 6
    tab = torch.stack((value, value * (1 - saturation), value * (1 - saturation * frac), value * (1 - saturation * (1 - frac))))
    # OpenCV's sector table gives the tab entry of (b, g, r) per sector; we store r, g, b.
    sector_rgb = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=hsv.device)
    picks = sector_rgb[sector].permute(3, 0, 1, 2)  # 3×N×H×W indices into tab
    rgb = tab.gather(0, picks).permute(1, 0, 2, 3)
    rgb = torch.where((saturation == 0)[:, None], value[:, None].expand_as(rgb), rgb)
    return (rgb * 255).round().clamp(0, 255).to(torch.uint8)


def hue_saturation(images: torch.Tensor, hue_shifts: torch.Tensor, saturation_shifts: torch.Tensor) -> torch.Tensor:
    """Add an integer hue shift (0..255 full circle, wrapping) and saturation shift (clipped) per sample (N,)."""
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
    """Rotate each uint8 image about its centre by its angle (N,), counter-clockwise on screen, bilinear, zero fill."""
    n, c, h, w = images.shape
    rotated = rotate_maps(images.reshape(n * c, h, w).float(), degrees.repeat_interleave(c))
    return rotated.round_().clamp_(0, 255).to(torch.uint8).view(n, c, h, w)


def _solarize_half(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Solarize with probability 0.5 per sample (a skipped coin flip still counts as one of the three)."""
    n, device = images.shape[0], images.device
    applied = _per_sample(_uniform(0.0, 1.0, (n,), generator, device) < RANGES["solarize_probability"])
    return torch.where(applied, solarize(images, _draw("solarize_threshold", images, generator)), images)


def _integers(low: int, high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
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
    "brightness": lambda x, g: brightness(x, _draw("brightness_multiply", x, g), _draw("brightness_add", x, g)),
    "sharpness": lambda x, g: sharpness(x, _draw("sharpness", x, g)),
    "hue_saturation": lambda x, g: hue_saturation(x, _draw("hue_shift", x, g), _draw("saturation_shift", x, g)),
    "solarize": _solarize_half,
    "posterize": lambda x, g: posterize(x, _draw("posterize_bits", x, g)),
    "invert": lambda x, g: invert(x),
    "autocontrast": lambda x, g: autocontrast(x, _draw("autocontrast_cutoff", x, g)),
    "equalize": lambda x, g: equalize(x),
    "rotate": lambda x, g: rotate(x, _draw("rotate_degrees", x, g)),
}


def draw_augmentation_indices(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n, 3) indices into DEVICE_AUGMENTATIONS: per sample 3 distinct, uniformly without replacement, in drawn order.

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


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 to float32 0..1, the same values as data_loader.to_float (a true division by 255)."""
    return images.float() / 255.0


def synthesize_batch(
    images: torch.Tensor, sources: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A batch of training samples (METHOD.md §2) from uint8 training images N×3×H×W and uint8 sources (or None).

    Returns what the CPU dataset's collated batch holds: image and augmented_image (float32 N×3×H×W
    in [0, 1]), anomaly_mask (float32 N×1×H×W, binary) and has_anomaly (float32 N×1), on the
    images' device. No sources ⇒ uniform-noise sources, as on the CPU path. `generator` (on the
    images' device) makes the batch reproducible.
    """
    n, _, height, width = images.shape
    device = images.device
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

