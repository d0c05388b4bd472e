"""The 10 operations DRAEM applies to an anomaly source image, and the "3 distinct, in drawn order" sampler
(METHOD.md §2).

Every operation takes and returns a uint8 H x W x 3 array in OpenCV layout and never modifies its
input (the data loader caches sources). They use torchvision.transforms.v2.functional where it
has the operation, OpenCV/NumPy where it has not (additive hue/saturation, brightness in a colour
space, autocontrast with a cutoff) and for rotation (cv2.warpAffine: several times faster than
torchvision's on CPU, and what imgaug itself used for these dtypes).

The released program passed OpenCV's BGR arrays to imgaug, which assumes RGB; the colour-space
operations here keep that quirk (they convert "RGB" to HSV/YCrCb/...) so that hues and luma weights
move as they did when the published models were trained.

Deliberate differences from the released program's imgaug 0.4.0 augmentation (the one list; the README copies
it):
- imgaug itself is not used (it does not install with NumPy 2). The ten operations are re-implemented
  with torchvision, OpenCV and NumPy, using imgaug's ranges. A solarize that skips its coin flip still
  takes one of the three slots, as in imgaug.
- Random streams: one NumPy generator per item replaces imgaug's seeded streams. The distributions match;
  the individual draws do not.
- Hue and saturation: the drawn integer shifts OpenCV's full-range hue, 256 steps with wrap at 256.
  imgaug shifted its 180-step hue by the integer times 180/255, truncated, with wrap at 180. Hues can
  therefore end up a few degrees apart (at most about 4).
- Conversions come from the installed OpenCV (5.0 when measured). Its 8-bit rounding (SIMD code, Lab/Luv
  tables) may differ by a level from the OpenCV the released program ran with.
- `--synthesis gpu` (device_synthesis.py) draws the same distributions with torch. Its brightness matches
  OpenCV's bytes in YCrCb, YUV, HSV and HLS, on rows of whole SIMD blocks such as 256 pixels. In a
  partial block, OpenCV's scalar code differs by one level. Lab and Luv are float equivalents: on random
  noise they differ by 0.3 and 0.8 levels on average, more on far out-of-gamut colours (measured in
  device_synthesis.py). Its rotations and hue/saturation round trip may differ by one level on rare pixels.

Brightness itself has no difference left. It is imgaug's MultiplyAndAddToBrightness: per image, one of
YCrCb, HSV, HLS, Lab, Luv, YUV, with the multiply and the add in random order, and imgaug's uint8
arithmetic.
"""
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

AUGMENTATIONS_PER_SOURCE = 3


def _torchvision(image: np.ndarray, op: Callable[..., torch.Tensor], *args) -> np.ndarray:
    """Apply a torchvision functional op to an H x W x C uint8 array (it works on C x H x W tensors)."""
    result = op(torch.from_numpy(image).permute(2, 0, 1), *args)
    return np.ascontiguousarray(result.permute(1, 2, 0).numpy())


def gamma_contrast(image: np.ndarray, gammas: Sequence[float]) -> np.ndarray:
    """255 * (x / 255) ** gamma, with its own gamma per channel."""
    channels = torch.from_numpy(image).permute(2, 0, 1)
    result = torch.cat([TF.adjust_gamma(channels[c : c + 1], float(g)) for c, g in enumerate(gammas)])
    return np.ascontiguousarray(result.permute(1, 2, 0).numpy())


# imgaug's brightness colour spaces (MultiplyAndAddToBrightness, to_colorspace's default order): the
# conversions there and back as imgaug calls them ("RGB" on our BGR arrays), and the brightness channel.
BRIGHTNESS_CONVERSIONS: dict[str, tuple[int, int, int]] = {
    "YCrCb": (cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, 0),
    "HSV": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2),
    "HLS": (cv2.COLOR_RGB2HLS, cv2.COLOR_HLS2RGB, 1),
    "Lab": (cv2.COLOR_RGB2Lab, cv2.COLOR_Lab2RGB, 0),
    "Luv": (cv2.COLOR_RGB2Luv, cv2.COLOR_Luv2RGB, 0),
    "YUV": (cv2.COLOR_RGB2YUV, cv2.COLOR_YUV2RGB, 0),
}


