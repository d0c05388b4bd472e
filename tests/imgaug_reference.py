"""An independent reference for imgaug's MultiplyAndAddToBrightness, shared by the CPU and device brightness
tests.

Written from imgaug's documented behaviour with OpenCV's conversions, not from augment.py, so the tests
compare our code with it rather than with itself.
"""
import cv2
import numpy as np

# imgaug's MultiplyAndAddToBrightness: its colour spaces in its order, each with OpenCV's conversion there and
# back (as imgaug calls them) and the brightness channel it changes (Y, V, L, L, L, Y).
IMGAUG_BRIGHTNESS_SPACES = {
    "YCrCb": (cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, 0),
    "HSV": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2),
    "HLS": (cv2.COLOR_RGB2HLS, cv2.COLOR_HLS2RGB, 1),
    "Lab": (cv2.COLOR_RGB2Lab, cv2.COLOR_Lab2RGB, 0),
    "Luv": (cv2.COLOR_RGB2Luv, cv2.COLOR_Luv2RGB, 0),
    "YUV": (cv2.COLOR_RGB2YUV, cv2.COLOR_YUV2RGB, 0),
}


def imgaug_brightness(image: np.ndarray, multiply: float, add: float, space: str,
                      add_first: bool) -> np.ndarray:
    """Reference, step by step: OpenCV into the space, imgaug's uint8 Multiply (float32 product, clipped,
    truncated) and Add (the value rounded half to even first, the sum clipped) on the one channel, back."""
    to_space, from_space, channel = IMGAUG_BRIGHTNESS_SPACES[space]
    converted = cv2.cvtColor(image, to_space)
    level = converted[..., channel].astype(np.int64)

    def times(x):
        return np.floor(np.minimum(x.astype(np.float32) * np.float32(multiply), 255)).astype(np.int64)

    def plus(x):
        return np.clip(x + round(add), 0, 255)  # Python's round: half to even, as NumPy's

    converted[..., channel] = times(plus(level)) if add_first else plus(times(level))
    return cv2.cvtColor(converted, from_space)
