"""What produced a file: the commit, the package versions, the device, the thread count and the flags.

Every results JSON, threshold file and resume file carries `provenance(...)` under the key
"provenance", and the report shows it. A seeded run is bit-identical only where all of this is the
same (and on the same kind of processor): other thread counts or library versions change the
order of floating-point sums, and with it the last bits, then the weights, then the metrics.
"""
import argparse
import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import cv2
import numpy as np
import torch

# (name shown, distributions that provide it: the first installed one is reported)
PACKAGES = (("torchvision", ("torchvision",)), ("scikit-learn", ("scikit-learn",)),
            ("opencv", ("opencv-python-headless", "opencv-python", "opencv-contrib-python")))


@functools.cache
def commit() -> str:
    """`git rev-parse HEAD` of the checkout this code runs from, `+dirty` when it has uncommitted changes;
    else unknown."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


@functools.cache
def versions() -> dict[str, str]:
    """Versions of Python and of the packages whose arithmetic the results depend on."""
    found = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
             # plain str: the resume file holds plain values only (torch's is a subclass)
             "opencv": cv2.__version__}
    for name, distributions in PACKAGES:
        for distribution in distributions:
            try:
                found.setdefault(name, importlib.metadata.version(distribution))
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        found.setdefault(name, "not installed")
    return found


def _plain(value):
    """A flag's value as JSON has it (paths as text)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return str(value)


def provenance(program: str, flags: argparse.Namespace | dict | None,
               device: torch.device | str | None) -> dict:
    """The record of what produced a file: `program` (e.g. train_draem.py) and its flags, commit, versions,
    device, thread count, platform."""
    flags = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
    device = torch.device(device) if device is not None else None
    if device is None:
        device_name = "unknown"
    elif device.type == "cuda":
        device_name = f"{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()})"
    return {"commit": commit(), "versions": versions(), "device": device_name,
            "threads": torch.get_num_threads(), "platform": platform.platform(), "program": program,
            "flags": {name: _plain(value) for name, value in sorted(flags.items())}}