def brightness(image: np.ndarray, multiply: float, add: float, colorspace: str,
               add_first: bool) -> np.ndarray:
    """imgaug's MultiplyAndAddToBrightness (METHOD.md §2) in one colour space: its brightness channel times
    `multiply` and plus `add` (0..255 scale), in the given order; the other channels are kept.

    uint8 arithmetic as imgaug's Multiply and Add: the float32 product is clipped and truncated, the
    added value is rounded (half to even) before it is added, each step clipped to 0..255.
    """
    to_space, from_space, channel = BRIGHTNESS_CONVERSIONS[colorspace]
    levels = np.arange(256)
    times = np.clip(levels.astype(np.float32) * np.float32(multiply), 0, 255).astype(np.uint8)
    plus = np.clip(levels + np.round(add), 0, 255).astype(np.uint8)
    lut = times[plus] if add_first else plus[times]
    converted = cv2.cvtColor(image, to_space)
    converted[..., channel] = lut[converted[..., channel]]
    return cv2.cvtColor(converted, from_space)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL-style sharpness: 0 gives a smoothed image, 1 the original, 2 a sharpened one."""
    return _torchvision(image, TF.adjust_sharpness, factor)


def hue_saturation(image: np.ndarray, hue_shift: int, saturation_shift: int) -> np.ndarray:
    """Add `hue_shift` to the hue (0..255 full circle, wrapping) and `saturation_shift` to the saturation
    (clipped)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + hue_shift) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + saturation_shift, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)


def solarize(image: np.ndarray, threshold: float) -> np.ndarray:
    """Invert every value >= threshold, keep the others."""
    return _torchvision(image, TF.solarize, threshold)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """Keep the `bits` most significant bits of every value (PIL-style), at most 2**bits levels."""
    return _torchvision(image, TF.posterize, bits)


def invert(image: np.ndarray) -> np.ndarray:
    """255 - x."""
    return _torchvision(image, TF.invert)


def autocontrast(image: np.ndarray, cutoff_percent: int = 0) -> np.ndarray:
    """PIL-style autocontrast per channel: drop `cutoff_percent` % of the darkest and of the brightest
    values from the histogram, then stretch what remains linearly to 0..255."""
    result = np.empty_like(image)
    values = np.arange(256)
    for c in range(image.shape[2]):
        histogram = np.bincount(image[..., c].ravel(), minlength=256)
        cut = histogram.sum() * cutoff_percent // 100
        low = np.argmax(np.cumsum(histogram) > cut)
        high = 255 - np.argmax(np.cumsum(histogram[::-1]) > cut)
        if high <= low:
            result[..., c] = image[..., c]
            continue
        scale = 255.0 / (high - low)
        lut = np.clip(np.trunc(values * scale - low * scale), 0, 255).astype(np.uint8)
        result[..., c] = lut[image[..., c]]
    return result


def equalize(image: np.ndarray) -> np.ndarray:
    """PIL-style histogram equalisation per channel."""
    return _torchvision(image, TF.equalize)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre pixel by `degrees` (counter-clockwise on screen), bilinear, zero fill.

    Works on any array OpenCV can warp: H x W x C uint8 images and H x W float maps alike.
    """
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
    rotated = cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return rotated.reshape(image.shape)


def rotate_maps(maps: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate maps (B, H, W) about their centre by degrees (B,), bilinear with zero fill.

    Same convention as `rotate` (OpenCV: positive angles turn the content counter-clockwise
    on screen), so the CPU and the device path rotate alike.
    """
    height, width = maps.shape[-2:]
    theta = torch.deg2rad(degrees.to(maps.dtype))
    cos, sin = theta.cos(), theta.sin()
    # affine_grid maps output to input positions in [-1, 1] coordinates; the aspect ratio terms keep
    # the rotation rigid in pixel space for non-square maps.
    affine = torch.zeros(maps.shape[0], 2, 3, dtype=maps.dtype, device=maps.device)
    affine[:, 0, 0] = cos
    affine[:, 0, 1] = -sin * height / width
    affine[:, 1, 0] = sin * width / height
    affine[:, 1, 1] = cos
    grid = F.affine_grid(affine, [maps.shape[0], 1, height, width], align_corners=False)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


# The released program's parameter ranges (imgaug), METHOD.md §2: one table for the CPU path below
# and the device path (device_synthesis.py). Float ranges are [low, high); integer ranges are [low, high)
# as NumPy's and torch's integer draws take them (so (-50, 51) is -50..50).
RANGES = {
    "gamma": (0.5, 2.0),  # gamma_contrast, one gamma per channel
    "brightness_multiply": (0.8, 1.2),
    "brightness_add": (-30.0, 30.0),  # on the 0..255 scale
    # one drawn uniformly per image, as imgaug's to_colorspace
    "brightness_colorspaces": tuple(BRIGHTNESS_CONVERSIONS),
    "brightness_add_first_probability": 0.5,  # imgaug's random_order=True over (Multiply, Add)
    "sharpness": (0.0, 2.0),
    "hue_shift": (-50, 51),  # integers on OpenCV's 0..255 full hue circle
    "saturation_shift": (-50, 51),  # integers
    "solarize_probability": 0.5,  # imgaug's Solarize(0.5, ...): a skipped coin flip still counts as one of
                                  # the three
    "solarize_threshold": (32.0, 128.0),
    "posterize_bits": (1, 9),  # integers: 1..8 bits kept
    "autocontrast_cutoff": (0, 21),  # integer percent
    "rotate_degrees": (-45.0, 45.0),
}

# Each entry draws its parameters from the generator, then applies the named operation.
AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gamma_contrast": lambda img, rng: gamma_contrast(img, rng.uniform(*RANGES["gamma"], size=3)),
    "brightness": lambda img, rng: brightness(
        img,
        rng.uniform(*RANGES["brightness_multiply"]),
        rng.uniform(*RANGES["brightness_add"]),
        RANGES["brightness_colorspaces"][rng.integers(len(RANGES["brightness_colorspaces"]))],
        bool(rng.random() < RANGES["brightness_add_first_probability"]),
    ),
    "sharpness": lambda img, rng: sharpness(img, rng.uniform(*RANGES["sharpness"])),
    "hue_saturation": lambda img, rng: hue_saturation(
        img, int(rng.integers(*RANGES["hue_shift"])), int(rng.integers(*RANGES["saturation_shift"]))
    ),
    "solarize": lambda img, rng: (
        solarize(img, rng.uniform(*RANGES["solarize_threshold"]))
        if rng.random() < RANGES["solarize_probability"] else img
    ),
    "posterize": lambda img, rng: posterize(img, int(rng.integers(*RANGES["posterize_bits"]))),
    "invert": lambda img, rng: invert(img),
    "autocontrast": lambda img, rng: autocontrast(img, int(rng.integers(*RANGES["autocontrast_cutoff"]))),
    "equalize": lambda img, rng: equalize(img),
    "rotate": lambda img, rng: rotate(img, rng.uniform(*RANGES["rotate_degrees"])),
}


def draw_augmentations(rng: np.random.Generator, count: int = AUGMENTATIONS_PER_SOURCE) -> list[str]:
    """`count` distinct operation names, uniformly without replacement, in the order drawn."""
    names = list(AUGMENTATIONS)
    return [names[i] for i in rng.choice(len(names), size=count, replace=False)]


def augment_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply 3 distinct random operations to a uint8 source image, in the order drawn."""
    for name in draw_augmentations(rng):
        image = AUGMENTATIONS[name](image, rng)
    return image
